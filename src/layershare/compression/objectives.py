"""What a group's reconstruction matches: which activations are recorded, and how the
compressed model recomputes them.

- "mlp": each MLP's output from its input (one row per token) — the FiPS code's LLM objective.
- "residual": what the MLP sublayer adds to the residual stream — the MLP output after the
  block's post-MLP norm where it has one (Gemma-2/3's post_feedforward_layernorm), else the
  same as "mlp". That norm rescales every token to unit RMS and weights its channels, so it is
  what the residual stream sees; but on Gemma-3-270M at 20% it was far worse than "mlp" on the
  validation book (perplexity ~279k against 405, docs/llm_validation.md), so it is an option,
  not a default.
- "block": each block's output from the dense previous block's output (one row per sequence
  or image, tokens kept together for attention) — the FiPS code's ViT objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layershare.adapters import Adapter
from layershare.config import RecipeError


def first(out):
    """The hidden states of a module's output (blocks return tuples in some versions)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(frozen=True)
class Objective:
    name: str
    adapter: Adapter

    @property
    def per_token(self) -> bool:
        """Rows of the recorded X/Y are tokens (N*T x d); else whole sequences (N x T x d)."""
        return self.name != "block"

    def hooks(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(module whose input is recorded as X, module whose output is recorded as Y)."""
        if self.name == "block":
            return block, block
        m_in, m_out = self.adapter.hook_module(block)
        return m_in, self._post(block) or m_out

    def forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Y from X through the block's (compressed) modules."""
        if self.name == "block":
            return first(block(x))
        y = self.adapter.mlp_forward(block, x)
        post = self._post(block)
        return y if post is None else post(y)

    def _post(self, block: nn.Module) -> nn.Module | None:
        """The post-MLP norm the "residual" objective goes through (None otherwise, or without one)."""
        return self.adapter.post_norm(block) if self.name == "residual" else None


def resolve_objective(objective: str, adapter: Adapter) -> Objective:
    """The named reconstruction target, or the adapter's default ("auto")."""
    name = adapter.objective if objective == "auto" else objective
    if name == "block" and adapter.task != "image-classification":
        raise RecipeError(f"objective 'block' feeds each block its hidden states alone, which {adapter.name} "
                          "blocks cannot run on (they need masks and positions): use 'mlp', 'residual' or 'auto'")
    return Objective(name, adapter)
