"""FiPS's whitened init (Recipe.init="whitened"): exact at full rank, closer to the dense
MLP outputs than the plain SVD init at the same rank and sparsity."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.config import RecipeError


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_whitened_init_full_rank_reproduces_dense_logits(arch, tokens, input_ids):
    model = make_model(arch)
    with torch.no_grad():
        dense = model(input_ids).logits
    d = model.config.hidden_size
    res = layershare.compress(model, small_recipe(sparsity=0.0, init="whitened", rank=d), data=tokens)
    with torch.no_grad():
        comp = model(input_ids).logits
    torch.testing.assert_close(comp, dense, atol=1e-4, rtol=1e-4)
    assert all(g.stats.rel_err_before < 1e-6 for g in res.report.groups)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_whitened_init_has_lower_calibration_error_than_svd_init(arch, tokens):
    errs = {}
    for init in ("svd", "whitened"):
        res = layershare.compress(make_model(arch), small_recipe(ratio=0.3, init=init, schedule="static"),
                                  data=tokens)
        errs[init] = sum(g.stats.rel_err_before for g in res.report.groups)
        assert abs(res.sizes.ratio - 0.3) < 0.01  # the same budget either way
    assert errs["whitened"] < 0.9 * errs["svd"]


def test_unknown_init_is_refused():
    with pytest.raises(RecipeError, match="init must be"):
        small_recipe(init="random")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_activation_pruning_score_lowers_the_error_at_the_final_mask(arch, tokens):
    """prune_score="activation" ranks V entries by the MLP-output change they cause; at the same
    budget its mask (before any tuning) reproduces the dense MLPs better than |V| does."""
    errs = {}
    for score in ("magnitude", "activation"):
        res = layershare.compress(make_model(arch), small_recipe(ratio=0.3, prune_score=score, schedule="static"),
                                  data=tokens)
        errs[score] = sum(g.stats.rel_err_before for g in res.report.groups)
        assert abs(res.sizes.ratio - 0.3) < 0.01
    assert errs["activation"] < 0.9 * errs["magnitude"]


def test_unknown_prune_score_is_refused():
    with pytest.raises(RecipeError, match="prune_score must be"):
        small_recipe(prune_score="random")


def test_balance_keeps_the_products_and_equalises_the_norms():
    from layershare.methods.fips import balance

    g = torch.Generator().manual_seed(0)
    U = torch.randn(6, 5, generator=g, dtype=torch.float64) * torch.tensor([100.0, 1, 0.01, 3, 0], dtype=torch.float64)
    Vs = [torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)]
    U2, Vs2 = balance(U, Vs)
    for V, V2 in zip(Vs, Vs2):
        torch.testing.assert_close(U2 @ V2, U @ V)
    rows = torch.cat(Vs2, dim=1).norm(dim=1)
    torch.testing.assert_close(U2.norm(dim=0)[:4], rows[:4])
    assert torch.equal(U2[:, 4], U[:, 4]) and torch.equal(Vs2[0][4], Vs[0][4])  # a zero column: left as it is


def test_balanced_init_has_the_same_mask_and_error_before_tuning(tokens):
    """Balancing rescales U's columns and V's rows only: the activation score, the one-shot mask
    and the error before tuning are those of the unbalanced init."""
    plain = layershare.compress(make_model("llama"), small_recipe(ratio=0.1, steps=0, balance=False), data=tokens)
    bal = layershare.compress(make_model("llama"), small_recipe(ratio=0.1, steps=0, balance=True), data=tokens)
    for a, b in zip(plain.report.groups, bal.report.groups):
        assert b.stats.rel_err_before == pytest.approx(a.stats.rel_err_before, rel=1e-4)
