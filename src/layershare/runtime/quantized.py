"""Quantized linears held packed at run time, on the CPU, through PyTorch's int4 kernel.

A quantized directory stores each linear's codes at their true width with float16 group scales
along the input axis (quant/grid.py). `pack_linears` turns every plain nn.Linear among them into
an `Int4Linear` holding the codes as PyTorch's int4 CPU layout (`_convert_weight_to_int4pack_for_cpu`:
half a byte per weight; 2- and 3-bit codes widen to 4 bits exactly) and one bfloat16 scale and
offset per group, so the loaded model stays about as small as the file instead of dequantizing.

  decode (at most DECODE_ROWS rows)  `_weight_int4pack_mm_for_cpu` on bfloat16 activations
  prefill (more rows)                the weight dequantized into a scratch buffer shared by every
                                     layer, then the dense GEMM in the activations' dtype

Both compute W = (code - zero) * scale with the scale rounded to bfloat16 (the kernel's type):
a relative change of at most 2**-9 per group against the float16 scale the file stores, the same
in both paths (asymmetric 4-bit grids also round their offset). The kernel needs the output size to be a multiple of 16 and a group size (32, 64,
128 or 256) dividing both ours and the input size; a linear that does not fit and GPT-2's Conv1D
are dequantized as before. The V values of sparse compressed layers stay codes too
(`pack_values`), and so do the shared bases of groups that run the kernels: the bitmask kernels
dequantize them as they read them (runtime/kernels/ops.py, QuantValues), exactly to the float32
values dequantization gives. The packed
layout is PyTorch's; `_layout_ok` checks once per process that we read it back exactly, and the
path is not used if not.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from layershare.adapters.base import set_path
from layershare.quant.grid import from_tensors
from layershare.quant.model import SUFFIXES, packed_buffers, spec_of

DECODE_ROWS = 8
KERNEL_GROUPS = (256, 128, 64, 32)
_scratch: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and _layout_ok()


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """PyTorch's CPU int4 layout back to codes (n x k, uint8): per block of 64 output rows, k
    columns of 32 bytes, row j in the low nibble and row j + 32 in the high one; a last block of
    fewer rows holds rows 2j and 2j + 1."""
    flat = packed.reshape(-1)
    full = n // 64
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    if full:
        blocks = flat[: full * k * 32].view(full, k, 32)
        both = torch.stack([blocks & 15, blocks >> 4], dim=1)  # (blocks, lo/hi, k, 32)
        out[: full * 64] = both.permute(0, 1, 3, 2).reshape(full * 64, k)
    rest = n - full * 64
    if rest:
        tail = flat[full * k * 32:].view(k, rest // 2)
        out[full * 64::2], out[full * 64 + 1::2] = (tail & 15).t(), (tail >> 4).t()
    return out


@functools.lru_cache(maxsize=1)
def _layout_ok() -> bool:
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (112, 96), generator=gen, dtype=torch.int32)  # a full block and a tail
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return False
    return torch.equal(unpack_int4(packed, 112, 96).to(torch.int32), codes)


def kernel_group(group_size: int, k: int) -> int | None:
    return next((g for g in KERNEL_GROUPS if group_size % g == 0 and k % g == 0), None)


class Int4Linear(nn.Module):
    """y = x W^T + b with W held as int4 codes and bfloat16 per-group scales and offsets."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)  # (groups, out, 2) bfloat16: scale, offset
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bits: int, bias: torch.Tensor | None) -> "Int4Linear":
        """codes (out x in, uint8), scales and integer zero points (out x our groups): the weight
        (code - zero) * scale in the kernel's form (q - 8) * scale + offset. Where code - zero + 8
        fits 4 bits (every symmetric grid, asymmetric 2 and 3 bits) q is that and the offset 0;
        asymmetric 4-bit codes keep q = code and the offset (8 - zero) * scale, rounded to bfloat16."""
        n, k = codes.shape
        g = kernel_group(group_size, k)
        idx = torch.arange(0, k, g) // group_size  # our group of each kernel group
        s = scales[:, idx].to(torch.bfloat16).float()  # the kernel's scale
        z = zeros.to(torch.int32)
        if bits < 4 or bool((z == 8).all()):
            q = codes.to(torch.int32) - z.repeat_interleave(group_size, dim=1)[:, :k] + 8
            offset = torch.zeros_like(s)
        else:
            q, offset = codes.to(torch.int32), (8 - z[:, idx].float()) * s
        sz = torch.stack([s, offset], dim=-1).transpose(0, 1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        return cls(packed, sz.to(torch.bfloat16).contiguous(), g, k, n, bias)

    def weight_as(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (out x in) the kernel computes with, dequantized (into `out` when given)."""
        n, k = self.out_features, self.in_features
        w = out if out is not None else torch.empty((n, k), dtype=dtype, device=self.packed.device)
        w.copy_(unpack_int4(self.packed, n, k)).sub_(8)  # in place: no weight-sized temporaries
        groups = w.view(n, k // self.group, self.group)
        groups.mul_(self.scales_zeros[..., 0].t().to(dtype)[..., None])
        groups.add_(self.scales_zeros[..., 1].t().to(dtype)[..., None])
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= DECODE_ROWS and x2.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.packed,
                                                           self.group, self.scales_zeros).to(x.dtype)
        else:
            # (a model moved off the CPU after loading dequantizes here too: correct, not fast)
            key = (self.out_features * self.in_features, x.dtype, x.device)
            buf = _scratch.get(key)
            if buf is None:
                with torch.inference_mode(False):  # writable outside inference_mode too (ops.scratch)
                    buf = _scratch[key] = torch.empty(key[0], dtype=x.dtype, device=x.device)
            y = F.linear(x2, self.weight_as(x.dtype, buf.view(self.out_features, self.in_features)))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"


def pack_linears(model: nn.Module, qentry: dict) -> set[str]:
    """Replace each quantized plain nn.Linear the kernel can run by an Int4Linear built from its
    packed buffers. Returns the quantized tensors' names it took (the rest are dequantized by the
    caller). CPU models only."""
    if not available():
        return set()
    taken = set()
    for name, t in qentry["tensors"].items():
        spec = spec_of(qentry, name)
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path)
        if type(owner) is not nn.Linear or attr != "weight" or t["input_first"] or len(t["shape"]) != 2:
            continue  # shared bases, V values, atoms, Conv1D: dequantized by the caller
        n, k = t["shape"]
        if n % 16 or kernel_group(spec.group_size, k) is None or owner.weight_qcodes.device.type != "cpu":
            continue
        bufs = packed_buffers(owner, "weight")
        q = from_tensors(bufs, "q", spec, (n, k))
        zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, 2 ** (spec.bits - 1), dtype=torch.uint8)
        bias = owner.bias.detach() if owner.bias is not None else None
        set_path(model, path, Int4Linear.from_codes(q.codes, q.scales, zeros, spec.group_size, spec.bits, bias))
        taken.add(name)
    return taken


def pack_values(model: nn.Module, qentry: dict) -> set[str]:
    """Keep the quantized values of each sparse FiPS layer's V as codes (ops.QuantValues: 4-bit codes
    two a byte, 8-bit one a byte; float16 group scales and uint8 zero points, as stored) when the
    native kernels are built and the grid's group is a power of two >= 16, and stage each shared
    basis's codes (held instead of U by runtime/forms.py when its group runs the kernels). Returns
    the tensors' names it took (the rest, shared bases included, are dequantized by the caller).
    CPU models only."""
    from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
    from layershare.runtime.kernels import ops

    if not ops.available():
        return set()
    taken = set()
    for name, t in qentry["tensors"].items():
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path)
        if attr == "U" and isinstance(owner, SharedBasis):
            _stage_basis(owner, name, t, qentry)
            continue
        if attr != "V_values" or not isinstance(owner, SharedBasisLinear) or not owner.sparse:
            continue
        bufs = packed_buffers(owner, "V_values")
        if any(b.device.type != "cpu" for b in bufs.values()):
            continue
        spec = spec_of(qentry, name)
        q = from_tensors(bufs, "q", spec, tuple(t["shape"]))
        qv = ops.QuantValues.from_codes(q.codes, q.scales, q.zeros, spec.bits, spec.group_size)
        if qv is None:
            continue
        owner.set_quant_values(qv)
        for s in SUFFIXES:
            owner._buffers.pop(f"V_values_q{s}", None)
        taken.add(name)
    return taken


def _stage_basis(basis, name: str, t: dict, qentry: dict) -> None:
    """Stage a shared basis's codes (SharedBasis.stage_codes): U is dequantized as before, and the
    run-time conversion holds the codes instead when every layer of its group runs the kernels.
    The codes are U in its stored orientation (U^T when groups run along d), row-major, with the
    groups re-cut to gcd(group, row length) so that none straddles two rows (exactly the same
    values); not staged when that is not a power of two >= 16."""
    import math

    from layershare.runtime.kernels import ops

    bufs = packed_buffers(basis, "U")
    if any(b.device.type != "cpu" for b in bufs.values()):
        return
    spec = spec_of(qentry, name)
    shape = tuple(t["shape"])
    oriented = shape[::-1] if t["input_first"] else shape
    q = from_tensors(bufs, "q", spec, oriented)
    rows, cols = oriented
    g = math.gcd(spec.group_size, cols)
    col_group = (torch.arange(cols // g) * g) // spec.group_size  # each new group's group in its row
    scales = q.scales[:, col_group].reshape(-1)
    zeros = None if q.zeros is None else q.zeros[:, col_group].reshape(-1)
    qv = ops.QuantValues.from_codes(q.codes.reshape(-1), scales, zeros, spec.bits, g)
    if qv is not None:
        basis.stage_codes(qv, transposed=bool(t["input_first"]))
