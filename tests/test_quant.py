"""The quantization core: true-width packing, group-wise grids, fake quantization, storage, GPTQ."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from layershare.quant import (
    BITS,
    SingularHessianError,
    QuantSpec,
    dequantize,
    fake_quantize,
    from_tensors,
    gptq,
    gptq_masked,
    pack,
    quantize,
    stored_bits,
    to_tensors,
    unpack,
)
from layershare.quant.grid import choose_qparams, decode, encode

SPECS = [QuantSpec(b, g, sym) for b in BITS for g in (32, 7) for sym in (True, False)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- pack -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 7, 1001])
def test_pack_round_trip_at_true_width(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=_gen(n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == -(-bits * n // 8)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_layout_is_a_little_endian_bit_stream():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)  # any shape, read row-major
    stream = int.from_bytes(bytes(pack(codes, 3).tolist()), "little")
    assert stream == sum(c << (3 * k) for k, c in enumerate([1, 2, 3, 4, 5, 6]))
    assert pack(codes, 3).numel() == 3  # 18 bits


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_pack_refuses_unsupported_widths(bits):
    with pytest.raises(ValueError, match="allowed are 2, 3, 4, 8"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="allowed are 2, 3, 4, 8"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_pack_refuses_codes_out_of_range_and_bad_streams():
    with pytest.raises(ValueError, match=r"out of range for 3 bits.*\[0, 7\]"):
        pack(torch.tensor([0, 8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([-1, 2]), 4)
    with pytest.raises(ValueError, match="integer"):
        pack(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 3, 5)


# ---- spec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 5, 16, True])
def test_spec_refuses_widths_that_cannot_be_stored(bits):
    with pytest.raises(ValueError, match="allowed are 2, 3, 4, 8"):
        QuantSpec(bits, 32, True)


@pytest.mark.parametrize("group_size", [0, -1, 1.5])
def test_spec_refuses_group_sizes(group_size):
    with pytest.raises(ValueError, match="positive integer"):
        QuantSpec(4, group_size, True)


# ---- quantize / dequantize -------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_error_within_half_a_step_with_short_last_group(spec):
    w = torch.randn(3, 5, 100, generator=_gen(1)) * torch.logspace(-3, 1, 5)[:, None]
    w[0, 0, :40] = 0  # one whole group of zeros, and a group with zeros in it
    q = quantize(w, spec)
    groups = -(-100 // spec.group_size)
    assert q.codes.shape == w.shape and q.codes.dtype == torch.uint8 and int(q.codes.max()) <= spec.maxq
    assert q.scales.shape == (3, 5, groups) and q.scales.dtype == torch.float16
    assert (q.zeros is None) == spec.symmetric
    if q.zeros is not None:
        assert q.zeros.shape == (3, 5, groups) and int(q.zeros.max()) <= spec.maxq
    step = q.scales.float().repeat_interleave(spec.group_size, -1)[..., :100]
    err = (dequantize(q) - w).abs()
    assert dequantize(q).dtype == torch.float32
    assert (err <= step / 2).all()
    assert (dequantize(q)[w == 0] == 0).all()  # zero is on both grids


def _shrunk_grid_error(w: torch.Tensor, p: float, spec: QuantSpec) -> torch.Tensor:
    """Each row's sum of |w - w_hat|^2.4 on the min/max grid of the row with its range times p
    (written from the definition: the range [p min(w, 0), p max(w, 0)] as the reference shrinks it)."""
    lo, hi = p * w.amin(-1).clamp_max(0), p * w.amax(-1).clamp_min(0)
    half = lambda x: x.clamp_min(2.0**-24).to(torch.float16)  # noqa: E731
    if spec.symmetric:
        scale = half(torch.maximum(-lo, hi) / (spec.maxq / 2))
        want = torch.maximum(-lo, hi) / (spec.maxq / 2)
    else:
        scale = half((hi - lo) / spec.maxq)
        want = (hi - lo) / spec.maxq
    scale = torch.where(scale.float() < want, torch.nextafter(scale, torch.tensor(65504.0, dtype=torch.float16)), scale)
    zero = None if spec.symmetric else torch.round(-lo / scale.float()).clamp(0, spec.maxq)
    z = 2 ** (spec.bits - 1) if zero is None else zero[:, None]
    codes = (torch.round(w / scale.float()[:, None]) + z).clamp(0, spec.maxq)
    return ((codes - z) * scale.float()[:, None] - w).abs().pow(2.4).sum(-1)


@pytest.mark.parametrize("spec", [QuantSpec(3, 64, False, "mse"), QuantSpec(4, 64, True, "mse")], ids=str)
def test_mse_observer_keeps_the_best_of_the_reference_s_shrink_factors(spec):
    """The chosen range is the shrink factor (1.0 .. 0.21, step 0.01) of least |err|^2.4 per
    group; on heavy-tailed weights it clips outliers and beats min/max, never loses to it."""
    torch.manual_seed(3)
    w = torch.distributions.StudentT(2.0).sample((40, 64))
    q, plain = quantize(w, spec), quantize(w, QuantSpec(spec.bits, 64, spec.symmetric))
    err = lambda t: (dequantize(t) - w).abs().pow(2.4).sum(-1)  # noqa: E731
    candidates = torch.stack([_shrunk_grid_error(w, 1 - i / 100, spec) for i in range(80)])
    torch.testing.assert_close(err(q), candidates.amin(0), rtol=1e-5, atol=0)
    assert (err(q) <= err(plain) * (1 + 1e-6)).all() and err(q).sum() < 0.95 * err(plain).sum()
    assert q.spec == plain.spec  # the observer is not part of the stored format
    assert ((dequantize(q) - w).abs() > q.scales.float() / 2 * 1.001).any()  # outliers were clipped


def test_mse_observer_ignores_the_short_last_group_s_padding():
    spec = QuantSpec(4, 32, False, "mse")
    torch.manual_seed(4)
    w = torch.distributions.StudentT(2.0).sample((6, 70))
    q, tail = quantize(w, spec), quantize(w[:, 64:], spec)
    assert torch.equal(q.codes[:, 64:], tail.codes) and torch.equal(q.scales[:, 2], tail.scales[:, 0])
    assert torch.equal(q.zeros[:, 2], tail.zeros[:, 0])


def test_spec_refuses_unknown_observers():
    with pytest.raises(ValueError, match="observer must be one of minmax, mse, got 'percentile'"):
        QuantSpec(4, 32, True, "percentile")


def test_the_grids_are_gptq_s():
    w = torch.tensor([[-1.0, 0.5, 0.25, 3.0]])
    sym = quantize(w, QuantSpec(4, 4, True))  # absmax / 7.5, levels -8..7, codes offset by 8
    assert sym.scales.item() == pytest.approx(3.0 / 7.5, rel=1e-3)
    assert sym.codes.tolist() == [[6, 9, 9, 15]]  # 3.0 / 0.4 = 7.5 clips to 7 (half a step)
    asym = quantize(w, QuantSpec(2, 4, False))  # [min, max] in 3 steps, integer zero point
    assert asym.scales.item() == pytest.approx(4.0 / 3, rel=1e-3) and asym.zeros.tolist() == [[1]]
    assert asym.codes.tolist() == [[0, 1, 1, 3]]


def test_matches_torchao_affine_arithmetic():
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    w = torch.randn(8, 128, generator=_gen(2))
    for spec in (QuantSpec(4, 32, True), QuantSpec(3, 64, False), QuantSpec(8, 32, False)):
        q = quantize(w, spec)
        qmin, qmax = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (0, spec.maxq)
        zero = torch.zeros_like(q.scales, dtype=torch.int32) if spec.symmetric else q.zeros.to(torch.int32)
        if spec.symmetric:  # ours are torchao's scales rounded up to the next float16
            scale, _ = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, (1, 32), torch.int8, qmin, qmax,
                                                scale_dtype=torch.float32)
            below = torch.nextafter(q.scales, torch.tensor(0.0, dtype=torch.float16)).float()
            assert (q.scales.float() >= scale.view(8, -1)).all() and (below < scale.view(8, -1)).all()
        args = ((1, spec.group_size), q.scales.float(), zero, torch.int32, qmin, qmax)
        ref = qp.quantize_affine(w, *args)
        assert torch.equal(ref - qmin, q.codes.to(torch.int32))
        assert torch.equal(qp.dequantize_affine(ref, *args), dequantize(q))


def test_refuses_weights_beyond_float16_scales():
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.tensor([[1e6, 0.0]]), QuantSpec(4, 2, True))
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.tensor([[float("nan"), 0.0]]), QuantSpec(4, 2, False))


# ---- fake quantization -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_fake_quantize_is_dequantize_of_quantize_with_identity_gradient(spec):
    w = torch.randn(6, 100, generator=_gen(3), requires_grad=True)
    out = fake_quantize(w, spec)
    assert torch.equal(out, dequantize(quantize(w.detach(), spec)))
    upstream = torch.randn(6, 100, generator=_gen(4))
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


# ---- storage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_safetensors_round_trip_and_stored_bits(spec, tmp_path):
    shape = (5, 3, 101)
    q = quantize(torch.randn(*shape, generator=_gen(5)), spec)
    tensors = to_tensors(q, "layers.0.up.weight")
    names = {f"layers.0.up.weight.{k}" for k in ("codes", "scales") + (() if spec.symmetric else ("zeros",))}
    assert set(tensors) == names
    save_file(tensors, tmp_path / "q.safetensors")
    back = from_tensors(load_file(tmp_path / "q.safetensors"), "layers.0.up.weight", spec, shape)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert (back.zeros is None and q.zeros is None) or torch.equal(back.zeros, q.zeros)
    assert torch.equal(dequantize(back), dequantize(q))
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert 0 <= stored - stored_bits(shape, spec) < 8 * len(tensors)


def test_from_tensors_refuses_missing_or_malformed_tensors():
    spec = QuantSpec(3, 32, False)
    tensors = to_tensors(quantize(torch.randn(4, 64, generator=_gen(6)), spec), "w")
    with pytest.raises(ValueError, match="missing quantized tensors: w.zeros"):
        from_tensors({k: v for k, v in tensors.items() if k != "w.zeros"}, "w", spec, (4, 64))
    with pytest.raises(ValueError, match="w.scales"):
        from_tensors(tensors, "w", spec, (4, 96))
    with pytest.raises(ValueError, match="bytes"):
        from_tensors(tensors, "w", QuantSpec(4, 32, False), (4, 64))


# ---- GPTQ ------------------------------------------------------------------------------------

def _correlated_inputs(rows: int, n: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(rows, n, generator=g) @ torch.randn(n, n, generator=g) + torch.randn(n, generator=g)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 24, False), QuantSpec(2, 100, False),
                                  QuantSpec(3, 24, False, "mse")], ids=str)
def test_gptq_with_identity_hessian_is_rtn(spec):
    w = torch.randn(16, 100, generator=_gen(7))
    got, rtn = gptq(w, torch.eye(100, dtype=torch.float64), spec, blocksize=40), quantize(w, spec)
    assert torch.equal(got.codes, rtn.codes) and torch.equal(got.scales, rtn.scales)
    assert (got.zeros is None and rtn.zeros is None) or torch.equal(got.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(bits, symmetric):
    X = _correlated_inputs(512, 64, seed=8)
    w = torch.randn(48, 64, generator=_gen(9))
    spec = QuantSpec(bits, 32, symmetric)
    errors = [(X @ (w - dequantize(q)).T).norm() for q in (quantize(w, spec), gptq(w, X.T.double() @ X.double(), spec))]
    assert errors[1] < 0.9 * errors[0]


def _textbook_gptq(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float = 0.01):
    """GPTQ without lazy batches: quantize column j, subtract its error times row j of the upper
    Cholesky factor of the dampened H^-1 from the remaining columns."""
    H = H.double().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True).float()
    W, Q = w.clone(), torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % spec.group_size == 0:
            scale, zero = choose_qparams(W[:, j : j + spec.group_size], spec)
        Q[:, j] = decode(encode(W[:, j], scale, zero, spec), scale, zero, spec)
        W[:, j:] -= ((W[:, j] - Q[:, j]) / U[j, j])[:, None] * U[j, j:][None, :]
    return Q


@pytest.mark.parametrize("blocksize", [1, 5, 128])
@pytest.mark.parametrize("spec", [QuantSpec(3, 6, False), QuantSpec(4, 16, True), QuantSpec(3, 6, False, "mse")],
                         ids=lambda s: f"{s}-{s.observer}")
def test_gptq_matches_the_textbook_algorithm(spec, blocksize):
    X = _correlated_inputs(64, 16, seed=10)
    H = X.T.double() @ X.double()
    w = torch.randn(8, 16, generator=_gen(11))
    torch.testing.assert_close(dequantize(gptq(w, H, spec, blocksize=blocksize)), _textbook_gptq(w, H, spec))


def test_gptq_dead_inputs_and_bad_arguments():
    X = _correlated_inputs(64, 16, seed=12)
    X[:, 3] = 0  # input 3 never fires: its weights are zeroed
    w = torch.randn(8, 16, generator=_gen(13))
    out = dequantize(gptq(w, X.T @ X, QuantSpec(4, 8, False)))
    assert torch.isfinite(out).all() and (out[:, 3] == 0).all()
    with pytest.raises(ValueError, match="in x in Hessian"):
        gptq(w, torch.eye(8), QuantSpec(4, 8, True))
    with pytest.raises(SingularHessianError, match="singular after dampening"):
        gptq(w, -torch.eye(16), QuantSpec(4, 8, True))
    low_rank = X[:8].T @ X[:8]  # 8 inputs for 16 features: singular without dampening
    with pytest.raises(SingularHessianError, match="singular after dampening"):
        gptq(w, low_rank, QuantSpec(4, 8, True), percdamp=0)
    assert torch.isfinite(dequantize(gptq(w, low_rank, QuantSpec(4, 8, True)))).all()  # dampened: fine
    with pytest.raises(SingularHessianError, match="inf or NaN"):
        gptq(w, torch.full((16, 16), float("nan")), QuantSpec(4, 8, True))


def _textbook_act_order(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float = 0.01):
    """Act-order GPTQ with static groups: every group's grid from w, then the textbook algorithm
    on the columns sorted by decreasing H_jj, each on its own group's grid."""
    perm = torch.argsort(H.diagonal(), descending=True)
    scales = [choose_qparams(w[:, i : i + spec.group_size], spec) for i in range(0, w.shape[1], spec.group_size)]
    H = H[perm][:, perm].double().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True).float()
    W, Q = w[:, perm].clone(), torch.empty_like(w)
    for j in range(w.shape[1]):
        scale, zero = scales[int(perm[j]) // spec.group_size]
        Q[:, perm[j]] = decode(encode(W[:, j], scale, zero, spec), scale, zero, spec)
        W[:, j:] -= ((W[:, j] - Q[:, perm[j]]) / U[j, j])[:, None] * U[j, j:][None, :]
    return Q


@pytest.mark.parametrize("blocksize", [1, 5, 128])
@pytest.mark.parametrize("spec", [QuantSpec(3, 6, False), QuantSpec(4, 16, True)], ids=str)
def test_act_order_keeps_the_layout_and_matches_the_textbook(spec, blocksize):
    X = _correlated_inputs(64, 16, seed=14) * torch.linspace(0.2, 3, 16)  # distinct energies per input
    H = X.T.double() @ X.double()
    w = torch.randn(8, 16, generator=_gen(15))
    q = gptq(w, H, spec, blocksize=blocksize, act_order=True)
    rtn = quantize(w, spec)  # static groups: RTN's grids, in the natural layout
    assert q.codes.shape == rtn.codes.shape and torch.equal(q.scales, rtn.scales)
    torch.testing.assert_close(dequantize(q), _textbook_act_order(w, H, spec))
    same = gptq(w, torch.eye(16, dtype=torch.float64), spec, act_order=True)  # no correlation: RTN
    assert torch.equal(same.codes, rtn.codes)


@pytest.mark.parametrize("act_order", [False, True])
def test_masked_gptq_with_every_entry_kept_is_gptq(act_order):
    """The sparse path with a full pattern in row-major order (groups dividing the rows) is the
    dense algorithm; with a pattern, the pruned entries are never stored."""
    X = _correlated_inputs(64, 16, seed=16)
    H = X.T.double() @ X.double()
    w = torch.randn(8, 16, generator=_gen(17))
    spec = QuantSpec(3, 8, False)
    q = gptq_masked(w, H, spec, torch.arange(8 * 16), act_order=act_order)
    want = _textbook_act_order(w, H, spec) if act_order else _textbook_gptq(w, H, spec)
    torch.testing.assert_close(dequantize(q).view(8, 16), want)
    keep = torch.rand(8, 16, generator=_gen(18)) < 0.4
    stored = keep.flatten().nonzero().squeeze(1)
    q = gptq_masked(w * keep, H, spec, stored, act_order=act_order)
    assert q.codes.shape == (stored.numel(),) and q.scales.shape == (spec.groups(stored.numel()),)
