"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for one weight matrix, onto the grid of grid.py.

Quantizes W (out x in) one input column at a time and spreads each column's rounding error
over the columns not yet quantized through the inverse Hessian of the layer's reconstruction
error ||X W^T - X Wq^T||^2, H = X^T X:

- dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0; the diagonal is dampened by
  `percdamp` times its mean; the upper Cholesky factor of H^-1 (computed in float64) gives the
  per-column updates. A Hessian that is still singular after dampening (Cholesky fails, or its
  smallest pivot is at float64 round-off: fewer independent inputs than columns and
  `percdamp` 0), or that holds inf/NaN, raises SingularHessianError: no codes come out of it;
- lazy batches of `blocksize` columns: within a block the updates are applied at once per
  column, to the rest of the matrix once per block;
- group-wise grids (`QuantSpec.group_size`): by default a group's scale and zero point are
  chosen (grid.choose_qparams) when its first column is reached, from the group's weights as
  updated by every column quantized so far;
- `act_order`: the columns are quantized in order of decreasing H_jj (the inputs with the most
  energy first, while the most columns are left to absorb their error), with static groups: every
  group's grid is chosen before any column moves, from the weights as they are (the reference's
  `static_groups=True`), so the codes, scales and their layout are those of the natural order.

One deliberate difference from the reference code (IST-DASLab/gptq, copied by AutoGPTQ): when a
group starts inside a lazy block, the reference reads the group from W, which does not yet hold
that block's updates, so its grids depend on the block size. Here the group's pending updates are
applied first, so the result is that of the sequential algorithm whatever the block size
(identical to the reference when groups start only at block starts, e.g. group 128, block 128).

`gptq_masked` quantizes a sparse weight whose kept entries are stored as one vector (FiPS's V
values, quant/model.py): the pattern is fixed, the pruned entries are quantized to exactly 0 and
their error (the updates they received from earlier columns) is spread like any other, as in
SparseGPT's joint pruning and quantization (Frantar & Alistarh 2023); the groups are runs of
`group_size` consecutive stored values, whatever rows and columns they span, each group's grid
chosen when its first column is reached (act_order: before any column moves). It applies every
column's update to the whole rest of the matrix at once (no lazy batches).

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

from layershare.quant.grid import (
    SCALE_DTYPE,
    QTensor,
    QuantSpec,
    choose_qparams,
    decode,
    encode,
)


