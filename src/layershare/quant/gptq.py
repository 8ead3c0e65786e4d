"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for one weight matrix, onto the grid of grid.py.

Quantizes W (out x in) one input column at a time, in order, and spreads each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's
reconstruction error ||X W^T - X Wq^T||^2, H = X^T X:

- dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0; the diagonal is dampened by
  `percdamp` times its mean; the upper Cholesky factor of H^-1 (computed in float64) gives the
  per-column updates;
- lazy batches of `blocksize` columns: within a block the updates are applied at once per
  column, to the rest of the matrix once per block;
- group-wise grids (`QuantSpec.group_size`): a group's scale and zero point are chosen
  (grid.choose_qparams) when its first column is reached, from the group's weights as updated
  by every column quantized so far (static_groups=False, act_order=False).

One deliberate difference from the reference code (IST-DASLab/gptq, copied by AutoGPTQ): when a
group starts inside a lazy block, the reference reads the group from W, which does not yet hold
that block's updates, so its grids depend on the block size. Here the group's pending updates are
applied first, so the result is that of the sequential algorithm whatever the block size
(identical to the reference when groups start only at block starts, e.g. group 128, block 128).

Maintained implementations, checked on this CPU-only setup (torch 2.13 CPU): torchao 0.18's
`prototype.gptq` asserts a CUDA device and only targets int4/nvfp4; llm-compressor 0.14 pins
transformers<=5.17 and compressed-tensors 0.19 (this project runs transformers 5.24) and takes
its group scales from an observer over the unmodified weight before GPTQ runs, not when a group
starts; GPTQModel 7.7.0 is an sdist building C++/CUDA kernels and requires torch>=2.14.1, which
would replace the installed torch. None fitted, hence this implementation; its tests check it
against a direct textbook version and RTN.
"""
from __future__ import annotations

import torch

from .grid import SCALE_DTYPE, QTensor, QuantSpec, choose_qparams, decode, encode


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, percdamp: float = 0.01, blocksize: int = 128
) -> QTensor:
    """GPTQ-quantize `w` (out x in) given the input Hessian `hessian` = X^T X (in x in) of the
    layer's calibration inputs X; the result dequantizes with grid.dequantize."""
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"gptq needs a weight (out x in) and an in x in Hessian, got {tuple(w.shape)} and {tuple(hessian.shape)}"
        )
    if percdamp < 0 or blocksize < 1:
        raise ValueError(f"percdamp must be >= 0 and blocksize >= 1, got {percdamp} and {blocksize}")
    rows, n = w.shape
    g = spec.group_size
    W = w.detach().float().clone()
    hinv = _inverse_cholesky(hessian, W, percdamp)

    codes = torch.empty(rows, n, dtype=torch.uint8, device=W.device)
    scales = torch.empty(rows, spec.groups(n), dtype=SCALE_DTYPE, device=W.device)
    zeros = None if spec.symmetric else torch.empty(rows, spec.groups(n), dtype=torch.uint8, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % g == 0:
                end = min(j + g, n)
                group = W1[:, i : min(end, i2) - i1]
                if end > i2:  # the group runs past the block: apply this block's pending updates
                    group = torch.cat([group, W[:, i2:end] - Err1 @ hinv[i1:i2, i2:end]], dim=1)
                scale, zero = choose_qparams(group, spec)
                scales[:, j // g] = scale
                if zeros is not None:
                    zeros[:, j // g] = zero
            c = encode(W1[:, i], scale, zero, spec)
            codes[:, j] = c
            err = (W1[:, i] - decode(c, scale, zero, spec)) / H1[i, i]
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    return QTensor(codes, scales, zeros, spec)


def _inverse_cholesky(hessian: torch.Tensor, W: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian (float32, on W's device); zeroes
    W's dead inputs in place."""
    H = hessian.detach().to(W.device, torch.float64, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise ValueError("the Hessian is not positive definite after dampening: raise percdamp or add calibration data")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
