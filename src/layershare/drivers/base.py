"""What every driver shares: the reports it fills, the callbacks it calls, and the context a
stage runs in."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..budget import Plan
from ..reconstruct import ReconStats
from ..store import StageStore


@dataclass
class GroupReport:
    blocks: list[int]
    rank: int
    nnz: int
    stats: ReconStats  # error on the method's objective, or the group's output error without one
    seconds: float
    info: dict = field(default_factory=dict)  # what the method reports for the group (MASA: weight errors)


@dataclass
class StageReport:
    method: str
    plan: Plan
    groups: list[GroupReport] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # what a whole-model method reports (ffn-merge: its window)


class Callback:
    """Hooks into a compression run; override any of them (progress, logging, benchmarks)."""

    def on_stage_start(self, stage: int, method, plan: Plan) -> None: ...
    def on_group_start(self, stage: int, group: int, blocks: list[int]) -> None: ...
    def on_group_end(self, stage: int, group: int, report: GroupReport) -> None: ...
    def on_stage_end(self, stage: int, report: StageReport) -> None: ...


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def on_stage_start(self, *a) -> None:
        for c in self.callbacks:
            c.on_stage_start(*a)

    def on_group_start(self, *a) -> None:
        for c in self.callbacks:
            c.on_group_start(*a)

    def on_group_end(self, *a) -> None:
        for c in self.callbacks:
            c.on_group_end(*a)

    def on_stage_end(self, *a) -> None:
        for c in self.callbacks:
            c.on_stage_end(*a)


@dataclass
class StageContext:
    """Where a stage runs: its index, the device, the seed, the store it registers shared
    modules with, and the callbacks."""

    stage: int
    device: str
    seed: int
    store: StageStore
    callbacks: Callback = field(default_factory=Callback)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)