class SingularHessianError(ValueError):
    """The inputs' Hessian cannot be inverted after dampening: no GPTQ codes for this weight."""


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, percdamp: float = 0.01, blocksize: int = 128,
    act_order: bool = False,
) -> QTensor:
    """GPTQ-quantize `w` (out x in) given the input Hessian `hessian` = X^T X (in x in) of the
    layer's calibration inputs X; the result dequantizes with grid.dequantize."""
    _check(w, hessian, percdamp, blocksize)
    W, H = _without_dead_inputs(w, hessian)
    rows, n = W.shape
    g = spec.group_size
    static = _static_qparams(W, spec) if act_order else None
    perm = _activation_order(H) if act_order else torch.arange(n, device=W.device)
    W, hinv = W[:, perm], _inverse_cholesky(H[perm][:, perm], percdamp)

    codes = torch.empty(rows, n, dtype=torch.uint8, device=W.device)
    scales = torch.empty(rows, spec.groups(n), dtype=SCALE_DTYPE, device=W.device)
    zeros = None if spec.symmetric else torch.empty(rows, spec.groups(n), dtype=torch.uint8, device=W.device)
    if static is not None:
        scales.copy_(static[0])
        if zeros is not None:
            zeros.copy_(static[1])
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static is None and j % g == 0:
                end = min(j + g, n)
                group = W1[:, i : min(end, i2) - i1]
                if end > i2:  # the group runs past the block: apply this block's pending updates
                    group = torch.cat([group, W[:, i2:end] - Err1 @ hinv[i1:i2, i2:end]], dim=1)
                scales[:, j // g], zero = choose_qparams(group, spec)
                if zeros is not None:
                    zeros[:, j // g] = zero
            k = int(perm[j]) // g  # the column's group, in the natural order
            scale, zero = scales[:, k], None if zeros is None else zeros[:, k]
            c = encode(W1[:, i], scale, zero, spec)
            codes[:, perm[j]] = c
            err = (W1[:, i] - decode(c, scale, zero, spec)) / H1[i, i]
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    return QTensor(codes, scales, zeros, spec)


def gptq_masked(
    w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, stored: torch.Tensor, *, percdamp: float = 0.01,
    act_order: bool = False,
) -> QTensor:
    """GPTQ of a sparse `w` (out x in) whose kept entries are stored as a vector: `stored` holds
    their flat (row-major) indices into `w`, in the stored order; every other entry of `w` stays
    exactly 0. Returns the stored vector's QTensor (codes of shape (len(stored),), one scale per
    `group_size` consecutive stored values), as grid.quantize of that vector would lay it out."""
    _check(w, hessian, percdamp, 1)
    W, H = _without_dead_inputs(w, hessian)
    rows, n = W.shape
    perm = _activation_order(H) if act_order else torch.arange(n, device=W.device)
    W, hinv = W[:, perm].contiguous(), _inverse_cholesky(H[perm][:, perm], percdamp)
    where = _permuted_positions(stored, n, perm)  # each stored value's flat index into the permuted W
    members = _group_members(where, spec.group_size)  # (groups, group_size) flat indices, -1 past the end
    group_of = torch.full((rows * n,), -1, dtype=torch.long, device=W.device)
    group_of[where] = torch.arange(where.numel(), device=W.device) // spec.group_size
    group_of = group_of.view(rows, n)
    keep = group_of >= 0

    groups = members.shape[0]
    scales = torch.empty(groups, dtype=SCALE_DTYPE, device=W.device)
    zeros = None if spec.symmetric else torch.empty(groups, dtype=torch.uint8, device=W.device)
    starting = _groups_by_first_column(members, n)
    if act_order:
        _set_qparams(W, members, torch.arange(groups, device=W.device), spec, scales, zeros)
    codes = torch.zeros(rows, n, dtype=torch.uint8, device=W.device)
    for j in range(n):
        if not act_order and starting[j].numel():
            _set_qparams(W, members, starting[j], spec, scales, zeros)
        gid = group_of[:, j].clamp_min(0)
        scale, zero = scales[gid], None if zeros is None else zeros[gid]
        c = encode(W[:, j], scale, zero, spec)
        codes[:, j] = c
        q = torch.where(keep[:, j], decode(c, scale, zero, spec), torch.zeros_like(W[:, j]))
        err = (W[:, j] - q) / hinv[j, j]
        W[:, j:] -= err[:, None] * hinv[j, j:][None, :]
    return QTensor(codes.view(-1)[where], scales, zeros, spec)


def toward_float(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, *, percdamp: float = 0.01,
                 alpha: float = 1.0) -> torch.Tensor:
    """The weight GPTQ quantizes so that the result matches the float model (GPTAQ's asymmetric
    calibration, Li et al. 2025, arXiv:2504.02692): the layer's inputs in the model quantized so
    far are X~ (hessian H = X~^T X~), in the float model X (cross D = (X - X~)^T X~), and
    ||W X - Q X~||^2 = ||(W + W D H^-1) X~ - Q X~||^2 + const, so GPTQ of W' = W + W D H^-1 on H
    minimizes the error against the float output. `alpha` scales the step from W to W' (the GPTAQ
    reference's alpha, 0.25 there, applied inside its column loop rather than before it as here).
    H dampened as GPTQ dampens it and refused as GPTQ refuses it (SingularHessianError); dead inputs
    (H_jj = 0, so D's column j is 0) keep W's column. Returns W' (out x in, float32)."""
    _check(w, hessian, percdamp, 1)
    if cross.shape != hessian.shape:
        raise ValueError(f"the cross moment must be in x in like the Hessian, got {tuple(cross.shape)}")
    W, H = _without_dead_inputs(w, hessian)
    delta = torch.cholesky_solve((W.double() @ cross.to(H)).t(), _dampened_cholesky(H, percdamp)).t()  # W D H^-1
    return (w.detach().double() + alpha * delta).float()


def _check(w: torch.Tensor, hessian: torch.Tensor, percdamp: float, blocksize: int) -> None:
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"gptq needs a weight (out x in) and an in x in Hessian, got {tuple(w.shape)} and {tuple(hessian.shape)}"
        )
    if percdamp < 0 or blocksize < 1:
        raise ValueError(f"percdamp must be >= 0 and blocksize >= 1, got {percdamp} and {blocksize}")


def _without_dead_inputs(w: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (float32 copy) and H (float64 copy, on W's device) with every dead input (H_jj = 0)
    given H_jj = 1 and a zero column of W."""
    W = w.detach().float().clone()
    H = hessian.detach().to(W.device, torch.float64, copy=True)
    if not torch.isfinite(H).all():
        raise SingularHessianError("the Hessian holds inf or NaN (non-finite calibration inputs)")
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def _activation_order(H: torch.Tensor) -> torch.Tensor:
    """The columns by decreasing H_jj (the reference's `torch.argsort(torch.diag(H), descending=True)`)."""
    return torch.argsort(H.diagonal(), descending=True)


def _static_qparams(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every group's grid from W as it is (act_order's static groups)."""
    n, g = W.shape[1], spec.group_size
    padded = torch.nn.functional.pad(W, (0, -n % g))  # zeros change no group's range
    return choose_qparams(padded.unflatten(-1, (-1, g)), spec)


def _dampened_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Lower Cholesky factor of H (float64) after dampening it in place; SingularHessianError if H
    is still singular."""
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    tiny = H.shape[0] * torch.finfo(H.dtype).eps * H.diagonal().max()
    if info or L.diagonal().min() ** 2 <= tiny:
        raise SingularHessianError(
            f"the Hessian of its inputs is singular after dampening (damp {percdamp:g}): fewer independent "
            "calibration inputs than input features; raise damp or add calibration data")
    return L


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian (float32); H is dampened in place."""
    return torch.linalg.cholesky(torch.cholesky_inverse(_dampened_cholesky(H, percdamp)), upper=True).float()


def _permuted_positions(stored: torch.Tensor, n: int, perm: torch.Tensor) -> torch.Tensor:
    """Flat indices into W[:, perm] of the entries `stored` indexes in W."""
    stored = stored.to(perm.device, torch.long)
    inverse = torch.argsort(perm)
    return stored // n * n + inverse[stored % n]


def _group_members(where: torch.Tensor, group_size: int) -> torch.Tensor:
    """The stored values' positions cut into groups of `group_size`, the last padded with -1."""
    padded = torch.nn.functional.pad(where, (0, -where.numel() % group_size), value=-1)
    return padded.view(-1, group_size)


def _groups_by_first_column(members: torch.Tensor, n: int) -> list[torch.Tensor]:
    """For each column j, the groups whose first (leftmost) entry is in column j."""
    cols = torch.where(members >= 0, members % n, n)
    first = cols.amin(dim=1)
    order = torch.argsort(first, stable=True)
    counts = torch.bincount(first, minlength=n + 1)[:n]
    return list(torch.split(order, counts.tolist()))


def _set_qparams(W: torch.Tensor, members: torch.Tensor, which: torch.Tensor, spec: QuantSpec,
                 scales: torch.Tensor, zeros: torch.Tensor | None) -> None:
    """The grids of groups `which`, from their stored entries' current values in W."""
    idx = members[which]
    values = torch.where(idx >= 0, W.view(-1)[idx.clamp_min(0)], torch.zeros((), device=W.device))
    scale, zero = choose_qparams(values, spec)  # the padding is zeros: it changes no group's range
    scales[which] = scale
    if zeros is not None:
        zeros[which] = zero
