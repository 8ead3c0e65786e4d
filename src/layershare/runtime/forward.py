"""Running a model on one batch: the one place that knows how a model is called and where its
logits are (token ids or pixels, transformers or timm; see Adapter.call)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layershare.adapters import UnsupportedModelError, get_adapter


def logits(model: nn.Module, batch: torch.Tensor, adapter=None) -> torch.Tensor:
    """The model's logits on one batch, in float32 (a model no adapter knows, such as a plain
    classifier being evaluated, is called on the batch positionally)."""
    if adapter is None:
        try:
            adapter = get_adapter(model)
        except UnsupportedModelError:
            adapter = None
    out = adapter.call(model, batch) if adapter is not None else model(batch)
    out = out.logits if hasattr(out, "logits") else out
    return out.float()


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits on token windows (any transformers causal LM, supported or not)."""
    return model(input_ids=ids, use_cache=False).logits.float()


def nll_sum(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over a batch of token windows, and the number
    of tokens predicted (every position but the last of each window)."""
    lg = lm_logits(model, ids)
    nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def mean_nll(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token loss of a batch of windows, computed as transformers' causal-LM loss
    (labels shifted by padding with the ignore index)."""
    lg = lm_logits(model, ids)
    labels = F.pad(ids, (0, 1), value=-100)[..., 1:]
    return float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100))
