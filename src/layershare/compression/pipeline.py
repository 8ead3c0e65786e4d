"""A recipe's stages, planned and run in order. Knows no algorithm: each stage's method is
built from its config, its budget planned before any long work, and its driver chosen by
what the method declares it needs (drivers/)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from layershare.adapters import Adapter
from layershare.compression.budget import Plan
from layershare.compression.drivers import (
    Callback,
    Callbacks,
    Residency,
    StageContext,
    StageReport,
    driver_for,
)
from layershare.config import RecipeError
from layershare.methods import METHODS, Method, build_method
from layershare.modules.store import StageStore, shared_modules
from layershare.recipe import Recipe


@dataclass
class Stage:
    index: int
    method: Method
    groups: list[list[int]]
    plan: Plan


@dataclass
class CompressionReport:
    stages: list[StageReport] = field(default_factory=list)
    seconds: float = 0.0

    # the last stage's (the MLP method of a two-stage recipe), for one-stage use
    @property
    def plan(self) -> Plan:
        return self.stages[-1].plan

    @property
    def groups(self):
        return self.stages[-1].groups

    @property
    def extra(self) -> dict:
        return self.stages[-1].extra


def plan_stages(model: nn.Module, adapter: Adapter, recipe: Recipe) -> list[Stage]:
    """Every stage's method, groups and budget, on the dense model, before any work."""
    stages = []
    for i, config in enumerate(recipe.stages):
        method = build_method(config)
        if adapter.task not in method.tasks:
            raise RecipeError(
                f"stage {i + 1}: method {method.name!r} compresses {' and '.join(method.tasks)} models, not "
                f"{adapter.task}; methods for {adapter.task}: "
                f"{', '.join(m for m, c in METHODS.items() if adapter.task in c.tasks)}")
        method.check(adapter)
        stages.append(Stage(i, method, *method.plan_for(model, adapter, recipe.bytes_per_param)))
    return stages


def run_stages(model: nn.Module, adapter: Adapter, stages: list[Stage], recipe: Recipe,
               batches: list[torch.Tensor], callbacks: list[Callback] | tuple = (),
               residency: Residency | None = None) -> CompressionReport:
    """Compress `model` in place, stage after stage. `residency`: where the weights are while it
    runs (default: all in memory; onload.Onloaded: read group by group from the checkpoint)."""
    t0 = time.time()
    cb = Callbacks(callbacks)
    residency = residency or Residency()
    model.eval()
    residency.place(model, recipe.device)
    for p in model.parameters():
        p.requires_grad_(False)
    shared_modules(model)
    report = CompressionReport()
    for stage in stages:
        ctx = StageContext(stage=stage.index, device=recipe.device, seed=recipe.seed,
                           store=StageStore(model, stage.index, recipe.device), callbacks=cb,
                           residency=residency, stats_dtype=getattr(torch, recipe.stats_dtype))
        if stage.method.needs().probe:  # the budget re-split over the groups by a probe of each (allocate.py;
            # whole model in memory: onload.compress_checkpoint refuses it before any work)
            from layershare.compression.allocate import allocated_plan

            stage.plan = allocated_plan(model, adapter, stage.method, stage.groups, stage.plan, batches,
                                        recipe.device, residency, recipe.bytes_per_param, ctx.stats_dtype)
        cb.on_stage_start(stage.index, stage.method, stage.plan)
        stage_report = driver_for(stage.method)(model, adapter, stage.method, batches, stage.groups, stage.plan, ctx)
        report.stages.append(stage_report)
        cb.on_stage_end(stage.index, stage_report)
    report.seconds = time.time() - t0
    return report
