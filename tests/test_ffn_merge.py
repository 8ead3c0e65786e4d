"""ffn-merge on tiny models: alignment, exact budget in whole MLPs, window choice, tied save/load."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.compression.budget import BudgetError, count_params
from layershare.methods.ffn_merge import (
    correlation,
    linear_sum_assignment,
    permuted_weights,
)


def test_hungarian_matching_recovers_a_permutation_of_hidden_units():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 40, generator=g)
    perm = torch.randperm(40, generator=g)
    b = a[:, perm] + 0.3 * torch.randn(2048, 40, generator=g)  # unit i of b is unit perm[i] of a
    match = linear_sum_assignment(correlation(a, b).numpy())  # unit of b matched to each unit of a
    assert torch.equal(perm[torch.from_numpy(match)], torch.arange(40))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_permuting_hidden_units_leaves_the_mlp_unchanged(arch):
    from layershare.adapters import get_adapter
    from layershare.adapters.base import get_path

    model = make_model(arch)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    names, roles = list(adapter.linears), list(adapter.linears.values())
    mods = [get_path(block, n) for n in names]
    x = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        before = adapter.mlp_forward(block, x)
        w0 = mods[0].weight.clone()
        perm = torch.randperm(160)
        for m, w in zip(mods, permuted_weights(mods, roles, perm)):
            for key, t in w.items():
                getattr(m, key).data = t
        after = adapter.mlp_forward(block, x)
    assert not torch.equal(mods[0].weight, w0)  # the weights did move
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_removes_whole_mlps_and_round_trips(arch, tokens, input_ids, tmp_path):
    model = make_model(arch)
    total = count_params(model)
    ffn = sum(p.numel() for n, p in model.named_parameters()
              if ".0." in n and any(k in n for k in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "c_fc", "mlp.c_proj")))
    res = layershare.compress(model, small_recipe(method="ffn-merge", ratio=2 * ffn / total), data=tokens,
                              output_dir=tmp_path / "c")
    window = res.report.extra["window"]
    assert len(window) == 3 and window == list(range(window[0], window[0] + 3))
    assert count_params(model) == total - 2 * ffn
    assert res.sizes.ratio == pytest.approx(2 * ffn / total, abs=1e-9)
    assert res.sizes.weight_bytes == res.sizes.dense_bytes - 2 * ffn * 4
    on_disk = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert res.sizes.weight_bytes <= on_disk <= res.sizes.weight_bytes + 32_000  # + the safetensors header
    # the chosen window has the lowest calibration loss among the candidates
    losses = res.report.extra["window_losses"]
    assert len(losses) == 2 and losses[window[0]] == min(losses.values())
    loaded = layershare.load(tmp_path / "c", runtime="compact")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    from layershare.adapters import get_adapter
    blocks = get_adapter(loaded).blocks(loaded)
    name = next(iter(get_adapter(loaded).linears))
    from layershare.adapters.base import get_path
    assert get_path(blocks[window[0]], name) is get_path(blocks[window[-1]], name)
    assert get_path(blocks[window[0]], name) is not get_path(blocks[(window[-1] + 1) % 4], name)


def test_explicit_window_is_used(tokens):
    model = make_model("llama")
    res = layershare.compress(model, small_recipe(method="ffn-merge", window=[1, 2]), data=tokens)
    assert res.report.extra["window"] == [1, 2]
    assert model.model.layers[1].mlp.up_proj is model.model.layers[2].mlp.up_proj


def test_unreachable_ratio_names_the_feasible_range(tokens):
    with pytest.raises(BudgetError, match="feasible range"):
        layershare.compress(make_model("llama"), small_recipe(method="ffn-merge", ratio=0.9), data=tokens)
    with pytest.raises(BudgetError, match="feasible range"):
        layershare.compress(make_model("llama"), small_recipe(method="ffn-merge", ratio=0.01), data=tokens)
