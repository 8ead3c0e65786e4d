"""Where each quantized tensor multiplies an input, for GPTQ: the module whose forward reads it,
and how the tensor's own input follows from that module's input x.

- a plain linear (nn.Linear, GPT-2's Conv1D): its weight reads x;
- a layer of role "in" (y = (x @ U) @ V): U reads x (first factor), V reads z = x @ U (second);
- a layer of role "out" (y = (x @ V^T) @ U^T): V reads x (first factor), U reads x @ V^T (second);
  but a basis shared with any layer of role "in" has its grid along d (quant/model.py), where
  only the "in" layers' x are its input. If layers of role "out" share it too (FiPS's group:
  gate and up "in", down "out"), they read it along its other axis, where GPTQ's error feedback
  (moving entries along d to cancel the "in" layers' error) is pure damage: such a basis is
  rounded to nearest. Measured (SmolLM2-135M, one-shot FiPS 20%, 4 bits, first 4 validation
  windows, float 35.35): GPTQ on U and V 204.8; U rounded, V by GPTQ 103.4; all rounded 133.0;
  only U quantized: rounded 72.7, by GPTQ 259.7, by GPTQ with the "out" layers' error added to
  each row's Hessian (the diagonal of their z^T z, an exact layer-wise loss) still 90.1.
- a shared basis is used by every layer that shares it, possibly in several blocks.
Anything else (MASA's atoms, embeddings, the LM head, a linear outside the blocks, a sparse V
not in its stored form) has no use here: it is rounded to nearest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from layershare.adapters import Adapter
from layershare.adapters.base import IN
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear, unpack_bits
from layershare.modules.weights import is_conv1d


@dataclass(frozen=True, eq=False)
class Use:
    """One place a tensor multiplies an input: `module` (in block `block`) reads it; `factor` 0
    when it multiplies the module's input x, 1 when it multiplies the first factor's output;
    `via` how its input follows from x: "x", "basis" (x @ U) or "V" (x @ V^T)."""

    module: nn.Module
    block: int
    factor: int
    via: str

    def input(self, x: torch.Tensor) -> torch.Tensor:
        if self.via == "x":
            return x
        if self.via == "basis":
            return x @ self.module.basis.U.to(x.dtype)
        return x @ self.module.dense_V().to(x.dtype).t()

    @property
    def source(self) -> object:
        """What the input depends on besides x: uses with the same x and source share one input."""
        if self.via == "x":
            return None
        return self.module.basis if self.via == "basis" else self.module


@dataclass(eq=False)
class Target:
    """A tensor quantized by GPTQ: owner.attr (`input_first`: stored input axis first), its uses."""

    name: str
    owner: nn.Module
    attr: str
    input_first: bool
    uses: list[Use]
    blocks: frozenset[int] = field(init=False)

    def __post_init__(self):
        self.blocks = frozenset(u.block for u in self.uses)

    def matrix(self) -> torch.Tensor:
        """The weight as out x in (float32), zeros included for a sparse V."""
        if self.attr == "V_values":
            V = self.owner.dense_V()
            return (V.t() if self.owner.role == IN else V).float()
        t = getattr(self.owner, self.attr).detach()
        return (t.t() if self.input_first else t).float()

    def stored(self) -> torch.Tensor | None:
        """For a sparse V: the flat indices into `matrix()` of its stored values, in their stored
        (row-major over V) order; None for a dense tensor."""
        if self.attr != "V_values":
            return None
        r, h = self.owner.v_shape
        kept = unpack_bits(self.owner.V_mask, (r, h)).flatten().nonzero().squeeze(1)
        if self.owner.role != IN:
            return kept
        return kept % h * r + kept // h  # V[i, k] is (V^T)[k, i]


def gptq_targets(model: nn.Module, adapter: Adapter, found: dict[str, tuple[nn.Module, str, bool]]
                 ) -> dict[str, Target]:
    """The tensors of `found` (quant/model.targets) GPTQ can quantize: every use in a block."""
    block_of = {id(m): b for b, block in enumerate(adapter.blocks(model)) for m in block.modules()}
    users: dict[int, list[SharedBasisLinear]] = {}
    for m in model.modules():
        if isinstance(m, SharedBasisLinear):
            users.setdefault(id(m.basis), []).append(m)
    out = {}
    for name, (owner, attr, first) in found.items():
        uses = [Use(m, block_of.get(id(m), -1), factor, via) for m, factor, via in _uses(owner, attr, first, users)]
        if uses and all(u.block >= 0 for u in uses):
            out[name] = Target(name, owner, attr, first, uses)
    return out


def _uses(owner: nn.Module, attr: str, input_first: bool, users: dict) -> list[tuple[nn.Module, int, str]]:
    if isinstance(owner, SharedBasis):
        layers = users.get(id(owner), [])
        if input_first:
            if any(m.role != IN for m in layers):  # read along both axes: rounded (module docstring)
                return []
            return [(m, 0, "x") for m in layers if m.role == IN]
        return [(m, 1, "V") for m in layers]
    if isinstance(owner, SharedBasisLinear):
        if attr == "V" and owner.sparse:  # not in its stored form: its zeros would not stay
            return []
        return [(owner, 1, "basis")] if owner.role == IN else [(owner, 0, "x")]
    if isinstance(owner, nn.Linear) or is_conv1d(owner):
        return [(owner, 0, "x")]
    return []
