"""The recipe: a list of stages (each a method's typed config, run in order) and the run's own
settings (calibration size, storage dtype, device, seed, the statistics' dtype). YAML in and
out; versioned.

    Recipe(stages=[MASAConfig(ratio=0.5, ratio_of="attention"), FiPSConfig(ratio=0.2)], nsamples=64)
    Recipe.of("fips", ratio=0.2, steps=50, nsamples=16)   # one stage; run fields split off

Version 1 recipes (one flat dict: method, ratio, FiPS's fields, `extra`, `attention`), as
saved in directories before 2026-11-27, still load (`from_dict` converts them); options a
method never read are dropped there, unknown ones are refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from layershare.config import (
    PARTS,
    RecipeError,
    StageConfig,
    check_fields,
    make_groups,
    need,
)
from layershare.methods import FiPSConfig, config_class, config_from_dict

__all__ = ["Recipe", "RecipeError", "make_groups"]

VERSION = 2
RUN_FIELDS = ("nsamples", "seqlen", "dtype", "device", "seed", "stats_dtype")
# every key of a version-1 recipe, and those of its fields a method ignored there
LEGACY_KEYS = {"method", "ratio", "ratio_of", "group_size", "groups", "sparsity", "schedule", "prune_every",
               "prune_end", "prune_score", "steps", "init", "lr", "weight_decay", "batch_tokens", "loss",
               "objective", "nsamples", "seqlen", "propagate", "dtype", "device", "seed", "extra", "attention"}
LEGACY_IGNORED = {"masa": ("group_size",)}  # masa read its group size from `extra` only


def _stage(s) -> StageConfig:
    if isinstance(s, StageConfig):
        return s
    return config_from_dict(s)


@dataclass
class Recipe:
    stages: list[StageConfig] = field(default_factory=lambda: [FiPSConfig()])
    # calibration windows (text) or images (vision); 128 since 2026-12-05 (64 before): validation ppl at
    # 20% SmolLM2-135M 29.37 against 29.75, Gemma-3-270M 91.15 against 98.20 (docs/analysis.md)
    nsamples: int = 128
    seqlen: int = 512  # tokens per calibration window
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype of the saved model
    device: str = "cpu"
    seed: int = 0
    # the calibration statistics (each linear's input second moment), accumulated on the recipe's
    # device: "float64" (exact to the rounding of the sums) or "float32" (a relative error of ~1e-7,
    # tests/test_device_stats.py, but Gemma-3-270M at 20% lost 2.5% of validation perplexity with it,
    # 93.46 against 91.15, and the time it saved was within this CPU's drift: docs/analysis.md)
    stats_dtype: Literal["float64", "float32"] = "float64"
    version: int = VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)):
            self.stages = [self.stages]
        stages = []
        for i, s in enumerate(self.stages):
            try:
                stages.append(_stage(s))
            except RecipeError as e:
                raise RecipeError(f"stage {i + 1}: {e}") from None
        self.stages = stages
        check_fields(self, "recipe", skip=("stages",))
        self.validate()

    def validate(self) -> None:
        need(self.version == VERSION, f"recipe version {self.version} is not supported (this layershare reads "
                                      f"version {VERSION}, and version 1 through from_dict)")
        need(len(self.stages) >= 1, "a recipe needs at least one stage")
        need(self.nsamples >= 1 and self.seqlen >= 2, "recipe: nsamples must be >= 1 and seqlen >= 2")
        need(self._device() is not None, f"recipe: device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.stages):
            if s.part in seen:
                raise RecipeError(f"stage {i + 1} ({s.method}) compresses {PARTS[s.part]}, which stage "
                                  f"{seen[s.part] + 1} ({self.stages[seen[s.part]].method}) already compresses")
            seen[s.part] = i
        last = self.stages[-1]
        for i, s in enumerate(self.stages[:-1]):
            need(s.part != "weights", f"stage {i + 1} ({s.method}) quantizes the weights: it must be the last stage "
                                      f"(stage {len(self.stages)} is {last.method})")

    # ---- convenience -------------------------------------------------------------------
    @classmethod
    def of(cls, method: str = "fips", **fields) -> "Recipe":
        """A one-stage recipe: run fields (nsamples, seqlen, dtype, device, seed, stats_dtype) go
        to the recipe, the rest to the method's config."""
        run = {k: fields.pop(k) for k in RUN_FIELDS if k in fields}
        try:
            stage = config_class(method).from_dict(fields)
        except RecipeError as e:
            raise RecipeError(f"stage 1: {e}") from None
        return cls(stages=[stage], **run)

    @property
    def main(self) -> StageConfig:
        """The last stage (the MLP method of a two-stage recipe)."""
        return self.stages[-1]

    @property
    def method(self) -> str:
        """The stages' methods in order, joined by '+'."""
        return "+".join(s.method for s in self.stages)

    @property
    def bytes_per_param(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def _device(self):
        import torch

        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            return None
        return dev if dev.type in ("cpu", "cuda") else None

    def check_device(self) -> None:
        """Raise RecipeError unless this machine has the recipe's device (checked when a
        compression starts, not when a recipe is read: a recipe may travel between machines)."""
        import torch

        dev = self._device()
        if dev is not None and dev.type == "cuda" and not (
                torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())):
            raise RecipeError(f"device {self.device!r}: this machine has no such CUDA device "
                              f"(torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)); use --device cpu")

    # ---- dict / YAML ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": self.version, "stages": [s.to_dict() for s in self.stages],
                **{k: getattr(self, k) for k in RUN_FIELDS}}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe must be a mapping, got {type(d).__name__}")
        if "stages" not in d:
            return cls._from_v1(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}; known: {sorted(known)}")
        stages = d["stages"]
        if not isinstance(stages, list):
            raise RecipeError(f"recipe: stages must be a list of stage mappings, got {stages!r}")
        return cls(**d)

    @classmethod
    def _from_v1(cls, d: dict) -> "Recipe":
        """A version-1 (flat) recipe: the attention stage first, then the method."""
        unknown = sorted(set(d) - LEGACY_KEYS)
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}; known: {sorted(LEGACY_KEYS | {'stages', 'version'})}")
        run = {k: d[k] for k in RUN_FIELDS if k in d}
        stages = []
        att = d.get("attention")
        if att is not None:
            if not isinstance(att, dict) or "method" not in att:
                raise RecipeError(f"attention must be a mapping with at least a 'method', got {att!r}")
            merged = {**{k: v for k, v in d.items() if k not in ("attention", "groups", "extra")}, **att}
            stages.append(_v1_stage(merged, len(stages) + 1))
        stages.append(_v1_stage(d, len(stages) + 1))
        return cls(stages=stages, **run)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({e})") from None
        return cls.from_dict(data or {})

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _v1_stage(flat: dict, index: int) -> StageConfig:
    method = flat.get("method", "fips")
    try:
        cls = config_class(method)
        names = set(cls.field_names()) - set(LEGACY_IGNORED.get(method, ()))
        fields = {k: v for k, v in flat.items() if k in names}
        extra = flat.get("extra") or {}
        if not isinstance(extra, dict):
            raise RecipeError(f"extra must be a mapping, got {extra!r}")
        fields.update(extra)
        return cls.from_dict(fields)
    except RecipeError as e:
        raise RecipeError(f"stage {index}: {e}") from None


def quick_recipe() -> Recipe:
    """A few-minute FiPS recipe for a first look (the README's first command): the one-shot
    FiPS (whitened init, pruning by activation score, no tuning steps) on 16 calibration
    windows. On SmolLM2-135M at 20%, the first 4 windows of the held-out book: ppl 37.39 against
    dense 29.42 (+27%; 36.43 at the former fixed sparsity 0.5), where the default recipe gives
    +6.6% on the whole book; 20 tuning steps measured no better (most groups kept their init),
    so the quick recipe has none."""
    return Recipe(stages=[FiPSConfig(steps=0)], nsamples=16, seqlen=512)


PRESETS = {"default": Recipe, "quick": quick_recipe}
