"""The SVD-family peers on tiny models: exactness at full rank, whitening helps, budget, round trip."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.methods.lowrank import refit_output, whitened_factors

PEERS = ["svd", "svd-llm", "basis-sharing"]


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_full_rank_reproduces_dense_logits(method, arch, tokens, input_ids):
    model = make_model(arch)
    with torch.no_grad():
        dense = model(input_ids).logits
    layershare.compress(model, small_recipe(method=method, rank=model.config.hidden_size), data=tokens)
    with torch.no_grad():
        comp = model(input_ids).logits
    torch.testing.assert_close(comp, dense, atol=1e-4, rtol=1e-4)


def test_whitening_lowers_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -3, 32)  # strongly correlated inputs
    X = torch.randn(4096, 32, generator=g) @ mix
    W = torch.randn(32, 48, generator=g)
    gram = (X.t().double() @ X.double()) / X.shape[0]
    for rank in (4, 8, 16):
        A0, B0 = whitened_factors(W, None, rank)
        A1, B1 = whitened_factors(W, gram, rank)
        err = lambda A, B: float((X.double() @ (W.double() - A @ B)).norm())  # noqa: E731
        assert err(A1, B1) < 0.9 * err(A0, B0)
    # at full rank both are exact
    A, B = whitened_factors(W, gram, 32)
    torch.testing.assert_close((A @ B).float(), W, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peer_budget_and_round_trip(method, arch, tokens, input_ids, tmp_path):
    model = make_model(arch)
    res = layershare.compress(model, small_recipe(method=method, ratio=0.2), data=tokens,
                              output_dir=tmp_path / "c")
    assert abs(res.sizes.ratio - 0.2) < 0.01
    assert res.sizes.index_bytes == 0  # dense factors: no sparse index
    on_disk = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert res.sizes.weight_bytes <= on_disk <= res.sizes.weight_bytes + 32_000
    with torch.no_grad():
        before = model(input_ids).logits
        after = layershare.load(tmp_path / "c", runtime="compact")(input_ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_whitened_methods_beat_plain_svd_on_calibration_outputs(tokens):
    errs = {}
    for method in PEERS:
        res = layershare.compress(make_model("llama"), small_recipe(method=method, ratio=0.2), data=tokens)
        errs[method] = sum(g.stats.rel_err_before for g in res.report.groups)
    assert errs["svd-llm"] < errs["svd"]
    assert errs["basis-sharing"] < errs["svd"]


def test_refit_output_is_the_least_squares_fit_on_the_new_inputs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)
    X = torch.randn(4096, 32, generator=g) @ mix
    Xc = X + 0.3 * torch.randn(4096, 32, generator=g)  # the inputs once earlier layers are compressed
    W = torch.randn(32, 48, generator=g).double()
    gram = lambda Z: (Z.t().double() @ Z.double()) / Z.shape[0]  # noqa: E731
    A, B = whitened_factors(W, gram(X), 8)
    # on the inputs it was whitened for, the truncation is already the least-squares output side
    torch.testing.assert_close(refit_output(A, W, gram(X)), B, atol=1e-4, rtol=1e-3)  # up to the ridges
    B1 = refit_output(A, W, gram(Xc))
    expected = torch.linalg.lstsq(Xc.double() @ A, Xc.double() @ W).solution
    torch.testing.assert_close(B1, expected, atol=1e-6, rtol=1e-5)
    err = lambda B_: float((Xc.double() @ (W - A @ B_)).norm())  # noqa: E731
    assert err(B1) < err(B)


@pytest.mark.parametrize("method", ["svd-llm", "basis-sharing"])
def test_closed_form_update_on_compressed_inputs(method, tokens, input_ids, tmp_path):
    """svd-llm's optional update and basis-sharing's (on by default from ratio 0.4): the first
    group sees no compressed layer before it, so it is unchanged; later groups are refitted,
    the budget is unchanged, the model's error on the calibration text drops, and it round-trips."""
    dense = make_model("llama")
    calib = tokens[: 8 * 32].reshape(8, 32)
    with torch.no_grad():
        target = dense(calib).logits
    out = {}
    for update in (False, True):
        model = make_model("llama")
        res = layershare.compress(model, small_recipe(method=method, ratio=0.4, group_size=1, update=update),
                                  data=tokens, output_dir=tmp_path / str(update))
        assert abs(res.sizes.ratio - 0.4) < 0.01
        with torch.no_grad():
            err = float((model(calib).logits - target).norm())
        out[update] = (model, err)
    off, on = out[False][0].state_dict(), out[True][0].state_dict()
    first = [k for k in off if ".layers.0." in k or "bases.s0_g0_" in k]
    later = [k for k in off if ".layers.1.mlp" in k]
    assert first and later
    for k in first:
        torch.testing.assert_close(on[k], off[k], atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(on[k], off[k], atol=1e-4) for k in later)
    assert out[True][1] < out[False][1]
    with torch.no_grad():
        reloaded = layershare.load(tmp_path / "True", runtime="compact")(input_ids).logits
        torch.testing.assert_close(reloaded, out[True][0](input_ids).logits, atol=0, rtol=0)


def test_full_rank_update_stays_exact(tokens, input_ids):
    model = make_model("llama")
    with torch.no_grad():
        dense = model(input_ids).logits
    layershare.compress(model, small_recipe(method="svd-llm", rank=model.config.hidden_size, update=True), data=tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, dense, atol=1e-4, rtol=1e-4)
