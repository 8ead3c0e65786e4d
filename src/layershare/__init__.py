"""layershare: make pretrained transformers smaller by sharing parameters across layers.

The public names are imported on first use, so `import layershare.io` (loading a compressed
model) does not import the compressor.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CompressionResult": "api", "compress": "api", "plan": "api", "evaluate_accuracy": "api",
    "evaluate_perplexity": "api", "evaluate_tasks": "api", "finetune": "api", "load": "api", "load_model": "api",
    "load_preprocessing": "api", "Recipe": "recipe", "RecipeError": "config", "Callback": "drivers",
    "FiPSConfig": "methods", "SVDConfig": "methods", "SVDLLMConfig": "methods", "BasisSharingConfig": "methods",
    "BasisSharingAttentionConfig": "methods", "FFNMergeConfig": "methods", "MASAConfig": "methods",
    "QuantConfig": "methods", "compress_checkpoint": "onload",
}
__all__ = sorted(_EXPORTS)

try:  # transformers' from_pretrained loads layershare directories once layershare is imported (hf_quantizer.py)
    from .hf_quantizer import register as _register

    _register()
except ImportError:  # a transformers without the quantizer registry: layershare.load still works
    pass


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layershare' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
