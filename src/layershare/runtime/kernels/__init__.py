"""Native kernels for compressed layers at run time: products with a sparse V read straight from
its stored form (values + bitmask; bitmask.cpp, wrapped by ops.py, built by build.py)."""
from layershare.runtime.kernels.ops import (
    available,
    expand,
    in_product,
    isa,
    out_product,
    prepare,
    reference_dense,
)

__all__ = ["available", "expand", "in_product", "isa", "out_product", "prepare", "reference_dense"]
