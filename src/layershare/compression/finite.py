"""Never save a broken model: the dense weights are checked before any work, and every
group's result (its modules' tensors and its error) as soon as it is made."""
from __future__ import annotations

import math

import torch
from torch import nn


class NonFiniteError(ValueError):
    """A NaN or infinity where a weight or an error must be finite."""


def non_finite_tensors(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the floating tensors of `module` (parameters and buffers, packed V included)
    holding a NaN or an infinity (tensors on the meta device, which hold no values, are skipped)."""
    bad = []
    for name, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or not t.is_floating_point() or not t.numel():
            continue
        if not bool(torch.isfinite(t.detach()).all()):
            bad.append(f"{prefix}{name}")
    return bad


def check_dense(model: nn.Module) -> None:
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteError(f"the model to compress has NaN or infinite weights in {len(bad)} tensor(s): "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; nothing was done")


def check_group(where: str, modules: dict[str, nn.Module], errors: tuple[float, ...] = ()) -> None:
    """Raise unless every tensor of the group's new modules and its errors are finite."""
    bad = [n for path, m in modules.items() for n in non_finite_tensors(m, f"{path}." if path else "")]
    if bad:
        raise NonFiniteError(f"{where}: the compressed tensors {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                             "hold NaN or infinite values; the run stopped and nothing was saved")
    if any(not math.isfinite(e) for e in errors):
        raise NonFiniteError(f"{where}: its reconstruction error is {errors}; the run stopped and nothing was saved")
