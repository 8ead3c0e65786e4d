"""Which hidden states a group is tuned on: the dense model's, or the compressed model's so far."""
import pytest
import torch

import layershare
import layershare.pipeline as pipeline
from layershare.api import _calibration

from conftest import make_model, small_recipe


@pytest.mark.parametrize("propagate", ["dense", "compressed"])
def test_propagate_chooses_the_inputs_of_later_groups(propagate, tokens, monkeypatch):
    """Group g's recorded MLP inputs are the dense model's (propagate="dense") or exactly what
    the final compressed model feeds those MLPs (propagate="compressed"): later groups do not
    change earlier blocks, so the final model reproduces the inputs each group saw."""
    recipe = small_recipe(method="fips", ratio=0.3, group_size=2, steps=5, propagate=propagate)
    seen = []
    real = pipeline.reconstruct

    def spy(fns, X, Y, *args, **kw):
        seen.append(X[0].clone())  # the first block of the group: its MLP's input rows
        return real(fns, X, Y, *args, **kw)

    monkeypatch.setattr(pipeline, "reconstruct", spy)
    dense = make_model("llama")
    model = make_model("llama")
    layershare.compress(model, recipe, data=tokens)
    assert len(seen) == 2  # 4 blocks, groups of 2

    def mlp_inputs(m, block):
        rows = []
        hook = m.model.layers[block].mlp.register_forward_pre_hook(
            lambda mod, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for batch in _calibration(tokens, None, recipe, 8):
                m(batch)
        hook.remove()
        return torch.cat(rows)

    compressed_in, dense_in = mlp_inputs(model, 2), mlp_inputs(dense, 2)
    assert torch.allclose(seen[0], mlp_inputs(dense, 0))  # the first group always sees the dense inputs
    assert (compressed_in - dense_in).abs().max() > 1e-3  # the two choices differ here
    expected = compressed_in if propagate == "compressed" else dense_in
    assert torch.allclose(seen[1], expected, atol=1e-5)
