"""What a FiPS-compressed MLP linear is at run time.

A group of blocks shares one basis U (d x r). Each of the group's MLP linears keeps its
own sparse projection V_i (r x h_i); its weight in d x h form is U @ V_i:
  d -> h (up/gate/fc1):  y = (x @ U) @ V_i + b
  h -> d (down/fc2):     y = (x @ V_i^T) @ U^T + b
While tuning, V_i is a dense Parameter multiplied by a 0/1 mask. `pack()` turns it into a
CSR tensor (int32 indices) so the loaded model holds only the nonzeros.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..adapters.base import IN



def _sparse_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """A CSR tensor with int32 indices, without PyTorch's "beta"/"invariant checks" warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow.to(torch.int32), col.to(torch.int32), values, size=size)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a flat uint8 tensor, 8 entries a byte (row-major)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if bits.numel() != (n + 7) // 8:
        raise ValueError(f"bitmask has {bits.numel()} bytes, expected {(n + 7) // 8} for shape {tuple(shape)}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    flat = (bits.to(torch.uint8)[:, None] >> shifts) & 1
    return flat.flatten()[:n].view(*shape).bool()


class SharedBasis(nn.Module):
    """The basis U (d x r) one group of blocks shares; registered once per group."""

    def __init__(self, U: torch.Tensor):
        super().__init__()
        self.U = nn.Parameter(U)

    @property
    def rank(self) -> int:
        return self.U.shape[1]


class SharedBasisLinear(nn.Module):
    def __init__(self, basis: SharedBasis, V: torch.Tensor, role: str, bias: torch.Tensor | None = None):
        super().__init__()
        # a plain attribute, not a submodule: the basis is owned (and saved) once, by the group
        object.__setattr__(self, "basis", basis)
        self.role = role
        r, h = V.shape
        d = basis.U.shape[0]
        self.in_features, self.out_features = (d, h) if role == IN else (h, d)
        self.V = nn.Parameter(V)
        self.register_buffer("mask", None, persistent=False)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.packed = False

    # ---- tuning -------------------------------------------------------------------
    def masked_V(self) -> torch.Tensor:
        return self.V if self.mask is None else self.V * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U = self.basis.U
        if self.packed:
            return self._packed_forward(x)
        V = self.masked_V()
        if self.role == IN:
            y = (x @ U) @ V
        else:
            y = (x @ V.t()) @ U.t()
        return y if self.bias is None else y + self.bias

    # ---- storage ------------------------------------------------------------------
    @torch.no_grad()
    def pack(self) -> None:
        """Keep only V's nonzeros, as CSR with int32 indices, oriented for the forward."""
        self._set_csr(self.masked_V().detach())
        del self.V
        self.register_parameter("V", None)
        self.mask = None
        self.packed = True

    @torch.no_grad()
    def unpack(self) -> None:
        """Back to a dense V (zeros included): the same function, computed with dense matmuls.
        Faster on CPU than the CSR product, but holds r x h values; for evaluation, not storage."""
        if not self.packed:
            return
        V = self.dense_V()
        del self.V_csr
        self.packed = False
        self.V = nn.Parameter(V, requires_grad=False)

    def _set_csr(self, V: torch.Tensor) -> None:
        dense = V.t() if self.role == IN else V  # IN: (h x r) @ z^T ; OUT: (r x h) @ x^T
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            csr = dense.contiguous().to_sparse_csr()
        self.V_csr = _sparse_csr(csr.crow_indices(), csr.col_indices(), csr.values(), csr.shape)

    @classmethod
    def empty_dense(cls, basis: SharedBasis, v_shape: tuple[int, int], role: str, bias: bool) -> "SharedBasisLinear":
        """A module with a dense V (no mask, nothing packed), waiting for `load_state_dict`."""
        d = basis.U.shape[0]
        out = v_shape[1] if role == IN else d
        layer = cls(basis, torch.zeros(v_shape, dtype=basis.U.dtype), role,
                    torch.zeros(out, dtype=basis.U.dtype) if bias else None)
        return layer.requires_grad_(False)

    @classmethod
    def empty_packed(cls, basis: SharedBasis, v_shape: tuple[int, int], role: str, bias: bool) -> "SharedBasisLinear":
        """A packed module with all-zero V, waiting for `load_state_dict` (the loader's constructor)."""
        d = basis.U.shape[0]
        out = v_shape[1] if role == IN else d
        layer = cls(basis, torch.zeros(v_shape, dtype=basis.U.dtype), role,
                    torch.zeros(out, dtype=basis.U.dtype) if bias else None)
        layer.pack()
        return layer

    @property
    def v_shape(self) -> tuple[int, int]:
        r = self.basis.U.shape[1]
        h = self.out_features if self.role == IN else self.in_features
        return (r, h)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.packed:  # a CSR tensor is no parameter or buffer: move/cast it by hand
            self.V_csr = fn(self.V_csr)
        return self

    # ---- state dict: a packed V is saved as its nonzero values + a bitmask ------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            mask = self.dense_V() != 0
            destination[prefix + "V_values"] = self.dense_V()[mask]
            destination[prefix + "V_mask"] = pack_bits(mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.packed:
            keys = (prefix + "V_values", prefix + "V_mask")
            missing = [k for k in keys if k not in state_dict]
            if missing:
                missing_keys.extend(missing)
            else:
                values, bits = state_dict[keys[0]], state_dict[keys[1]]
                mask = unpack_bits(bits, self.v_shape)
                if int(mask.sum()) != values.numel():
                    error_msgs.append(f"{prefix}: bitmask has {int(mask.sum())} ones but {values.numel()} values")
                else:
                    V = torch.zeros(self.v_shape, dtype=values.dtype, device=values.device)
                    V[mask] = values
                    self._set_csr(V)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.packed:  # the parent does not know the packed keys: they were consumed above
            for k in (prefix + "V_values", prefix + "V_mask"):
                if k in unexpected_keys:
                    unexpected_keys.remove(k)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        U = self.basis.U
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.role == IN:
            z = x2 @ U  # (N, r)
            y = (self.V_csr @ z.t().to(self.V_csr.dtype)).t()  # (N, h)
        else:
            z = (self.V_csr @ x2.t().to(self.V_csr.dtype)).t()  # (N, r)
            y = z @ U.t()
        y = y.to(x.dtype).reshape(*lead, -1)
        return y if self.bias is None else y + self.bias

    def dense_V(self) -> torch.Tensor:
        """V as a dense (r x h) matrix, zeros included."""
        if not self.packed:
            return self.masked_V().detach()
        dense = self.V_csr.to_dense()
        return dense.t() if self.role == IN else dense

    @property
    def sparse(self) -> bool:
        """Whether V is stored sparse (values + bitmask); a dense V is stored as is."""
        return self.packed or self.mask is not None

    def nnz(self) -> int:
        return int(self.V_csr.values().numel()) if self.packed else int((self.masked_V() != 0).sum())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, role={self.role}, "
                f"rank={self.basis.rank}, nnz={self.nnz()}, packed={self.packed}")


def unpack_all(model: nn.Module) -> int:
    """Turn every packed (CSR) V of `model` into a dense V with its zeros in place: the same
    function, computed by dense products (SmolLM2 at 20%, one thread on a shared machine: 2.7x
    faster per evaluation window than the CSR ones), at the memory of a dense V. Returns how many layers were unpacked."""
    n = 0
    for m in model.modules():
        if isinstance(m, SharedBasisLinear) and m.packed:
            m.unpack()
            n += 1
    return n
