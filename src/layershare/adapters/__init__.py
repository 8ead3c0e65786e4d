"""Architecture adapters: `get_adapter(model)` finds the one for a model or says which exist."""
from __future__ import annotations

from torch import nn

from layershare.adapters.base import IN, OUT, Adapter, get_path, set_path
from layershare.adapters.gpt2 import GPT2
from layershare.adapters.gpt_neox import GPT_NEOX
from layershare.adapters.llama import GATED
from layershare.adapters.opt import OPT
from layershare.adapters.vit import TIMM_VIT, VIT, VIT_LEGACY

ADAPTERS: tuple[Adapter, ...] = (GATED, GPT2, OPT, GPT_NEOX, VIT, VIT_LEGACY, TIMM_VIT)


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types if a is not TIMM_VIT}) + ["timm VisionTransformer"]


def get_adapter(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    for adapter in ADAPTERS:  # the model type is known but its layout is not: blocks() will say what is missing
        if adapter.matches(model, strict=False):
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedModelError(
        f"layershare has no adapter for {type(model).__name__} (model_type={model_type!r}). "
        f"Supported model types: {', '.join(supported_model_types())}."
    )


__all__ = ["ADAPTERS", "Adapter", "IN", "OUT", "UnsupportedModelError", "get_adapter",
           "get_path", "set_path", "supported_model_types"]
