"""What every driver shares: the reports it fills, the callbacks it calls, and the context a
stage runs in."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from layershare.compression.budget import Plan
from layershare.compression.reconstruct import ReconStats
from layershare.modules.store import StageStore


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


class Residency:
    """Where the model's weights are while a stage runs and which groups this process
    compresses. This default holds the whole model in memory and compresses every group;
    onload.Onloaded reads each group's blocks from the checkpoint when its turn comes, stages
    the result on disk, resumes after a crash and splits the groups among torchrun's ranks."""

    def place(self, model: nn.Module, device: str) -> None:
        model.to(device)

    def capture(self, model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device: str, adapter):
        """Block 0's inputs and every block's arguments. The blocks are skipped (one forward of the
        embeddings instead of the whole model: 44 s -> 1 s for SmolLM2's 64 x 512 tokens on 2 cores)
        when a one-row probe shows their arguments do not depend on their outputs."""
        from layershare.compression.capture import arguments_independent, capture_inputs

        skip = arguments_independent(model, blocks, batches[0], device, adapter)
        return capture_inputs(model, blocks, batches, device, adapter, skip_blocks=skip)

    def span(self, n_groups: int) -> range:
        """The groups this process compresses."""
        return range(n_groups)

    def resume(self, stage: int, groups: list[list[int]], streams: dict) -> tuple[int, int, list[GroupReport]]:
        """(first group to compress, the group whose inputs `streams` now hold, the reports of
        the groups before the first that were compressed earlier). May replace the streams'
        hidden states with staged ones."""
        return self.span(len(groups)).start, 0, []

    def earlier(self, stage: int, group: int, groups: list[list[int]], streams: dict) -> GroupReport | None:
        """The report of `group` if it was compressed earlier (by another run, or a process
        count since changed), rebuilt in the model and the streams at the next group's input;
        None if it is to be compressed now."""
        return None

    def onload(self, model: nn.Module, blocks: list[int]) -> None: ...

    def offload(self, model: nn.Module, blocks: list[int]) -> None: ...

    def done(self, model: nn.Module, stage: int, group: int, report: GroupReport, streams: dict) -> None:
        """A group is compressed (its modules in the model, the streams at the next group's input)."""


@dataclass
class StageContext:
    """Where a stage runs: its index, the device, the seed, the store it registers shared
    modules with, the callbacks, where the weights are (Residency), and the dtype the
    calibration statistics accumulate in (on `device`)."""

    stage: int
    device: str
    seed: int
    store: StageStore
    callbacks: Callback = field(default_factory=Callback)
    residency: Residency = field(default_factory=Residency)
    stats_dtype: torch.dtype = torch.float64

    def generator(self, group: int = 0) -> torch.Generator:
        """The random numbers of one group, independent of every other group's (so a group
        compressed after a resume, or on another process, draws the same ones)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.stage * 10_007 + group)
