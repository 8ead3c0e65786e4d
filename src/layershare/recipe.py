"""The recipe: what to compress, how much, and how to tune it. A dataclass with a YAML form."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class RecipeError(ValueError):
    pass


DTYPES = ("float32", "bfloat16", "float16")
INITS = ("whitened", "svd")  # FiPS's init (methods/fips.py)
OBJECTIVES = ("auto", "mlp", "residual", "block")  # what the tuning matches (objectives.py)
RATIO_OF = ("model", "mlp", "attention")
SCHEDULES = ("gradual", "static")
PRUNE_SCORES = ("magnitude", "activation")  # how FiPS ranks V entries (sparsity.py)


@dataclass
class Recipe:
    method: str = "fips"
    ratio: float = 0.2  # fraction of parameters removed
    ratio_of: str = "model"  # "model": of all parameters; "mlp"/"attention": of the part the method compresses
    group_size: int = 2  # adjacent blocks that share one basis
    groups: list[list[int]] | None = None  # explicit groups of block indices (overrides group_size)
    sparsity: float = 0.5  # fraction of V entries pruned (the budget solver then picks the rank)
    schedule: str = "gradual"  # "gradual" (GMP, cubic ramp) or "static" (final mask from the SVD init)
    prune_every: int = 10  # steps between mask updates (gradual)
    prune_end: float = 0.75  # fraction of the steps after which the mask is final (gradual)
    # rank V entries by the MLP-output error their removal causes, estimated from activation
    # statistics ("activation", the default, not in the paper; sparsity.py) or by |V| ("magnitude",
    # the paper's). Validation ppl at 20%: Gemma-3-270M 267.3 vs 343.5, SmolLM2-135M 30.44 vs 31.84
    prune_score: str = "activation"
    steps: int = 200  # optimiser steps per group (0: SVD init only)
    # FiPS init: "whitened" (SVD of the data-whitened weights; the default: Gemma-3-270M at 20%
    # validation ppl 343 vs 405 for "svd") or "svd" (of the raw weights, the paper's)
    init: str = "whitened"
    lr: float = 1e-3  # chosen on a validation book (Mansfield Park): 1e-4 -> ppl 37.4, 1e-3 -> 34.5 at 20%
    weight_decay: float = 0.0
    batch_tokens: int = 1024  # tokens per optimiser step
    loss: str = "mse"  # "mse" or "nmse" (each block's error divided by its output energy)
    objective: str = "auto"  # "mlp" | "residual" | "block" | "auto" (the model's default): see objectives.py
    nsamples: int = 64  # calibration windows (text) or images (vision)
    seqlen: int = 512  # tokens per calibration window
    propagate: str = "dense"  # inputs of the next group: dense model's ("dense") or compressed ("compressed")
    dtype: str = "float32"  # storage dtype of the saved model (counts in the index overhead)
    device: str = "cpu"
    seed: int = 0
    extra: dict = field(default_factory=dict)  # method-specific options
    # a second method on the attention, run first, e.g. {"method": "masa", "ratio": 0.5, "ratio_of": "attention"}
    # (fields override this recipe's); its ratio adds to this one's
    attention: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

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

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise RecipeError(msg)

        need(0 < self.ratio < 1, f"ratio must be in (0, 1), got {self.ratio}")
        need(self.ratio_of in RATIO_OF, f"ratio_of must be one of {RATIO_OF}, got {self.ratio_of!r}")
        need(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        need(0 <= self.sparsity < 1, f"sparsity must be in [0, 1), got {self.sparsity}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        need(self.prune_every >= 1, f"prune_every must be >= 1, got {self.prune_every}")
        need(0 < self.prune_end <= 1, f"prune_end must be in (0, 1], got {self.prune_end}")
        need(self.prune_score in PRUNE_SCORES,
             f"prune_score must be one of {PRUNE_SCORES}, got {self.prune_score!r}")
        need(self.batch_tokens >= 1, f"batch_tokens must be >= 1, got {self.batch_tokens}")
        need(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        need(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        need(self.loss in ("mse", "nmse"), f"loss must be 'mse' or 'nmse', got {self.loss!r}")
        need(self.nsamples >= 1 and self.seqlen >= 2, "nsamples must be >= 1 and seqlen >= 2")
        need(self.propagate in ("dense", "compressed"), f"propagate must be 'dense' or 'compressed', got {self.propagate!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self._device() is not None, f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.attention is not None:
            need(isinstance(self.attention, dict) and "method" in self.attention,
                 f"attention must be a dict with at least a 'method', got {self.attention!r}")
            self.attention_recipe()  # its fields are checked too
        if self.groups is not None:
            flat = [i for g in self.groups for i in g]
            need(all(len(g) >= 1 for g in self.groups), "every explicit group needs at least one block")
            need(len(flat) == len(set(flat)), f"explicit groups overlap: {self.groups}")

    def attention_recipe(self) -> "Recipe | None":
        """The recipe of the attention stage (this one's fields, overridden by `attention`)."""
        if self.attention is None:
            return None
        return Recipe.from_dict({**self.to_dict(), "attention": None, "groups": None, "extra": {},
                                 **self.attention})

    @property
    def bytes_per_param(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RecipeError(f"unknown recipe keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def make_groups(n_blocks: int, recipe: Recipe) -> list[list[int]]:
    """Groups of adjacent blocks (the last one may be smaller), or the recipe's explicit groups."""
    if recipe.groups is not None:
        bad = [i for g in recipe.groups for i in g if not 0 <= i < n_blocks]
        if bad:
            raise RecipeError(f"explicit groups name blocks {bad}, but the model has blocks 0..{n_blocks - 1}")
        return [list(g) for g in recipe.groups]
    return [list(range(i, min(i + recipe.group_size, n_blocks))) for i in range(0, n_blocks, recipe.group_size)]
