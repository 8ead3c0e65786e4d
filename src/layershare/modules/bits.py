"""The bitmask a sparse V is stored with: one bit per entry of the flat (row-major) matrix, most
significant bit first, 8 entries a byte (the last byte zero-padded)."""
from __future__ import annotations

import torch


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
