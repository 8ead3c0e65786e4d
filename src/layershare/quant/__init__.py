"""Weight-only integer quantization primitives: true-width bit packing (pack), group-wise
round-to-nearest grids with fake quantization and tensor storage (grid), and GPTQ (gptq)."""
from layershare.quant.gptq import SingularHessianError, gptq, gptq_masked
from layershare.quant.grid import (
    QTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    from_tensors,
    quantize,
    stored_bits,
    to_tensors,
)
from layershare.quant.pack import BITS, pack, unpack

__all__ = [
    "BITS", "QTensor", "QuantSpec", "SingularHessianError", "dequantize", "fake_quantize", "from_tensors", "gptq",
    "gptq_masked", "pack",
    "quantize", "stored_bits", "to_tensors", "unpack",
]
