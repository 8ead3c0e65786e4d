"""Honest size accounting of a (compressed) model: parameters stored and bytes.

stored values     every parameter the model keeps (tied weights once, each shared basis
                  once, dense V in full) plus the nonzeros of every sparse V
index bytes       the bitmask of every sparse V (1 bit per entry of r x h)
param-equivalents stored values + index bytes / bytes per parameter at the storage dtype
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from layershare.compression.budget import count_params
from layershare.modules.shared_basis import SharedBasisLinear


@dataclass
class Sizes:
    dense_params: int
    stored_values: int
    index_bytes: int
    bytes_per_param: int

    @property
    def param_equivalents(self) -> float:
        return self.stored_values + self.index_bytes / self.bytes_per_param

    @property
    def ratio(self) -> float:
        """Fraction of the dense model's parameters removed (index overhead counted)."""
        return 1.0 - self.param_equivalents / self.dense_params

    @property
    def weight_bytes(self) -> int:
        return self.stored_values * self.bytes_per_param + self.index_bytes

    @property
    def dense_bytes(self) -> int:
        return self.dense_params * self.bytes_per_param

    def as_dict(self) -> dict:
        return {**asdict(self), "param_equivalents": self.param_equivalents, "ratio": self.ratio,
                "weight_bytes": self.weight_bytes, "dense_bytes": self.dense_bytes}


def measure(model: nn.Module, dense_params: int, bytes_per_param: int = 4) -> Sizes:
    sparse = [m for m in model.modules() if isinstance(m, SharedBasisLinear) and m.sparse]
    nnz = sum(m.nnz() for m in sparse)
    dense_v = sum(m.V.numel() for m in sparse if not m.packed)  # masked V parameters: count nnz only
    index = sum((m.v_shape[0] * m.v_shape[1] + 7) // 8 for m in sparse)
    return Sizes(dense_params=dense_params, stored_values=count_params(model) - dense_v + nnz,
                 index_bytes=index, bytes_per_param=bytes_per_param)
