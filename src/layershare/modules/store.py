"""The shared-module store: where a compressed model keeps the modules its layers share
(FiPS's bases, the SVD factors' input sides, MASA's atoms), and how they are named.

They live in one `nn.ModuleDict` on the model (`layershare_bases`), so they are saved once
and moved with the model. Keys are `s{stage}_g{group}_{part}` (the method names the part:
"basis", "l3", "t0"), so stages and groups never collide. Directories written before this
scheme ("0", "0_s1", "atoms0_1", "attn0") load as they are: the loader reads the keys from
the saved config, never builds them.
"""
from __future__ import annotations

from torch import nn

BASES_ATTR = "layershare_bases"


def shared_modules(model: nn.Module) -> nn.ModuleDict:
    """The model's store, created empty if it has none."""
    if not hasattr(model, BASES_ATTR):
        model.add_module(BASES_ATTR, nn.ModuleDict())
    return getattr(model, BASES_ATTR)


def key(stage: int, group: int | str, part: str) -> str:
    return f"s{stage}_g{group}_{part}"


class StageStore:
    """What one stage writes to the store: `add(group, part, module)`."""

    def __init__(self, model: nn.Module, stage: int, device=None):
        self.modules, self.stage, self.device = shared_modules(model), stage, device

    def add(self, group: int | str, part: str, module: nn.Module) -> str:
        k = key(self.stage, group, part)
        if k in self.modules:
            raise RuntimeError(f"shared module {k!r} already exists")
        self.modules[k] = module if self.device is None else module.to(self.device)
        return k
