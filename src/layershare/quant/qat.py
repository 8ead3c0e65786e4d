"""Quantization-aware fine-tuning: `finetune` of a quantized model trains every quantized tensor
through fake quantization (straight-through), on the grid its codes are stored on, then stores
the codes of what it learnt (round to nearest on that grid, which is what the fake-quantized
forward computed). The fake quantization takes each group's range from the weights by min/max,
whatever observer chose the stored one: the weights start as the stored values, whose extremes
sit on the ends of their grid when an MSE search clipped them, so the training starts (up to
rounding) from the stored model. The dense model quantized alone and distilled this way is the paper's QAT
baseline (`compress --method none --bits 2`, then `finetune`).

enable(model)  before training: FiPS's shared bases and V through their own fake-quantization
               hooks (SharedBasis/SharedBasisLinear.fake_quant, as in FiPS's tuning), every other
               quantized weight through a torch parametrization
finish(model)  after training (V packed again): the parametrizations removed (the float weights
               kept), every quantized tensor quantized again into its packed buffers
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.quant.grid import QuantSpec, fake_quantize
from layershare.quant.model import _owner, quantize_tensor, spec_of


class FakeQuant(nn.Module):
    """A parametrization: the weight as its codes would hold it (groups along the input axis)."""

    def __init__(self, spec: QuantSpec, input_first: bool):
        super().__init__()
        self.spec, self.input_first = spec, input_first

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w.t(), self.spec).t() if self.input_first else fake_quantize(w, self.spec)


def enable(model: nn.Module) -> int:
    """Put every quantized tensor of `model` (model.layershare_quant) through fake quantization.
    Returns how many."""
    qentry = model.layershare_quant
    for name, t in qentry["tensors"].items():
        spec = spec_of(qentry, name)
        owner, attr = _owner(model, name)
        if isinstance(owner, SharedBasis) and attr == "U":
            owner.fake_quant, owner.fake_quant_input_first = spec, t["input_first"]
        elif isinstance(owner, SharedBasisLinear) and attr in ("V", "V_values"):
            owner.fake_quant = spec
        elif attr in owner._parameters:
            parametrize.register_parametrization(owner, attr, FakeQuant(spec, t["input_first"]))
        else:
            raise ValueError(f"quantization-aware fine-tuning cannot train {name} (a {type(owner).__name__}."
                             f"{attr}); fine-tune before quantizing")
    return len(qentry["tensors"])


def finish(model: nn.Module) -> None:
    """Back to a stored quantized model: parametrizations off (their float weights kept), fake
    quantization off, every quantized tensor's codes taken again from its trained weights."""
    qentry = model.layershare_quant
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            for attr in list(m.parametrizations):
                parametrize.remove_parametrizations(m, attr, leave_parametrized=False)
        if isinstance(m, (SharedBasis, SharedBasisLinear)):
            m.fake_quant = None
    for name, t in qentry["tensors"].items():
        owner, attr = _owner(model, name)
        with torch.no_grad():
            quantize_tensor(owner, attr, t["input_first"], spec_of(qentry, name))
