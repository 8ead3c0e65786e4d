"""Low-rank factorisations shared by the SVD-family methods, in the d x h form of modules/.

`whitened_factors(W, gram, rank)` minimises the error on the calibration inputs,
E||x W - x A B||^2 for inputs x with second moment `gram` (SVD-LLM's truncation-aware
whitening: Cholesky gram = L L^T, SVD of L^T W, A = L^-T P_r, B = S_r Q_r); with gram=None it
is the plain truncated SVD. `to_basis(A, B, role)` turns the (input x output) factors into the
(U, V) of a SharedBasisLinear: for role "in" the input side is d (U = A, V = B); for role
"out" it is h (W_dxh = B^T A^T, so U = B^T, V = A^T).

`refit_output(A, W, gram)` is the closed-form update of SVD-LLM (its "layer-wise closed-form
update") and of Basis Sharing (its coefficient update at high compression): the input-side
factor A stays, the output side is re-solved by least squares on the inputs the compressed
model actually feeds the layer, B = (A^T G A)^-1 A^T G W with G their second moment.
"""
from __future__ import annotations

import torch

from layershare.adapters.base import IN
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.modules.weights import weight_dxh

EPS = 1e-6  # ridge added to the Gram matrix, relative to its mean diagonal


def cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L with gram + ridge = L L^T (float64); the ridge grows until it succeeds."""
    g = gram.double()
    diag = g.diagonal().clone()
    ridge = EPS * float(diag.mean().clamp_min(1e-12))
    for _ in range(8):
        # g + ridge I in g itself, its diagonal restored after (no h x h float64 copy or identity beside it)
        g.diagonal().copy_(diag).add_(ridge)
        try:
            L, info = torch.linalg.cholesky_ex(g)
        finally:
            g.diagonal().copy_(diag)
        if int(info) == 0:
            return L
        ridge *= 10
    raise RuntimeError("input Gram matrix is not positive definite even with a ridge")


def whitened_factors(W: torch.Tensor, gram: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (in x rank), B (rank x out) with W ~ A B, error measured on inputs with second moment `gram`."""
    W = W.double()
    if gram is None:
        P, S, Q = torch.linalg.svd(W, full_matrices=False)
        return P[:, :rank], S[:rank, None] * Q[:rank]
    L = cholesky(gram)
    P, S, Q = torch.linalg.svd(L.t() @ W, full_matrices=False)
    A = torch.linalg.solve_triangular(L.t(), P[:, :rank], upper=True)  # L^-T P_r
    return A, S[:rank, None] * Q[:rank]


def refit_output(A: torch.Tensor, W: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """B (rank x out) minimising E||x A B - x W||^2 over inputs x with second moment `gram`."""
    A, G = A.double(), gram.double()
    GA = G @ A
    M = A.t() @ GA
    ridge = EPS * float(M.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(M + ridge * torch.eye(M.shape[0], dtype=M.dtype, device=M.device),
                              GA.t() @ W.double())


def input_side(W_dxh: torch.Tensor, role: str) -> torch.Tensor:
    """The matrix as (input x output)."""
    return W_dxh if role == IN else W_dxh.t()


def to_basis(A: torch.Tensor, B: torch.Tensor, role: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    U, V = (A, B) if role == IN else (B.t(), A.t())
    return U.to(dtype).contiguous(), V.to(dtype).contiguous()


def lowrank_linear(module, role: str, rank: int, gram: torch.Tensor | None,
                   update_gram: torch.Tensor | None = None) -> tuple[SharedBasis, SharedBasisLinear]:
    """One linear as its own basis and a dense V (truncated SVD, whitened when gram is given;
    the output side refitted on inputs with second moment update_gram when given); computed
    where the statistics are (the CPU without any)."""
    device = next((g.device for g in (gram, update_gram) if g is not None), torch.device("cpu"))
    W = weight_dxh(module, role, device).float()
    A, B = whitened_factors(input_side(W, role), gram, rank)
    if update_gram is not None:
        B = refit_output(A, input_side(W, role), update_gram)
    U, V = to_basis(A, B, role, W.dtype)
    basis = SharedBasis(U)
    bias = module.bias.detach().clone().float() if getattr(module, "bias", None) is not None else None
    return basis, SharedBasisLinear(basis, V, role, bias)
