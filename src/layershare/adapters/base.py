"""What an adapter is: where the transformer blocks and their MLP linears live.

An adapter answers a few questions about one architecture family, and nothing more:
which modules are the blocks, which linears of a block form its MLP (and in which
direction each one maps, d -> h or h -> d), how to run that MLP on its input, which
module's input/output is the MLP's input/output (for hooks), which linears are the
attention projections, and how the model is called on a batch (token ids or pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IN, OUT = "in", "out"  # d -> h (up, gate, fc1) and h -> d (down, fc2)


def get_path(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def has_path(root: nn.Module, path: str) -> bool:
    try:
        get_path(root, path)
        return True
    except (AttributeError, IndexError):
        return False


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


@dataclass(frozen=True)
class Adapter:
    """How to find the MLPs of one architecture family.

    blocks_paths: candidate dotted paths of the ModuleList of blocks (first that exists wins).
    mlp: dotted path of the MLP module inside a block, or None when the MLP linears sit
         directly in the block (OPT); then `act` names the block's activation attribute.
    linears: MLP linears relative to the block, name -> IN/OUT, in the order the MLP applies them.
    attention: the attention projections relative to the block (for methods on attention, MASA).
    task: "causal-lm" or "image-classification" (what the model is fed and what it predicts).
    input_name: the keyword the model takes its batch by (None: positional, as timm models).
    objective: the default reconstruction target (see objectives.py): "mlp" (each MLP's output,
         the LLM objective of the FiPS code), "residual" (the MLP output after the block's
         post-MLP norm, `mlp_post`) or "block" (each block's output from the dense previous
         block's output, the FiPS code's ViT objective).
    mlp_post: a norm applied to the MLP output before the residual add, relative to the block
         (Gemma-2/3's post_feedforward_layernorm); blocks without it have none.
    """

    name: str
    model_types: tuple[str, ...]
    blocks_paths: tuple[str, ...]
    mlp: str | None
    linears: dict[str, str]
    act: str | None = None
    attention: tuple[str, ...] = ()  # attention projections relative to the block (Q, K, V, O or fused QKV, O)
    task: str = "causal-lm"
    input_name: str | None = "input_ids"
    objective: str = "mlp"
    mlp_post: str | None = None

    # ---- blocks -------------------------------------------------------------------
    def blocks_path(self, model: nn.Module) -> str:
        for path in self.blocks_paths:
            if has_path(model, path):
                return path
        raise ValueError(
            f"adapter {self.name!r}: none of {list(self.blocks_paths)} exists in {type(model).__name__}"
        )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.blocks_path(model))

    # ---- MLP ----------------------------------------------------------------------
    def mlp_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: get_path(block, name) for name in self.linears}

    def hook_module(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(module whose input is the MLP input, module whose output is the MLP output)."""
        if self.mlp is not None:
            mlp = get_path(block, self.mlp)
            return mlp, mlp
        names = list(self.linears)
        return get_path(block, names[0]), get_path(block, names[-1])

    def post_norm(self, block: nn.Module) -> nn.Module | None:
        return get_path(block, self.mlp_post) if self.mlp_post and has_path(block, self.mlp_post) else None

    def mlp_forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            return get_path(block, self.mlp)(x)
        act: Callable = get_path(block, self.act)
        names = list(self.linears)
        h = act(get_path(block, names[0])(x))
        return get_path(block, names[1])(h)

    def matches(self, model: nn.Module, strict: bool = True) -> bool:
        """Its model type and (strict) its blocks and MLP linears where it expects them: one model
        type can have several layouts across transformers versions (ViT)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return model_type in self.model_types and (not strict or self.has_layout(model))

    def has_layout(self, model: nn.Module) -> bool:
        if not any(has_path(model, p) for p in self.blocks_paths):
            return False
        blocks = self.blocks(model)
        return len(blocks) == 0 or all(has_path(blocks[0], name) for name in self.linears)

    # ---- calling the model ---------------------------------------------------------
    def call(self, model: nn.Module, batch: torch.Tensor):
        """Run the model on one batch (token ids, or pixels for vision models)."""
        if self.input_name is None:
            return model(batch)
        kwargs = {self.input_name: batch}
        if self.task == "causal-lm":
            kwargs["use_cache"] = False
        return model(**kwargs)
