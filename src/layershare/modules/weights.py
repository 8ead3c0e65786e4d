"""Read and write a dense MLP linear's weight in the d x h orientation FiPS concatenates.

d is the model width, h the MLP width. d -> h maps (up/gate/fc1) store W as (h, d) in
nn.Linear and as (d, h) in GPT-2's Conv1D; h -> d maps store (d, h) and (h, d).
"""
from __future__ import annotations

import torch
from torch import nn

from layershare.adapters.base import IN


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def weight_out_in(module: nn.Module, device: str | torch.device | None = "cpu") -> torch.Tensor:
    """The weight as nn.Linear stores it, (out, in), whatever the layer type, on `device` (None:
    where it is): a method initialises beside its calibration statistics (the recipe's device;
    the CPU for one without statistics), and the pipeline moves what it builds to the recipe's
    device."""
    w = module.weight.detach()
    w = w if device is None else w.to(device)
    return w.t() if is_conv1d(module) else w  # Conv1D stores (in, out)


def weight_dxh(module: nn.Module, role: str, device: str | torch.device | None = "cpu") -> torch.Tensor:
    """The weight as a (d, h) matrix, whatever the layer type and direction (on `device`)."""
    as_in_out = weight_out_in(module, device).t()
    return as_in_out if role == IN else as_in_out.t()


def hidden_axis(module: nn.Module, role: str) -> int:
    """Which axis of the stored weight runs over the MLP's hidden units (h)."""
    h_is_out = role == IN
    if is_conv1d(module):  # Conv1D stores (in, out)
        return 1 if h_is_out else 0
    return 0 if h_is_out else 1  # Linear stores (out, in)
