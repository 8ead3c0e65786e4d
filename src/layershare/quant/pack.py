"""Bit packing of integer codes at their true width.

`pack` writes n codes of b bits into exactly ceil(b * n / 8) bytes: the codes form one
little-endian bit stream (code k occupies bits b*k .. b*k + b - 1 of the stream, least
significant bit first), cut into bytes, with zero bits after the last code. A 3-bit code
takes 3 bits, not a byte.

Vectorised: the codes are grouped in chunks that fill whole bytes (8 / gcd(b, 8) codes make
b / gcd(b, 8) bytes: 8 three-bit codes make 3 bytes), each chunk is assembled into one
integer by shifts and split back into bytes; the Python loop is over none of the elements.
"""
from __future__ import annotations

import math

import torch

BITS = (2, 3, 4, 8)  # the widths that can be stored


def check_bits(bits: int) -> None:
    """Refuse a code width that cannot be stored, naming the ones that can."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"unsupported bit width {bits!r}: allowed are {', '.join(map(str, BITS))}")


def packed_bytes(bits: int, numel: int) -> int:
    """Bytes that `numel` codes of `bits` bits take when packed: ceil(bits * numel / 8)."""
    check_bits(bits)
    return -(-bits * numel // 8)


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest run of codes that fills whole bytes."""
    g = math.gcd(bits, 8)
    return 8 // g, bits // g


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) (any shape, read in row-major order) into a 1-D
    uint8 tensor of ceil(bits * numel / 8) bytes."""
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"codes out of range for {bits} bits: found values in [{int(flat.min())}, {int(flat.max())}], "
            f"allowed [0, {2**bits - 1}]"
        )
    per, nbytes = _chunk(bits)
    flat = torch.nn.functional.pad(flat.to(torch.int32), (0, -n % per)).view(-1, per)
    words = (flat << (torch.arange(per, dtype=torch.int32, device=flat.device) * bits)).sum(1, dtype=torch.int32)
    out = (words[:, None] >> (torch.arange(nbytes, dtype=torch.int32, device=flat.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)[: packed_bytes(bits, n)]


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes (1-D uint8) of a packed stream of exactly
    ceil(bits * numel / 8) bytes."""
    check_bits(bits)
    expected = packed_bytes(bits, numel)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor of {expected} bytes for {numel} codes of {bits} bits, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    per, nbytes = _chunk(bits)
    stream = torch.nn.functional.pad(packed.to(torch.int32), (0, -expected % nbytes)).view(-1, nbytes)
    words = (stream << (torch.arange(nbytes, dtype=torch.int32, device=stream.device) * 8)).sum(1, dtype=torch.int32)
    codes = (words[:, None] >> (torch.arange(per, dtype=torch.int32, device=stream.device) * bits)) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(-1)[:numel]
