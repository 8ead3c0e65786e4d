"""The bitmask-sparse products on a GPU, as Triton kernels (the CPU's are bitmask.cpp).

Same format and index as ops.py: V (r x h) is `values` (kept entries, row-major; float32,
bfloat16 or float16), `mask` (one bit per entry of the flat matrix, most significant bit first)
and `offsets` (r x ceil(h/64), int32: where each row's block of 64 columns starts in `values`).
Each program decodes tiles of V (BK rows x 64 columns) into registers (bit -> lane, an exclusive
prefix sum of the kept bits gives each lane's place in `values`) and multiplies them with
`tl.dot` (tensor cores for 16-bit activations, IEEE float32 otherwise), accumulating in float32;
no dense V is written to memory.

  in_product(z, values, mask, offsets, h)  z @ V    (m x r) -> (m x h), float32
  out_product(x, values, mask, offsets)    x @ V^T  (m x h) -> (m x r), float32

Triton is optional (`pip install layershare[gpu]`); `usable(t)` says whether a tensor can take
this path (a CUDA tensor and Triton importable, or Triton's interpreter: TRITON_INTERPRET=1 set
before this module is imported runs the same kernels on the CPU, as the tests check them against
the dense reference).
"""
from __future__ import annotations

import os

import torch

BN = 64  # columns per tile: ops.BLOCK, the offsets' block
BK = 32  # rows of V per tile
BM = 16  # activation rows per program (tl.dot's minimum)


try:  # optional: `pip install layershare[gpu]`
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _tile(values_ptr, mask_ptr, offsets_ptr, k0, b, r, h, nb, TK: tl.constexpr, TN: tl.constexpr):
        """Rows k0..k0+TK of V, columns b*TN..b*TN+TN, dense (zeros where not kept or outside)."""
        rows = k0 + tl.arange(0, TK)
        cols = b * TN + tl.arange(0, TN)
        inside = (rows[:, None] < r) & (cols[None, :] < h)
        bit = rows[:, None].to(tl.int64) * h + cols[None, :]
        byte = tl.load(mask_ptr + (bit >> 3), mask=inside, other=0).to(tl.int32)
        keep = ((byte >> (7 - (bit & 7)).to(tl.int32)) & 1) * inside.to(tl.int32)
        place = tl.cumsum(keep, axis=1) - keep
        start = tl.load(offsets_ptr + rows * nb + b, mask=rows < r, other=0).to(tl.int64)
        return tl.load(values_ptr + start[:, None] + place, mask=keep != 0, other=0.0)

    @triton.jit
    def _in_kernel(z_ptr, values_ptr, mask_ptr, offsets_ptr, y_ptr, m, r, h, nb, stride_z, stride_y,
                  F32: tl.constexpr, TM: tl.constexpr, TK: tl.constexpr, TN: tl.constexpr):
        rm = tl.program_id(0) * TM + tl.arange(0, TM)
        b = tl.program_id(1)
        cols = b * TN + tl.arange(0, TN)
        acc = tl.zeros((TM, TN), dtype=tl.float32)
        for k0 in range(0, r, TK):
            rk = k0 + tl.arange(0, TK)
            zt = tl.load(z_ptr + rm[:, None].to(tl.int64) * stride_z + rk[None, :],
                         mask=(rm[:, None] < m) & (rk[None, :] < r), other=0.0)
            vt = _tile(values_ptr, mask_ptr, offsets_ptr, k0, b, r, h, nb, TK, TN)
            if F32:
                acc += tl.dot(zt.to(tl.float32), vt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(zt, vt.to(zt.dtype))
        tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_y + cols[None, :], acc,
                 mask=(rm[:, None] < m) & (cols[None, :] < h))

    @triton.jit
    def _out_kernel(x_ptr, values_ptr, mask_ptr, offsets_ptr, y_ptr, m, r, h, nb, stride_x, stride_y,
                   F32: tl.constexpr, TM: tl.constexpr, TK: tl.constexpr, TN: tl.constexpr):
        rm = tl.program_id(0) * TM + tl.arange(0, TM)
        k0 = tl.program_id(1) * TK
        rk = k0 + tl.arange(0, TK)
        acc = tl.zeros((TM, TK), dtype=tl.float32)
        for b in range(0, nb):
            cols = b * TN + tl.arange(0, TN)
            xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + cols[None, :],
                         mask=(rm[:, None] < m) & (cols[None, :] < h), other=0.0)
            vt = _tile(values_ptr, mask_ptr, offsets_ptr, k0, b, r, h, nb, TK, TN)
            if F32:
                acc += tl.dot(xt.to(tl.float32), tl.trans(vt.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(vt.to(xt.dtype)))
        tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_y + rk[None, :], acc,
                 mask=(rm[:, None] < m) & (rk[None, :] < r))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def usable(t: torch.Tensor) -> bool:
    """Whether activations `t` can take the Triton kernels."""
    return triton is not None and (t.device.type == "cuda" or interpreting())


def _f32(t: torch.Tensor, values: torch.Tensor) -> bool:
    """Products in float32 (IEEE) unless the activations are 16-bit and the values of the same dtype
    (and, under the interpreter, not bfloat16: Triton 3.x's interpreter multiplies bfloat16 tiles as
    raw 16-bit integers; float16 tiles it multiplies right, so the tests cover the 16-bit path)."""
    if t.dtype == torch.float32 or values.dtype != t.dtype:
        return True
    return t.dtype == torch.bfloat16 and interpreting()


def _check_per_block(offsets: torch.Tensor, h: int) -> None:
    """These kernels read an offset per block of 64 columns (ops.prepare(..., per=1); ops.py expands
    the native kernels' coarser index before calling them)."""
    if offsets.shape[1] != -(-h // BN):
        raise ValueError(f"the Triton kernels need an offset per block of {BN} columns: got {offsets.shape[1]} "
                         f"per row for {h} columns (ops.prepare(mask, shape, per=1))")


def in_product(z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor,
               h: int) -> torch.Tensor:
    """z @ V for z (m x r): (m x h), float32."""
    z = z.contiguous()
    m, r = z.shape
    _check_per_block(offsets, h)
    nb = offsets.shape[1]
    y = torch.empty(m, h, dtype=torch.float32, device=z.device)
    if m == 0 or h == 0:
        return y
    _in_kernel[(triton.cdiv(m, BM), nb)](z, values, mask, offsets, y, m, r, h, nb, z.stride(0), y.stride(0),
                                         F32=_f32(z, values), TM=BM, TK=BK, TN=BN)
    return y


def out_product(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x @ V^T for x (m x h): (m x r), float32."""
    x = x.contiguous()
    m, h = x.shape
    _check_per_block(offsets, h)
    r, nb = offsets.shape
    y = torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m == 0 or r == 0:
        return y
    _out_kernel[(triton.cdiv(m, BM), triton.cdiv(r, BK))](x, values, mask, offsets, y, m, r, h, nb, x.stride(0),
                                                         y.stride(0), F32=_f32(x, values), TM=BM, TK=BK, TN=BN)
    return y
