"""A measurement on non-finite outputs is a failure, not a number: `watch(model)` checks the
model's output (logits) on every forward; the first NaN or infinity re-runs that input with a
hook on every module and raises NonFiniteResult naming the first module whose output was not
finite (modules report in the order they finish, so the innermost one comes first) and the
model's tensors that hold NaN or infinity."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class NonFiniteResult(RuntimeError):
    """NaN or infinity in a model's output or in a measure computed from it (a failed check:
    the command line exits 1)."""

    exit_code = 1


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return [out.logits]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(out) if t.is_floating_point())


def non_finite_tensors(model: nn.Module) -> list[str]:
    return [n for n, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" and t.numel()
            and not bool(torch.isfinite(t.detach()).all())]


@torch.no_grad()
def locate(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """Where a forward on (args, kwargs) first goes non-finite: '<module> (<class>)', or a note
    that every module's output was finite."""
    first: list[str] = []

    def hook(name):
        def fn(module, _inputs, out):
            if not first and not _finite(out):
                first.append(f"{name} ({type(module).__name__})")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return first[0] if first else "the model's output only"


def describe(model: nn.Module, args: tuple, kwargs: dict, what: str) -> str:
    bad = non_finite_tensors(model)
    tensors = (f"; tensors holding NaN or infinity: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad
               else "; every stored tensor is finite")
    return f"{what}: the first module with a NaN or infinite output is {locate(model, args, kwargs)}{tensors}"


@contextmanager
def watch(model: nn.Module, what: str = "the model's logits are not finite"):
    """Raise NonFiniteResult on the first forward of `model` (in the block) whose output holds NaN
    or infinity."""
    state = {"busy": False}

    def check(module, args, kwargs, out):
        if state["busy"] or _finite(out):
            return None
        state["busy"] = True
        try:
            message = describe(module, args, kwargs, what)
        finally:
            state["busy"] = False
        raise NonFiniteResult(message)

    if getattr(model, "_layershare_watched", False):  # already watched by a caller: its message wins
        yield
        return
    handle = model.register_forward_hook(check, with_kwargs=True)
    model._layershare_watched = True
    try:
        yield
    finally:
        handle.remove()
        model._layershare_watched = False
