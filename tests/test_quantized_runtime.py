"""Quantized linears held packed at run time (runtime/quantized.py) against dequantize-then-matmul."""
from __future__ import annotations

import pytest
import torch

import layershare
from layershare.quant.grid import QuantSpec, dequantize, quantize
from layershare.runtime import quantized
from layershare.runtime.quantized import Int4Linear, unpack_int4

pytestmark = pytest.mark.skipif(not quantized.available(), reason="PyTorch's int4 CPU kernel is not available")


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (96, 128), (112, 96), (192, 576)])
def test_unpack_reads_pytorchs_layout_back_exactly(n, k):
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n * k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_int4(packed, n, k).to(torch.int32), codes)


def _reference(codes, scales, zeros, group_size):
    """(code - zero) * scale with the scale rounded to bfloat16, as the kernel holds it."""
    k = codes.shape[1]
    s = scales.to(torch.bfloat16).float().repeat_interleave(group_size, dim=1)[:, :k]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]
    return (codes.float() - z) * s


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, True), (2, True), (4, False)])
@pytest.mark.parametrize("k,group", [(576, 128), (256, 64), (96, 32)])  # 576 / 128: a short last group
def test_int4_linear_equals_dequantize_then_matmul(bits, symmetric, k, group):
    torch.manual_seed(0)
    w = torch.randn(64, k) * 0.05
    q = quantize(w, QuantSpec(bits, group, symmetric))
    zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, 2 ** (bits - 1), dtype=torch.uint8)
    bias = torch.randn(64)
    layer = Int4Linear.from_codes(q.codes, q.scales, zeros, group, bits, bias)
    ref_w = _reference(q.codes, q.scales, zeros, group)
    # the kernel's weight is the grid's, up to the scale's rounding to bfloat16 (2**-8 relative)
    assert torch.allclose(ref_w, dequantize(q), rtol=2**-8, atol=0)
    if symmetric or bits < 4:  # prefill's weight: exactly the grid's with a bfloat16 scale
        assert torch.equal(layer.weight_as(torch.float32), ref_w)
    else:  # an asymmetric 4-bit grid's offset is rounded to bfloat16 too
        assert torch.allclose(layer.weight_as(torch.float32), ref_w, rtol=0, atol=2**-8 * ref_w.abs().max())
        ref_w = layer.weight_as(torch.float32)
    for rows in (1, 3, 8, 9, 40):  # decode (kernel, bfloat16 activations) and prefill (dense GEMM)
        x = torch.randn(2, rows, k)
        y = layer(x)
        ref = x @ ref_w.t() + bias
        assert y.shape == ref.shape and y.dtype == x.dtype
        tol = 1e-5 if rows > quantized.DECODE_ROWS else 2e-2  # bfloat16 activations in the kernel
        assert (y - ref).abs().max() <= tol * ref.abs().max(), rows


def test_prefill_scratch_made_under_inference_mode_is_writable_after_it():
    """The dequantization buffer a prompt fills is kept per shape: made first under
    torch.inference_mode, it must still be writable outside it (it was not)."""
    q = quantize(torch.randn(64, 96) * 0.05, QuantSpec(4, 32, True))
    layer = Int4Linear.from_codes(q.codes, q.scales, torch.full_like(q.scales, 8, dtype=torch.uint8), 32, 4, None)
    x = torch.randn(1, 40, 96, dtype=torch.float64)  # a dtype no other test's buffer has
    quantized._scratch.pop((64 * 96, torch.float64, x.device), None)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), first)


def _tiny_quantized(tmp_path, bits=4):
    from layershare import QuantConfig, Recipe
    from layershare.testing import make_model

    model = make_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(stages=[QuantConfig(bits=bits, group_size=32)], nsamples=8, seqlen=32)
    layershare.compress(model, recipe, data=tokens, output_dir=tmp_path / "q")
    return tmp_path / "q", tokens


def test_loaded_quantized_model_keeps_linears_packed_and_computes_the_same(tmp_path):
    path, tokens = _tiny_quantized(tmp_path)
    packed = layershare.load(path)  # runtime "auto" on the CPU
    reference = layershare.load(path, runtime="compact")  # dequantized, as stored
    n = sum(isinstance(m, Int4Linear) for m in packed.modules())
    assert n > 0 and n == packed.layershare_packed
    assert not any(isinstance(m, Int4Linear) for m in reference.modules())
    assert quantized._layout_ok()
    with torch.no_grad():
        for ids in (tokens[:1, :4], tokens[:2]):  # decode-sized and prefill-sized inputs
            a, b = packed(ids).logits, reference(ids).logits
            assert (a - b).abs().max() <= 3e-2 * b.abs().max()
    with pytest.raises(layershare.checkpoint.verify.CheckpointError, match="kept packed for the low-bit kernels"):
        layershare.checkpoint.save.save_compressed(packed, tmp_path / "again")


def test_resident_bytes_of_packed_linears_are_about_half_a_byte_per_weight(tmp_path):
    path, _ = _tiny_quantized(tmp_path)
    model = layershare.load(path)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            assert m.packed.numel() == m.in_features * m.out_features // 2
            assert m.scales_zeros.numel() == 2 * m.out_features * (m.in_features // m.group)


def test_fips_then_quantized_keeps_plain_linears_packed_and_dequantizes_the_rest(tmp_path):
    """Shared bases and V values (1-D) are not plain linears: they are dequantized, the attention's
    linears packed; the model computes what the dequantized one does."""
    from layershare import FiPSConfig, QuantConfig, Recipe
    from layershare.modules.shared_basis import SharedBasisLinear
    from layershare.testing import make_model

    model = make_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(stages=[FiPSConfig(ratio=0.2, steps=0), QuantConfig(bits=4, group_size=32, algorithm="rtn")],
                    nsamples=8, seqlen=32)
    layershare.compress(model, recipe, data=tokens, output_dir=tmp_path / "fq")
    packed = layershare.load(tmp_path / "fq")
    reference = layershare.load(tmp_path / "fq", runtime="compact")
    assert any(isinstance(m, Int4Linear) for m in packed.modules())
    assert any(isinstance(m, SharedBasisLinear) for m in reference.modules())
    with torch.no_grad():
        a, b = packed(tokens[:1, :4]).logits, reference(tokens[:1, :4]).logits
    assert (a - b).abs().max() <= 3e-2 * b.abs().max()


def test_quantized_linears_are_packed_only_for_the_cpu():
    """The int4 kernel is the CPU's: a model loaded for another device is dequantized, not packed
    (a GPU evaluation once met a packed linear's CPU scratch buffer)."""
    from torch import nn

    from layershare.checkpoint.read import pack_quantized

    model = nn.Module()
    assert pack_quantized(model, {"tensors": {"x.weight": {}}}, "auto", "cuda:0") == set()
    assert pack_quantized(model, {"tensors": {"x.weight": {}}}, "compact", "cpu") == set()
    assert not hasattr(model, "layershare_packed")
