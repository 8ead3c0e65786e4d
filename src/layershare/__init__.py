"""layershare: make pretrained transformers smaller by sharing parameters across layers.

The public names are imported on first use, so `layershare.load` (checkpoint/load.py)
imports nothing of the compressor.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # compressing (imports the compressor)
    "compress": "api", "plan": "api", "finetune": "api", "CompressionResult": "api",
    "compress_checkpoint": "compression.onload", "Callback": "compression.drivers",
    "Recipe": "recipe", "RecipeError": "config",
    "FiPSConfig": "methods", "SVDConfig": "methods", "SVDLLMConfig": "methods", "BasisSharingConfig": "methods",
    "BasisSharingAttentionConfig": "methods", "FFNMergeConfig": "methods", "MASAConfig": "methods",
    "QuantConfig": "methods",
    # loading, running and measuring (lean: no compressor)
    "load": "checkpoint.load", "load_model": "data.models", "load_preprocessing": "data.models",
    "evaluate_perplexity": "evaluate", "evaluate_tasks": "evaluate", "evaluate_accuracy": "evaluate",
}
__all__ = sorted(_EXPORTS)

try:  # transformers' from_pretrained loads layershare directories once layershare is imported (hf_quantizer.py)
    from layershare.checkpoint.hf_quantizer import register as _register

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
