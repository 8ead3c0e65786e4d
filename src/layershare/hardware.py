"""What the machine computes in hardware (lean: torch only; read by the tuning and the run-time kernels)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX (oneDNN's bfloat16 GEMM; without them it emulates, slower than float32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False
