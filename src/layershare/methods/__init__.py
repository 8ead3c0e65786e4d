"""Compression methods by name. A new method is one file and one line here."""
from __future__ import annotations

from .base import Compressed, Group, Method
from .basis_sharing import BasisSharing, BasisSharingAttention
from .ffn_merge import FFNMerge
from .fips import FiPS
from .masa import MASA
from .svd import SVD, SVDLLM

METHODS: dict[str, type[Method]] = {m.name: m for m in (FiPS, SVD, SVDLLM, BasisSharing, BasisSharingAttention,
                                                            FFNMerge, MASA)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["Compressed", "Group", "METHODS", "Method", "get_method"]
