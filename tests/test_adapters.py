import pytest
import torch
from conftest import ARCHS, make_model, small_recipe
from torch import nn

import layershare
from layershare.adapters import UnsupportedModelError, get_adapter
from layershare.modules.shared_basis import SharedBasisLinear


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_without_sparsity_reproduces_dense_logits(arch, tokens, input_ids):
    model = make_model(arch)
    with torch.no_grad():
        dense = model(input_ids).logits
    d = model.config.hidden_size
    result = layershare.compress(model, small_recipe(sparsity=0.0, rank=d), data=tokens)
    n_compressed = sum(isinstance(m, SharedBasisLinear) for m in model.modules())
    adapter = get_adapter(model)
    assert n_compressed == len(adapter.blocks(model)) * len(adapter.linears)
    with torch.no_grad():
        comp = model(input_ids).logits
    torch.testing.assert_close(comp, dense, atol=2e-5, rtol=1e-5)
    assert all(g.stats.rel_err_before < 1e-10 for g in result.report.groups)


def test_unknown_architecture_lists_supported():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="Supported model types: .*gpt2.*llama"):
        layershare.compress(Toy(), data=torch.arange(100))


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_pre_hooks_capture_all_keyword_arguments(arch, tokens):
    """Blocks are re-run with exactly the keyword arguments the model passed (masks, rope, ...)."""
    from layershare.compression.capture import capture_inputs

    model = make_model(arch)
    blocks = get_adapter(model).blocks(model)
    seen = []
    handle = blocks[1].register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    batch = tokens[:64].view(2, 32)
    model(batch)
    handle.remove()
    cap = capture_inputs(model, blocks, [batch], "cpu")
    _, kw = cap.args[0][1]
    assert set(kw) >= seen[0] - {"hidden_states"}
    assert len(cap.hidden) == 1 and cap.hidden[0].shape == (2, 32, 64)
