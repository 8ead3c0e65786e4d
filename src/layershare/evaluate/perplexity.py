"""Perplexity with the standard protocol (as in the SparseGPT / Wanda evaluation code).

The whole test text is tokenized once, cut into non-overlapping windows of `seqlen` tokens
(the remainder dropped), and every window is scored independently; perplexity is
exp(total NLL / number of predicted tokens) over all windows, not over the first one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from layershare.data.text import DataError
from layershare.runtime.forward import nll_sum


@dataclass
class Perplexity:
    ppl: float
    nll: float
    windows: int
    seqlen: int
    tokens: int  # tokens in the text
    available: int  # windows the whole text holds

    @property
    def dropped(self) -> int:
        """Tokens not scored: the remainder after the last full window (and any windows skipped)."""
        return self.tokens - self.windows * self.seqlen

    @property
    def protocol(self) -> str:
        which = (f"{self.windows} non-overlapping windows" if self.windows == self.available
                 else f"first {self.windows} of {self.available} non-overlapping windows")
        return (f"{which} x {self.seqlen} tokens ({self.windows * (self.seqlen - 1):,} predicted tokens; "
                f"text has {self.tokens:,} tokens, {self.dropped:,} not scored)")

    def __str__(self) -> str:
        return f"ppl {self.ppl:.3f} over {self.protocol}"


def default_seqlen(model, cap: int = 2048) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or cap
    return min(int(n), cap)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int | None = None, batch_size: int = 1,
               device: str | None = None, max_windows: int | None = None, desc: str = "perplexity") -> Perplexity:
    seqlen = seqlen or default_seqlen(model)
    available = n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    device = device or next(model.parameters()).device
    windows = ids[: n * seqlen].view(n, seqlen)
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False, dynamic_ncols=True):
        nll, n_pred = nll_sum(model, windows[i:i + batch_size].to(device))
        total += nll
        count += n_pred
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, windows=n, seqlen=seqlen, tokens=int(ids.numel()),
                      available=available)
