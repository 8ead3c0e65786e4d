"""Group-wise weight-only integer quantization (RTN), its fake-quantized form for QAT, and its
storage as tensors.

Groups run along the last axis (the input dimension of an out x in weight): each row is cut into
groups of `group_size` consecutive entries, the last one shorter when `group_size` does not
divide the row, and each group gets its own scale (and zero point when asymmetric). The grids
are those of GPTQ's reference quantizer, compressed-tensors (llm-compressor) and torchao's
`choose_qparams_affine`:

- symmetric (absmax): scale = max|w| / ((2**b - 1) / 2), levels -2**(b-1) .. 2**(b-1) - 1 times
  the scale (stored as codes offset by 2**(b-1), so codes are in [0, 2**b)); the largest
  positive value may clip by half a step (+7.5 -> +7 at 4 bits), as in those three.
- asymmetric (min/max affine): the range [min(w, 0), max(w, 0)] is split into 2**b - 1 steps,
  scale = (max - min) / (2**b - 1), an integer zero point z = round(-min / scale) in
  [0, 2**b - 1], and w ~ (code - z) * scale; 0 is exactly representable in both.

code = clamp(round(w * (1 / scale)) + z, 0, 2**b - 1) and w_hat = (code - z) * scale, in float32,
with torchao's `quantize_affine` / `dequantize_affine` arithmetic (a test checks that the two agree
bit for bit when torchao is installed).

Scales are stored in float16 (as GPTQ/AWQ checkpoints do: 16 bits per group), rounded UP to the
next float16 so that no value clips by more than half a step; codes are computed with the stored
scale, so dequantize(quantize(w)) is exactly what the stored tensors reproduce and
|w - w_hat| <= scale / 2 for every entry. A group of zeros gets the smallest float16 scale.

torchao (0.18) is not used for the arithmetic itself: its block-wise reduction requires the group
size to divide the row (no short last group), its fake quantization is private
(`_fake_quantize_affine`) and, through the clamp, passes no gradient to clipped entries (not a
pure straight-through estimator), and it is not a dependency of layershare (its wheel also
carries CUDA extensions that fail to load on a CPU torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layershare.quant.pack import check_bits, pack, unpack

OBSERVERS = ("minmax", "mse")
# the GPTQ reference quantizer's search (quant.py, find_params with mse=True): shrink factors 1 - i / 100, i < 80
_MSE_NORM, _MSE_GRID, _MSE_MAXSHRINK = 2.4, 100, 0.8
SCALE_DTYPE = torch.float16
SCALE_BITS = torch.finfo(SCALE_DTYPE).bits
_SMALLEST_SCALE = 2.0**-24  # the smallest positive float16 (a subnormal): the scale of a group of zeros


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: `bits` per code (one of pack.BITS), `group_size` consecutive
    entries of the last axis per scale, and a `symmetric` (absmax) or asymmetric (min/max,
    integer zero point) grid. `observer` says how a group's range is chosen, not how it is
    stored (so it takes no part in equality): "minmax" spans the group's extremes; "mse"
    shrinks them towards 0 by the factor (1.0, 0.99, ..., 0.21) whose grid has the smallest
    sum of |w - w_hat|^2.4 over the group (the GPTQ reference quantizer's `mse` search, its
    norm 2.4, grid 100, maxshrink 0.8; llm-compressor's MSE observer), trading clipped
    outliers for a finer step."""

    bits: int
    group_size: int
    symmetric: bool
    observer: str = field(default="minmax", compare=False)

    def __post_init__(self):
        check_bits(self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer (e.g. 32, 64, 128), got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")

    @property
    def maxq(self) -> int:
        """The largest code."""
        return 2**self.bits - 1

    def groups(self, n: int) -> int:
        """Groups in a row of n entries (the last one may be shorter)."""
        return -(-n // self.group_size)


@dataclass(frozen=True)
class QTensor:
    """A quantized weight: `codes` (uint8, the weight's shape), `scales` (float16, [..., groups]),
    `zeros` (uint8 zero points, [..., groups]; None when symmetric, whose zero is 2**(bits-1))."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def choose_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float16) and zero point (uint8, None when symmetric) of groups laid along the last
    axis of `w`: one per row of `w[..., k]`, whatever k (the whole last axis is one group)."""
    w = w.detach().float()
    lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
    if spec.observer == "minmax":
        return _grid(lo, hi, spec)
    # zeros (the padding of a short last group) cost nothing on any candidate grid: 0 is exact on each
    best = _grid(lo, hi, spec)
    best_err = _error(w, best, spec)
    for i in range(1, int(_MSE_MAXSHRINK * _MSE_GRID)):
        p = 1 - i / _MSE_GRID
        cand = _grid(p * lo, p * hi, spec)
        err = _error(w, cand, spec)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = tuple(None if b is None else torch.where(better, c, b) for b, c in zip(best, cand))
    return best


def _grid(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of the grid spanning [lo, hi] (lo <= 0 <= hi)."""
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / (spec.maxq / 2)
    else:
        scale = (hi - lo) / spec.maxq
    scale = _round_up_to_half(scale.clamp_min(_SMALLEST_SCALE))
    if spec.symmetric:
        return scale, None
    zero = torch.round(-lo / scale.float()).clamp(0, spec.maxq).to(torch.uint8)
    return scale, zero


def _error(w: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor | None], spec: QuantSpec) -> torch.Tensor:
    """Each group's sum of |w - w_hat|^norm on `grid` (the MSE observer's criterion)."""
    scale, zero = grid[0][..., None], None if grid[1] is None else grid[1][..., None]
    return (decode(encode(w, scale, zero, spec), scale, zero, spec) - w).abs_().pow_(_MSE_NORM).sum(-1)


def _round_up_to_half(scale: torch.Tensor) -> torch.Tensor:
    """Positive float32 scales rounded up to the next float16 (a smaller scale would clip)."""
    half = scale.to(SCALE_DTYPE)
    half = (half.view(torch.int16) + (half.float() < scale).to(torch.int16)).view(SCALE_DTYPE)
    if not torch.isfinite(half).all():
        raise ValueError("weights out of range for float16 scales: non-finite, or |w| too large (scale above 65504)")
    return half


def _zero_point(zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | float:
    return float(2 ** (spec.bits - 1)) if zeros is None else zeros.float()


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes (uint8) of `w` on the grid (scale, zero), both broadcast against `w`."""
    q = torch.round(w.detach().float() * (1.0 / scale.float())) + _zero_point(zero, spec)
    return q.clamp(0, spec.maxq).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """float32 values (code - zero) * scale, scale and zero broadcast against the codes."""
    return (codes.float() - _zero_point(zero, spec)) * scale.float()


def _per_entry(params: torch.Tensor, spec: QuantSpec, n: int) -> torch.Tensor:
    """Per-group parameters [..., groups] repeated over the entries of their groups [..., n]."""
    return params.repeat_interleave(spec.group_size, dim=-1)[..., :n]


def quantize(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Round-to-nearest group-wise quantization of `w` [..., n] (groups along the last axis)."""
    if w.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one axis (groups run along the last)")
    n = w.shape[-1]
    g = spec.group_size
    padded = torch.nn.functional.pad(w.detach().float(), (0, -n % g))  # zeros change no group's range
    scales, zeros = choose_qparams(padded.unflatten(-1, (-1, g)), spec)
    codes = encode(w, _per_entry(scales, spec, n), None if zeros is None else _per_entry(zeros, spec, n), spec)
    return QTensor(codes, scales, zeros, spec)


def dequantize(q: QTensor) -> torch.Tensor:
    """The float32 weight a QTensor stands for."""
    n = q.shape[-1]
    zeros = None if q.zeros is None else _per_entry(q.zeros, q.spec, n)
    return decode(q.codes, _per_entry(q.scales, q.spec, n), zeros, q.spec)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight; backward: the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return dequantize(quantize(w, spec)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(w, spec)) in w's dtype, differentiable with a straight-through
    estimator (identity gradient, the scales taken from w without gradient), for QAT."""
    return _StraightThrough.apply(w, spec)


def _names(prefix: str) -> tuple[str, str, str]:
    return f"{prefix}.codes", f"{prefix}.scales", f"{prefix}.zeros"


def to_tensors(q: QTensor, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors that store `q` (for safetensors): `{prefix}.codes` (uint8, the codes packed
    at `bits` width, 1-D), `{prefix}.scales` (float16, [..., groups]) and, when asymmetric,
    `{prefix}.zeros` (uint8, the zero points packed at `bits` width, 1-D). The spec and the
    weight's shape are not stored: the caller keeps them (from_tensors takes them)."""
    codes, scales, zeros = _names(prefix)
    out = {codes: pack(q.codes, q.spec.bits), scales: q.scales.contiguous()}
    if q.zeros is not None:
        out[zeros] = pack(q.zeros, q.spec.bits)
    return out


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, spec: QuantSpec, shape: tuple[int, ...]) -> QTensor:
    """The QTensor that `to_tensors(q, prefix)` stored, given its spec and the weight's shape."""
    codes, scales, zeros = _names(prefix)
    shape = torch.Size(shape)
    if len(shape) == 0:
        raise ValueError("a quantized weight has at least one axis")
    group_shape = shape[:-1] + (spec.groups(shape[-1]),)
    missing = [k for k in (codes, scales) + ((zeros,) if not spec.symmetric else ()) if k not in tensors]
    if missing:
        raise ValueError(f"missing quantized tensors: {', '.join(missing)}")
    s = tensors[scales]
    if s.dtype != SCALE_DTYPE or s.shape != group_shape:
        raise ValueError(
            f"{scales}: expected {SCALE_DTYPE} of shape {tuple(group_shape)}, got {s.dtype} {tuple(s.shape)}"
        )
    z = None if spec.symmetric else unpack(tensors[zeros], spec.bits, group_shape.numel()).view(group_shape)
    return QTensor(unpack(tensors[codes], spec.bits, shape.numel()).view(shape), s, z, spec)


def stored_bits(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bits that `to_tensors` spends on a weight of this shape: bits per code, SCALE_BITS per
    group's scale and, when asymmetric, bits per group's zero point (each packed tensor rounds
    up to whole bytes on top of this)."""
    shape = torch.Size(shape)
    groups = shape[:-1].numel() * spec.groups(shape[-1])
    return spec.bits * shape.numel() + groups * (SCALE_BITS + (0 if spec.symmetric else spec.bits))
