"""Did the run remove what was asked? The target of a recipe is the sum of its stages' requested
ratios, each as a fraction of the whole model's parameters (a stage with an explicit `rank` has
no target, nor one sized by an explicit ffn-merge window). It is checked twice: the plan before any work (ranks round, N:M patterns round the
rank to a multiple of M, ffn-merge removes whole MLPs), and the measured model before it is
saved (weights that prune to nothing, or a stage that kept what it should have removed). A miss
of more than RATIO_TOLERANCE (one percentage point of the model's parameters) is an error
unless allowed; allowed, it is a loud warning kept in the saved report."""
from __future__ import annotations

import warnings

RATIO_TOLERANCE = 0.01


class RatioMissError(ValueError):
    """The model would be (or was) compressed by a ratio other than the one asked for."""


class RatioMissWarning(UserWarning):
    """The same, accepted with allow_ratio_miss."""


def stage_target(stage) -> float | None:
    """The stage's requested ratio of the whole model's parameters (None: sized otherwise, by an
    explicit rank or window: its config's `sized_by` fields)."""
    c, plan = stage.method.config, stage.plan
    if any(getattr(c, f) is not None for f in c.sized_by):
        return None
    return c.ratio if c.ratio_of == "model" else c.ratio * plan.mlp_params / plan.total_params


def recipe_target(stages) -> float | None:
    targets = [t for t in (stage_target(s) for s in stages) if t is not None]
    return sum(targets) if targets else None


def _targets_of(stages) -> str:
    """Which ratio each stage was given, when there are several: ' (masa 4.66%: ratio 0.2 of the
    attention; fips 20.00%: ratio 0.2 of the model)'."""
    parts = [f"{s.method.name} {t:.2%}: ratio {s.method.config.ratio:g} of the {s.method.config.ratio_of}"
             for s in stages if (t := stage_target(s)) is not None]
    return f" ({'; '.join(parts)})" if len(parts) > 1 else ""


def check_ratio(stages, got: float, what: str, allow: bool) -> str | None:
    """None when `got` (a fraction of the model's parameters removed) is within the tolerance of
    the recipe's target; else raise RatioMissError, or with `allow` warn and return the message."""
    target = recipe_target(stages)
    if target is None or abs(got - target) <= RATIO_TOLERANCE:
        return None
    msg = (f"{what} {got:.2%} of the model's parameters against a target of {target:.2%}{_targets_of(stages)} "
           f"({(got - target) * 100:+.2f} points; the tolerance is {RATIO_TOLERANCE * 100:.0f} point)")
    if not allow:
        raise RatioMissError(f"{msg}; pass --allow-ratio-miss (allow_ratio_miss=True) to accept it")
    warnings.warn(f"RATIO MISSED: {msg}", RatioMissWarning, stacklevel=2)
    return msg
