"""Weight-only integer quantization primitives: true-width bit packing (pack), group-wise
round-to-nearest grids with fake quantization and tensor storage (grid), and GPTQ (gptq)."""
from .gptq import gptq
from .grid import QTensor, QuantSpec, dequantize, fake_quantize, from_tensors, quantize, stored_bits, to_tensors
from .pack import BITS, pack, unpack

__all__ = [
    "BITS", "QTensor", "QuantSpec", "dequantize", "fake_quantize", "from_tensors", "gptq", "pack",
    "quantize", "stored_bits", "to_tensors", "unpack",
]
