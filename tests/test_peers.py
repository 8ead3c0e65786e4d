"""The SVD-family peers on tiny models: exactness at full rank, whitening helps, budget, round trip."""
import pytest
import torch

import layershare
from layershare.methods.lowrank import whitened_factors

from conftest import make_model, small_recipe

PEERS = ["svd", "svd-llm", "basis-sharing"]


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_full_rank_reproduces_dense_logits(method, arch, tokens, input_ids):
    model = make_model(arch)
    with torch.no_grad():
        dense = model(input_ids).logits
    layershare.compress(model, small_recipe(method=method, extra={"rank": model.config.hidden_size}), data=tokens)
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
        after = layershare.load(tmp_path / "c")(input_ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_whitened_methods_beat_plain_svd_on_calibration_outputs(tokens):
    errs = {}
    for method in PEERS:
        res = layershare.compress(make_model("llama"), small_recipe(method=method, ratio=0.2), data=tokens)
        errs[method] = sum(g.stats.rel_err_before for g in res.report.groups)
    assert errs["svd-llm"] < errs["svd"]
    assert errs["basis-sharing"] < errs["svd"]
