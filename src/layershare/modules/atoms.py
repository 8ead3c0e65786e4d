"""What a MASA-compressed linear is at run time: a combination of shared matrix atoms.

A group of blocks shares, per projection type (Q, K, V, O), a stack of K matrix atoms
D_k (out x in). Each block's projection keeps only K coefficients c_k (and its bias):
W = sum_k c_k D_k, y = x W^T + b. The atoms are stored once per group and type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MatrixAtoms(nn.Module):
    """The atoms (K x out x in) one projection type of a group of blocks shares."""

    def __init__(self, atoms: torch.Tensor):
        super().__init__()
        self.atoms = nn.Parameter(atoms)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.atoms.shape)


class AtomLinear(nn.Module):
    def __init__(self, atoms: MatrixAtoms, coef: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "atoms", atoms)  # owned (and saved) once, by the group
        _, self.out_features, self.in_features = atoms.shape
        self.coef = nn.Parameter(coef)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The (out x in) weight this layer stands for."""
        return torch.tensordot(self.coef, self.atoms.atoms, dims=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    def empty(cls, atoms: MatrixAtoms, bias: bool) -> "AtomLinear":
        """A module with zero coefficients, waiting for `load_state_dict`."""
        k, out, _ = atoms.shape
        dtype = atoms.atoms.dtype
        return cls(atoms, torch.zeros(k, dtype=dtype), torch.zeros(out, dtype=dtype) if bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.coef.numel()}"
