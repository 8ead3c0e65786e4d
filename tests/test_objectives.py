"""Reconstruction targets: what is recorded is what the compressed model recomputes."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.adapters import get_adapter
from layershare.compression.capture import capture_inputs, run_group
from layershare.compression.objectives import Objective
from layershare.config import RecipeError


def _record(model, tokens, name):
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    cap = capture_inputs(model, blocks, [tokens[:64].view(2, 32)], "cpu", adapter)
    objective = Objective(name, adapter)
    X, Y, _ = run_group(blocks, [0, 1], cap, adapter, "cpu", record=True, objective=objective)
    return adapter, blocks, objective, X, Y


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_residual_objective_records_the_post_norm_mlp_output(arch, tokens):
    """Gemma-2/3: "residual" targets are the MLP output after post_feedforward_layernorm, "mlp"
    targets the raw output; the objective's forward recomputes exactly what was recorded."""
    model = make_model(arch)
    _, blocks, res, X, Y = _record(model, tokens, "residual")
    _, _, mlp, Xm, Ym = _record(model, tokens, "mlp")
    with torch.no_grad():
        for j, b in enumerate([0, 1]):
            torch.testing.assert_close(X[j], Xm[j])  # same inputs
            block = blocks[b]
            torch.testing.assert_close(Y[j], block.post_feedforward_layernorm(block.mlp(X[j])))
            torch.testing.assert_close(Ym[j], block.mlp(X[j]))
            torch.testing.assert_close(res.forward(block, X[j]), Y[j])
            assert (Y[j] - Ym[j]).abs().max() > 1e-2  # the norm matters in these models


def test_residual_objective_is_the_mlp_objective_without_a_post_norm(tokens):
    model = make_model("llama")
    *_, Y = _record(model, tokens, "residual")
    *_, Ym = _record(model, tokens, "mlp")
    for a, b in zip(Y, Ym):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_residual_objective_tunes_gemma3(tokens):
    model = make_model("gemma3")
    res = layershare.compress(model, small_recipe(ratio=0.1, steps=30, lr=1e-3, objective="residual"),
                              data=tokens)
    assert all(g.stats.rel_err_after < g.stats.rel_err_before for g in res.report.groups)


def test_unknown_objective_is_refused():
    with pytest.raises(RecipeError, match="objective must be"):
        small_recipe(objective="logits")


def test_recorded_grams_are_the_inputs_second_moments(tokens):
    """run_group's Gram matrices are E[x x^T] of each linear's input (gate and up share theirs: one tensor)."""
    model = make_model("llama")
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    cap = capture_inputs(model, blocks, [tokens[:64].view(2, 32), tokens[64:128].view(2, 32)], "cpu", adapter)
    linears = {f"{b}.{name}": m for b in (0, 1) for name, m in adapter.mlp_linears(blocks[b]).items()}
    grams: dict = {}
    X, _, _ = run_group(blocks, [0, 1], cap, adapter, "cpu", record=True, grams=grams, linears=linears)
    for j in (0, 1):
        x = X[j].double()
        expected = x.t() @ x / x.shape[0]
        torch.testing.assert_close(grams[f"{j}.mlp.gate_proj"], expected)
        torch.testing.assert_close(grams[f"{j}.mlp.up_proj"], expected)
        # gate and up read one tensor: one product per batch, one second moment for both
        assert grams[f"{j}.mlp.up_proj"] is grams[f"{j}.mlp.gate_proj"]
        assert grams[f"{j}.mlp.down_proj"] is not grams[f"{j}.mlp.gate_proj"]
        mlp = blocks[j].mlp
        with torch.no_grad():
            h = (mlp.act_fn(mlp.gate_proj(X[j])) * mlp.up_proj(X[j])).double()
        torch.testing.assert_close(grams[f"{j}.mlp.down_proj"], h.t() @ h / h.shape[0], rtol=1e-5, atol=1e-6)


class _Chained(torch.nn.Module):
    """Blocks that pass state along (each block's `bias` argument is the previous block's output
    mean), as models with a position bias returned by their first block do."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, hidden_states, bias=None):
            return self.lin(hidden_states) + (0 if bias is None else bias)

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(self.Block() for _ in range(3))

    def forward(self, x):
        h, bias = x, None
        for b in self.layers:
            h = b(h, bias=bias)
            bias = h.mean()
        return h


class _CallAdapter:
    def call(self, model, batch):
        return model(batch)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_skips_the_blocks_exactly_when_arguments_do_not_depend_on_them(arch, tokens):
    """Skipping the blocks while capturing records exactly what the full forward records (the
    check the in-memory capture makes before it skips them)."""
    from layershare.compression.capture import arguments_independent

    model = make_model(arch)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    batch = tokens[:64].view(2, 32)
    assert arguments_independent(model, blocks, batch, "cpu", adapter)
    full = capture_inputs(model, blocks, [batch], "cpu", adapter)
    skipped = capture_inputs(model, blocks, [batch], "cpu", adapter, skip_blocks=True)
    torch.testing.assert_close(skipped.hidden, full.hidden, rtol=0, atol=0)
    for b in range(len(blocks)):
        torch.testing.assert_close(skipped.args[0][b], full.args[0][b], rtol=0, atol=0)


def test_capture_runs_the_blocks_when_their_arguments_depend_on_them():
    from layershare.compression.capture import arguments_independent

    model = _Chained()
    assert not arguments_independent(model, model.layers, torch.randn(2, 5, 4), "cpu", _CallAdapter())

