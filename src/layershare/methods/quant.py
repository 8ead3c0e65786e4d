"""Weight-only integer quantization as a recipe stage (alone, or after any method): every linear
weight the model then holds (quant/model.py: plain linears, shared bases, V values, atoms;
embeddings and LM head with `embeddings=True`), group-wise, 2/3/4/8 bits.

How the codes are chosen (`algorithm`):
- "gptq": sequential GPTQ (quant/sequential.py), block by block, each tensor's Hessian gathered
  from the inputs the model quantized so far feeds it, in the order of the block's forward, for
  every tensor read inside the blocks (quant/inputs.py): plain linears; a shared basis U, its
  Hessian summed over the layers and blocks that share it (unless layers read it along both
  axes, as FiPS's U: rounded, by measurement, quant/inputs.py); a dense V; a sparse V's kept
  values (quant/gptq.gptq_masked: the pattern stays, the pruned entries exactly 0). Options:
  `damp` (the reference's percdamp), `blocksize` (lazy batches), `act_order` (columns by
  decreasing Hessian diagonal, with static groups: the stored layout is unchanged), `observer`
  (each group's range searched for the least error when GPTQ reaches it: the default). The rest
  (FiPS's bases, MASA's atoms, embeddings, the LM head) is rounded to nearest, before GPTQ
  starts, so that GPTQ's inputs come from it quantized. A Hessian still singular after
  dampening stops the run with the tensor's name (nothing is written).
- "rtn": round to nearest on the group's grid (quant/grid.py), everything.
The stage prints its settings and which tensors got which. Quantization-aware training is not a
stage: FiPS's `qat_bits` tunes the factors through fake quantization, and this stage then stores
what they learnt (the CLI's `--quant qat` sets "rtn": the same grid, nothing moved).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from layershare.adapters import Adapter
from layershare.compression.budget import Plan, count_params
from layershare.config import StageConfig, need
from layershare.methods.base import WholeModelMethod
from layershare.modules.shared_basis import SharedBasis
from layershare.quant.grid import QuantSpec
from layershare.quant.inputs import Target, gptq_targets
from layershare.quant.model import quant_entry, quantize_tensor, targets
from layershare.quant.pack import BITS


@dataclass
class QuantConfig(StageConfig):
    """bits: per code (2, 3, 4 or 8); basis_bits: per code of the shared bases (FiPS's and Basis
    Sharing's U; None: `bits`); group_size: input entries per scale; symmetric: absmax grid
    (else min/max with a zero point); observer: how a group's range is chosen ("minmax", "mse"
    (quant/grid.py) or "auto": "mse" under GPTQ, "minmax" under RTN); algorithm: "gptq" or
    "rtn"; embeddings: quantize the input embeddings and the LM head too (rounded); damp,
    blocksize, act_order: GPTQ's. `ratio` does not apply (the size follows from bits)."""

    method = "quant"
    part: ClassVar[str] = "weights"
    sized_by: ClassVar[tuple[str, ...]] = ("bits",)

    bits: int = 4
    # a basis is read by every layer of its group: its error reaches all of them. FiPS 20% one-shot on SmolLM2, 4-bit
    # GPTQ, first 4 validation windows (float 35.35): U at 4 bits 103.4, at 8 bits 46.6, for ~3% more bytes
    basis_bits: int | None = 8
    group_size: int = 128
    # a zero point per group (4 more bits per group): SmolLM2, first 8 validation windows (dense 28.45), 3-bit GPTQ
    # 54.79 against 75.87 symmetric, 4-bit GPTQ 34.56 against 36.23, 4-bit RTN 36.44 against 41.21
    symmetric: bool = False
    # sequential GPTQ: on SmolLM2 at 3 bits 73.6 against RTN's 212 on the validation book (docs/quant_llm.md)
    algorithm: Literal["rtn", "gptq"] = "gptq"
    embeddings: bool = False
    damp: float = 0.01  # GPTQ's dampening, a fraction of the mean Hessian diagonal (the reference's)
    blocksize: int = 128  # GPTQ's lazy batches, in columns (the reference's)
    # GPTQ: columns by decreasing Hessian diagonal, static groups (the layout unchanged). SmolLM2, 16 validation
    # windows: GPTQ-4 30.25 against 32.85 without, GPTQ-3 37.45 against 44.00 (docs/quant_llm.md, rows "-act")
    act_order: bool = True
    # how each group's range is chosen (quant/grid.py): "minmax", "mse" (the range shrunk to the smallest error) or
    # "auto": "mse" under GPTQ, "minmax" under RTN. SmolLM2, 16 validation windows (docs/quant_llm.md): GPTQ-3 44.00
    # against 54.15, GPTQ-4 32.85 against 33.90; RTN-3 101.32 against 108.66 but RTN-4 36.48 against 35.76, and RTN
    # also stores what QAT trained through its min/max grid, which must not move
    observer: Literal["auto", "minmax", "mse"] = "auto"
    # GPTAQ's alpha (asymmetric calibration, quant/gptq.toward_float): how far GPTQ aims at the float model's
    # outputs instead of each layer's own output on the quantized inputs (0: plain GPTQ; 1: the float model's; the
    # GPTAQ reference uses 0.25). Above 0 it costs a float copy of each unit's blocks and their forwards (about
    # twice the stage's time). SmolLM2, 4 bits, 16 validation windows: 29.05 against 30.25 at 0; after FiPS 20%
    # 32.22 against 33.53 (another FiPS run: 31.78 at 1, 32.40 at 0.25) (docs/results.md)
    gptaq: float = 1.0

    def validate(self) -> None:
        need(self.bits in BITS, f"{self.method}: bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        need(self.basis_bits is None or self.basis_bits in BITS,
             f"{self.method}: basis_bits must be one of {', '.join(map(str, BITS))} or null, got {self.basis_bits}")
        need(self.group_size >= 1, f"{self.method}: group_size must be a positive integer, got {self.group_size}")
        need(self.algorithm in ("rtn", "gptq"), f"{self.method}: algorithm must be 'rtn' or 'gptq', got "
                                                f"{self.algorithm!r}")
        need(0 <= self.damp < 1, f"{self.method}: damp must be in [0, 1), got {self.damp}")
        need(0 <= self.gptaq <= 1, f"{self.method}: gptaq must be in [0, 1], got {self.gptaq}")
        need(self.blocksize >= 1, f"{self.method}: blocksize must be a positive integer, got {self.blocksize}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.ranges)

    @property
    def ranges(self) -> str:
        """The observer that runs ("auto" resolved: "mse" under GPTQ, "minmax" under RTN)."""
        if self.observer != "auto":
            return self.observer
        return "mse" if self.algorithm == "gptq" else "minmax"

    def spec_for(self, owner: nn.Module) -> QuantSpec:
        """The grid of a tensor of `owner`: basis_bits for a shared basis, else bits."""
        if isinstance(owner, SharedBasis) and self.basis_bits is not None:
            return QuantSpec(self.basis_bits, self.group_size, self.symmetric, self.ranges)
        return self.spec

    def describe(self) -> str:
        """The settings in words (printed when the stage starts)."""
        grid = (f"{self.bits}-bit codes, groups of {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"{'min/max' if self.ranges == 'minmax' else 'MSE-searched'} ranges")
        if self.algorithm == "rtn":
            return f"{grid}, round to nearest"
        return (f"{grid}, sequential GPTQ (damp {self.damp:g}, blocksize {self.blocksize}, act_order "
                f"{'on' if self.act_order else 'off'}" + (f", GPTAQ alpha {self.gptaq:g}" if self.gptaq else "") + ")")


class Quantize(WholeModelMethod):
    name = "quant"
    config_class = QuantConfig

    def plan_for(self, model: nn.Module, adapter: Adapter, bytes_per_param: int) -> tuple[list[list[int]], Plan]:
        n = count_params(model)
        return [], Plan(keep=1.0, groups=(), total_params=n, mlp_params=n, target_removed=0)

    def compress(self, model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], plan: Plan, ctx) -> dict:
        c = self.config
        found = targets(model, c.embeddings)
        bases = c.basis_bits not in (None, c.bits) and any(isinstance(o, SharedBasis) for o, _, _ in found.values())
        print(f"quant: {c.describe()}" + (f"; shared bases at {c.basis_bits} bits" if bases else ""), flush=True)
        shapes = {name: tuple(getattr(o, a).shape) for name, (o, a, _) in found.items()}
        chosen = gptq_targets(model, adapter, found) if c.algorithm == "gptq" else {}
        rounded = [name for name in found if name not in chosen]
        for name in rounded:  # first: GPTQ's inputs then come from them quantized (embeddings, atoms)
            quantize_tensor(*found[name], c.spec_for(found[name][0]))
        if chosen:
            from layershare.quant.sequential import quantize_sequentially

            blocks = adapter.blocks(model)
            cap = ctx.residency.capture(model, blocks, batches, ctx.device, adapter)
            quantize_sequentially(blocks, cap, chosen, self._quantize, adapter, ctx.device,
                                  float_targets=c.gptaq > 0)
        print(f"quant: GPTQ: {_summary(chosen)}; round to nearest: {_summary(rounded)}", flush=True)
        model.layershare_quant = quant_entry(c.spec, shapes, {name: first for name, (_, _, first) in found.items()},
                                             {name: c.spec_for(owner).bits for name, (owner, _, _) in found.items()})
        return {"tensors": len(found), "by_gptq": len(chosen), "by_rtn": len(rounded)}

    def _quantize(self, target: Target, hessian: torch.Tensor, cross: torch.Tensor | None = None) -> None:
        """GPTQ of one tensor from its inputs' Hessian (and, with gptaq > 0, the cross moment
        with the float model's inputs), written in place (quant/model.py)."""
        from layershare.quant.gptq import gptq, gptq_masked, toward_float

        c = self.config
        spec = c.spec_for(target.owner)
        w, stored = target.matrix(), target.stored()
        try:
            if cross is not None:
                w = toward_float(w, hessian, cross, percdamp=c.damp, alpha=c.gptaq)
            if stored is None:
                q = gptq(w, hessian, spec, percdamp=c.damp, blocksize=c.blocksize, act_order=c.act_order)
            else:
                q = gptq_masked(w, hessian, spec, stored, percdamp=c.damp, act_order=c.act_order)
        except ValueError as e:
            raise type(e)(f"GPTQ on {target.name}: {e}") from None
        quantize_tensor(target.owner, target.attr, target.input_first, spec, q)
        if isinstance(target.owner, SharedBasis):
            target.owner.forget()  # its cached x @ U is the float U's


def _summary(names) -> str:
    """How many tensors, by name with block (and group) indices folded: 'model.layers.*.mlp.up_proj.weight x30'."""
    names = list(names)
    if not names:
        return "none"
    kinds = Counter(re.sub(r"\.\d+\.", ".*.", re.sub(r"_g\d+_", "_g*_", n)) for n in names)
    return f"{len(names)} tensors (" + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in kinds.items()) + ")"
