"""MASA on tiny models: matrix PCA is exact with all atoms, the budget is honest, save -> load."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.compression.budget import BudgetError, count_params
from layershare.methods.masa import matrix_pca


def test_matrix_pca_exact_with_all_atoms_and_optimal_with_fewer():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(5)]
    atoms, coef = matrix_pca(mats, 4)  # mean + 4 components span 5 matrices exactly
    for c, m in zip(coef, mats):
        torch.testing.assert_close(torch.tensordot(c, atoms, dims=1), m)
    atoms, coef = matrix_pca(mats, 2)
    err = sum(float((torch.tensordot(c, atoms, dims=1) - m).pow(2).sum()) for c, m in zip(coef, mats))
    M = torch.stack([m.flatten() for m in mats])
    s = torch.linalg.svdvals(M - M.mean(0))
    assert err == pytest.approx(float(s[2:].pow(2).sum()), rel=1e-9)  # what PCA leaves out, and nothing more


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_masa_budget_and_round_trip(arch, tokens, input_ids, tmp_path):
    model = make_model(arch)
    total = count_params(model)
    res = layershare.compress(model, small_recipe(method="masa", ratio=0.5, ratio_of="attention"), data=tokens,
                              output_dir=tmp_path / "c")
    plan = res.plan
    assert count_params(model) == pytest.approx(total - plan.removed, abs=0.5)  # the plan counts what is stored
    assert abs(plan.removed / plan.mlp_params - 0.5) < 0.5 / 4  # within half an atom of 4 layers
    on_disk = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert res.sizes.weight_bytes <= on_disk <= res.sizes.weight_bytes + 32_000
    assert on_disk < 4 * total  # really smaller than the dense float32 weights
    with torch.no_grad():
        before = model(input_ids).logits
        after = layershare.load(tmp_path / "c", runtime="compact")(input_ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_masa_error_falls_with_more_atoms(tokens, input_ids):
    model = make_model("llama")
    with torch.no_grad():
        dense = model(input_ids).logits
    # groups of 2 blocks keep 1 atom (the mean) per type: not exact; check the error falls with more atoms
    errs = []
    for ratio in (0.7, 0.4):
        m = make_model("llama")
        layershare.compress(m, small_recipe(method="masa", ratio=ratio, ratio_of="attention"), data=tokens,
                            allow_ratio_miss=True)  # whole atoms: the tiny model's ratios round by > 1 point
        with torch.no_grad():
            errs.append(float((m(input_ids).logits - dense).pow(2).mean()))
    assert errs[1] < errs[0]


def test_masa_bad_ratios(tokens):
    with pytest.raises(BudgetError, match="feasible range"):
        layershare.compress(make_model("llama"), small_recipe(method="masa", ratio=0.5), data=tokens)
    from layershare.config import RecipeError

    with pytest.raises(RecipeError, match="masa: ratio_of must be 'model' or 'attention'"):
        small_recipe(method="masa", ratio=0.2, ratio_of="mlp")
    with pytest.raises(RecipeError, match="fips: ratio_of must be 'model' or 'mlp'"):
        small_recipe(method="fips", ratio=0.2, ratio_of="attention")


def test_fips_on_mlps_plus_masa_on_attention_in_one_recipe(tokens, input_ids, tmp_path):
    from layershare.methods import FiPSConfig, MASAConfig

    model = make_model("llama")
    dense_total = sum(p.numel() for p in model.parameters())
    dense_attention = sum(p.numel() for b in model.model.layers for p in b.self_attn.parameters())
    recipe = layershare.Recipe(stages=[MASAConfig(ratio=0.5, ratio_of="attention"),
                                       FiPSConfig(ratio=0.2, steps=0, batch_tokens=128)], nsamples=8, seqlen=32)
    res = layershare.compress(model, recipe, data=tokens, output_dir=tmp_path / "c")
    att, mlp = res.report.stages
    assert att.method == "masa" and mlp.method == "fips"
    # the attention stage removed exactly what its plan says: atoms (once) + coefficients + biases
    kept = {id(p): p.numel() for b in model.model.layers for p in b.self_attn.parameters()}  # coefficients, biases
    kept.update({id(p): p.numel() for b in model.model.layers for m in b.self_attn.modules()
                 if hasattr(m, "coef") for p in m.atoms.parameters()})  # each group's atoms, once
    assert (dense_attention - sum(kept.values())) / dense_total == pytest.approx(att.plan.model_ratio, abs=1e-9)
    assert res.sizes.ratio == pytest.approx(att.plan.model_ratio + mlp.plan.model_ratio, abs=1e-6)  # they add up
    loaded = layershare.load(tmp_path / "c", runtime="compact")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
