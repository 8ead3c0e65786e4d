"""Compression methods by name. A new method is one file and one line here."""
from __future__ import annotations

from .base import Compressed, Group, Method
from .fips import FiPS

METHODS: dict[str, type[Method]] = {"fips": FiPS}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["Compressed", "Group", "METHODS", "Method", "get_method"]
