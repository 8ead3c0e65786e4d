"""Compression methods by name, each with its typed config. A new method is one file (its
config dataclass and its Method) and one line here."""
from __future__ import annotations

from layershare.config import RecipeError, StageConfig
from layershare.methods.base import (
    Compressed,
    Group,
    GroupMethod,
    Method,
    Needs,
    WholeModelMethod,
)
from layershare.methods.basis_sharing import (
    BasisSharing,
    BasisSharingAttention,
    BasisSharingAttentionConfig,
    BasisSharingConfig,
)
from layershare.methods.ffn_merge import FFNMerge, FFNMergeConfig
from layershare.methods.fips import FiPS, FiPSConfig
from layershare.methods.masa import MASA, MASAConfig
from layershare.methods.quant import QuantConfig, Quantize
from layershare.methods.svd import SVD, SVDLLM, SVDConfig, SVDLLMConfig

METHODS: dict[str, type[Method]] = {m.name: m for m in (FiPS, SVD, SVDLLM, BasisSharing, BasisSharingAttention,
                                                            FFNMerge, MASA, Quantize)}


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def config_class(name: str) -> type[StageConfig]:
    return method_class(name).config_class


def config_from_dict(d: dict) -> StageConfig:
    """A stage config from its dict form ({"method": NAME, ...fields})."""
    if not isinstance(d, dict) or "method" not in d:
        raise RecipeError(f"a stage must be a mapping with a 'method', got {d!r}")
    return config_class(d["method"]).from_dict(d)


def build_method(config: StageConfig) -> Method:
    return method_class(config.method)(config)


def get_method(name: str) -> Method:
    """The method with its default config."""
    return method_class(name)()


__all__ = ["BasisSharingAttentionConfig", "BasisSharingConfig", "Compressed", "FFNMergeConfig", "FiPSConfig", "Group",
           "GroupMethod", "MASAConfig", "METHODS", "QuantConfig", "Method", "Needs", "SVDConfig", "SVDLLMConfig", "WholeModelMethod",
           "build_method", "config_class", "config_from_dict", "get_method", "method_class"]
