"""The small interface every method implements, and what it declares it needs.

A method is built from its typed config (`Method(config)`) and says, through `needs()`, what a
driver must give it (drivers/): the sequential driver walks the model group by group, the
whole-model driver hands it the model once. No driver asks which method it runs.

Every method:
  linears(adapter)                     the linears of a block it replaces, name -> role
  groups(n_blocks)                     the groups its budget is planned over
  plan(shapes, total, bytes_per_param) the budget of every group, checked before any long work
                                       (plan_model: the hook for a method that plans from the
                                       matrices themselves, MASA)
A `GroupMethod` (sequential driver) also:
  init(group, budget)                  compressed modules from the group's dense linears
  objective(adapter)                   what its error is measured on and tuning matches (None: the
                                       group's output error)
  materialize(compressed)              freeze into the run-time form
A `WholeModelMethod` (whole-model driver) implements compress(model, adapter, batches, plan, ctx).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from layershare.adapters.base import Adapter, get_path
from layershare.compression.budget import GroupBudget, GroupShape, Plan, count_params
from layershare.compression.objectives import resolve_objective
from layershare.config import StageConfig, make_groups
from layershare.modules.weights import in_out_features


@dataclass(frozen=True)
class Needs:
    """What a method asks of its driver."""

    driver: str = "sequential"  # "sequential" (group by group) or "whole-model" (drivers/ registry)
    grams: bool = False  # each linear's input second moment E[x x^T] (Group.grams)
    update_grams: bool = False  # the same on the inputs of the model compressed so far (Group.update_grams)
    tuning: bool = False  # record the objective's activations and tune by block-wise reconstruction
    # before the first group: compress every group one-shot at the method's probe_plans and let the
    # method re-split its budget from the model's loss increases (allocate()); compression/allocate.py
    probe: bool = False


@dataclass
class Group:
    """One group of blocks and the dense linears the method replaces."""

    index: int
    blocks: list[int]
    paths: list[str]  # dotted paths from the model root, in block order then linear order
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

    @property
    def stats_device(self) -> torch.device:
        """Where the group's calibration statistics are (the sequential driver accumulates them on
        the recipe's device), and so where a method factorizes; the CPU for a method without any."""
        for grams in (self.grams, self.update_grams):
            for g in (grams or {}).values():
                return g.device
        return torch.device("cpu")

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
                raise ValueError(f"group {self.index}: linears disagree on the model width ({d} vs {d_i})")
            d = d_i
            hs.append(h_i)
        n_bias = sum(m.bias.numel() for m in self.modules if getattr(m, "bias", None) is not None)
        return GroupShape(d=d, hs=tuple(hs), n_bias=n_bias, roles=tuple(self.roles), kinds=tuple(self.kinds))


@dataclass
class Compressed:
    """What init returns: the new modules by path, shared modules by part name (the store
    gives them their keys), what to tune, and anything the method reports for the group."""

    modules: dict[str, nn.Module]
    shared: dict[str, nn.Module] = field(default_factory=dict)
    params: list[nn.Parameter] = field(default_factory=list)
    pruner: object | None = None
    info: dict = field(default_factory=dict)


class Method:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[StageConfig]] = StageConfig
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "image-classification")  # the kinds of model it compresses

    def __init__(self, config: StageConfig | None = None):
        config = self.config_class() if config is None else config
        if type(config) is not self.config_class:
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def part(self) -> str:
        """What it compresses: "mlp" or "attention"."""
        return self.config.part

    def needs(self) -> Needs:
        return Needs()

    def linears(self, adapter: Adapter) -> dict[str, str]:
        """The linears of a block it replaces, name -> role (default: the adapter's MLP)."""
        return adapter.linears

    def groups(self, n_blocks: int) -> list[list[int]]:
        """The groups of blocks the budget is planned over (and compressed by, group by group)."""
        c = self.config
        return make_groups(n_blocks, getattr(c, "group_size", 1), getattr(c, "groups", None), self.name)

    def check(self, adapter: Adapter) -> None:
        """Refuse, before any work, a model this method cannot compress (raise RecipeError)."""

    def plan(self, shapes: list[GroupShape], total_params: int, bytes_per_param: int) -> Plan:
        raise NotImplementedError

    def plan_model(self, model: nn.Module, adapter: Adapter, groups: list[list[int]], total_params: int,
                   bytes_per_param: int) -> Plan:
        """The budget of `groups` of `model`: by default from the shapes of the linears it
        replaces (`plan`); a method that plans from the matrices themselves overrides this."""
        linears = self.linears(adapter)
        shapes = [Group.of(model, adapter, g, blocks, linears).shape() for g, blocks in enumerate(groups)]
        return self.plan(shapes, total_params, bytes_per_param)

    def plan_for(self, model: nn.Module, adapter: Adapter, bytes_per_param: int) -> tuple[list[list[int]], Plan]:
        groups = self.groups(len(adapter.blocks(model)))
        return groups, self.plan_model(model, adapter, groups, count_params(model), bytes_per_param)


class GroupMethod(Method):
    """Compressed one group of blocks at a time by the sequential driver."""

    def check(self, adapter: Adapter) -> None:
        self.objective(adapter)  # an objective the model cannot run is refused now

    def init(self, group: Group, budget: GroupBudget) -> Compressed:
        raise NotImplementedError

    def objective(self, adapter: Adapter):
        """What the group's error is measured on, and what tuning matches (objectives.Objective):
        by default the model's own MLP objective for a method on the MLPs; None for one on the
        attention (the driver then measures the group's output error)."""
        return resolve_objective("auto", adapter) if self.part == "mlp" else None

    def materialize(self, compressed: Compressed) -> None:
        """Freeze into the run-time form (default: nothing to train any more)."""
        for m in list(compressed.modules.values()) + list(compressed.shared.values()):
            m.requires_grad_(False)


class WholeModelMethod(Method):
    """Compresses the whole model in one call (the whole-model driver)."""

    def needs(self) -> Needs:
        return Needs(driver="whole-model")

    def compress(self, model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], plan: Plan, ctx) -> dict:
        """Replace modules of `model` in place; register shared modules with `ctx.store`;
        return what to report."""
        raise NotImplementedError
