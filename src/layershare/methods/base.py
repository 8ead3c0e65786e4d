"""The small interface every method implements.

A method sees one group of blocks at a time and does three things:
  plan(shapes, total_params, recipe)  -> budget for every group, checked before any long work
  init(group, budget, recipe)         -> compressed modules initialised from the dense weights
  reconstruct is shared (reconstruct.py); a method may opt out with `tunable = False`
  materialize(compressed)             -> freeze into the run-time form (masks applied, packed)
A method that needs the whole model at once (ffn-merge chooses its window by the model's
loss) sets `whole_model = True` and implements compress_whole(model, adapter, recipe,
batches, plan) instead of init/materialize.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.base import Adapter, get_path
from ..budget import GroupBudget, GroupShape, Plan
from ..modules.weights import in_out_features
from ..recipe import Recipe, make_groups


@dataclass
class Group:
    """One group of blocks and the dense MLP linears the method replaces."""

    index: int
    blocks: list[int]
    paths: list[str]  # dotted paths from the model root, in block order then MLP order
    roles: list[str]
    modules: list[nn.Module]
    kinds: list[str]  # each linear's name within its block (its type: "mlp.up_proj")
    grams: dict[str, torch.Tensor] | None = None  # path -> E[x x^T] of the linear's input (if asked for)
    # path -> E[x x^T] of the linear's input when the model's earlier groups are already
    # compressed (for a closed-form update, if asked for)
    update_grams: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, model: nn.Module, adapter: Adapter, index: int, blocks: list[int],
           linears: dict[str, str] | None = None) -> "Group":
        """The group's linears: `linears` (name within the block -> role; default the adapter's MLP)."""
        prefix = adapter.blocks_path(model)
        linears = adapter.linears if linears is None else linears
        paths, roles, kinds = [], [], []
        for b in blocks:
            for name, role in linears.items():
                paths.append(f"{prefix}.{b}.{name}")
                roles.append(role)
                kinds.append(name)
        return cls(index, list(blocks), paths, roles, [get_path(model, p) for p in paths], kinds)

    def block_of(self) -> list[int]:
        """The block index of each linear (parallel to `paths`)."""
        per = len(self.paths) // len(self.blocks)
        return [b for b in self.blocks for _ in range(per)]

    def shape(self) -> GroupShape:
        d = None
        hs = []
        for m, role in zip(self.modules, self.roles):
            fin, fout = in_out_features(m)
            d_i, h_i = (fin, fout) if role == "in" else (fout, fin)
            if d is not None and d_i != d:
                raise ValueError(f"group {self.index}: MLP linears disagree on the model width ({d} vs {d_i})")
            d = d_i
            hs.append(h_i)
        n_bias = sum(m.bias.numel() for m in self.modules if getattr(m, "bias", None) is not None)
        return GroupShape(d=d, hs=tuple(hs), n_bias=n_bias, roles=tuple(self.roles), kinds=tuple(self.kinds))


@dataclass
class Compressed:
    """What init returns: the new modules by path, shared modules to register, what to tune."""

    modules: dict[str, nn.Module]
    shared: dict[str, nn.Module] = field(default_factory=dict)
    params: list[nn.Parameter] = field(default_factory=list)
    pruner: object | None = None


class Method:
    name: str = ""
    tunable: bool = True  # tuned by block-wise reconstruction (reconstruct.py) after init
    needs_gram: bool = False  # init needs each linear's input second moment (group.grams)
    whole_model: bool = False  # compresses the whole model in one pass (compress_whole) instead of init/materialize
    scope: str = "mlp"  # what it compresses: "mlp" or "attention"
    tasks: tuple[str, ...] = ("causal-lm", "image-classification")  # the kinds of model it can compress

    def gram_needed(self, recipe: Recipe) -> bool:
        """Whether init reads group.grams (the pipeline then accumulates them)."""
        return self.needs_gram

    def update_needed(self, recipe: Recipe) -> bool:
        """Whether init refits on compressed-model inputs (the pipeline then fills group.update_grams)."""
        return False

    def linears(self, adapter: Adapter) -> dict[str, str]:
        """The linears of a block it replaces, name -> role (default: the adapter's MLP)."""
        return adapter.linears

    def groups(self, n_blocks: int, recipe: Recipe) -> list[list[int]]:
        """The groups of blocks the budget is planned over (and compressed by, group by group)."""
        return make_groups(n_blocks, recipe)

    def plan(self, shapes: list[GroupShape], total_params: int, recipe: Recipe) -> Plan:
        raise NotImplementedError

    def plan_model(self, model: nn.Module, adapter: Adapter, groups: list[list[int]], total_params: int,
                   recipe: Recipe) -> Plan:
        """The budget of `groups` of `model`: by default from the shapes of the linears it
        replaces (`plan`); a method that plans from the matrices themselves overrides this."""
        linears = self.linears(adapter)
        shapes = [Group.of(model, adapter, g, blocks, linears).shape() for g, blocks in enumerate(groups)]
        return self.plan(shapes, total_params, recipe)

    def init(self, group: Group, budget: GroupBudget, recipe: Recipe) -> Compressed:
        raise NotImplementedError

    def materialize(self, compressed: Compressed) -> None:
        raise NotImplementedError
