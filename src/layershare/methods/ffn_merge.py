"""Merging feed-forward sublayers (Verma et al., arXiv 2501.06126), on the MLPs.

Within a window of k adjacent blocks, the hidden units of every MLP are aligned to those of
the window's first MLP (the reference): the correlation of their activations on calibration
tokens (the input of the h -> d linear, i.e. the units the MLP sums over) is computed
between the reference and each other MLP, and a one-to-one matching that maximises the
total correlation is found with the Hungarian algorithm. The aligned MLPs are averaged and
the window's blocks share (tie) the one averaged MLP, so k - 1 MLPs are removed. Norms,
attention and everything outside the MLP linears stay per block.

The target ratio fixes k (one MLP is the granularity: the nearest whole number of MLPs is
removed, and the measured ratio is reported); the window's position is chosen by the
language-model loss on calibration text among every k-block window (or given, extra
`window=[first, last]`). No tuning here (the paper fine-tunes afterwards: `layershare finetune`).
Options (FFNMergeConfig): `window`, `corr_tokens` (tokens for the correlations, default
4096), `select_batches` (calibration batches for choosing the window, default 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layershare.adapters.base import IN, Adapter, get_path, set_path
from layershare.compression.budget import (
    BudgetError,
    GroupBudget,
    GroupShape,
    Plan,
    make_plan,
    out_of_range,
)
from layershare.compression.capture import release_memory
from layershare.config import StageConfig, need
from layershare.methods.base import WholeModelMethod
from layershare.modules.weights import hidden_axis
from layershare.runtime.forward import mean_nll


@dataclass
class FFNMergeConfig(StageConfig):
    method = "ffn-merge"

    window: list[int] | None = None  # [first, last] blocks to merge (default: chosen by calibration loss)
    sized_by: ClassVar[tuple[str, ...]] = ("window",)
    corr_tokens: int = 4096  # calibration tokens for the activation correlations
    select_batches: int = 1  # calibration batches the window is chosen on

    def validate(self) -> None:
        super().validate()
        need(self.window is None or len(self.window) == 2,
             f"{self.method}: window must be [first, last], got {self.window}")
        need(self.corr_tokens >= 1, f"{self.method}: corr_tokens must be >= 1, got {self.corr_tokens}")
        need(self.select_batches >= 1, f"{self.method}: select_batches must be >= 1, got {self.select_batches}")


def linear_sum_assignment(score: np.ndarray) -> np.ndarray:
    """Column matched to each row, maximising the total score (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment as lsa

    rows, cols = lsa(score, maximize=True)
    return cols[np.argsort(rows)]


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the columns of a (N x h) and of b (N x h): h x h."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    b = b / b.norm(dim=0).clamp_min(1e-12)
    return a.t() @ b


def permuted_weights(modules: list[nn.Module], roles: list[str], perm: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each linear's weight (and bias on the hidden side) with the hidden units reordered."""
    out = []
    for m, role in zip(modules, roles):
        w = m.weight.detach()
        perm = perm.to(w.device)
        entry = {"weight": w.index_select(hidden_axis(m, role), perm)}
        if getattr(m, "bias", None) is not None:
            entry["bias"] = m.bias.detach()[perm] if role == IN else m.bias.detach()
        out.append(entry)
    return out


def windows(batches: list[torch.Tensor]):
    """The calibration windows one at a time: a whole batch's logits over a large vocabulary
    (8 x 512 x 49k floats for SmolLM2) would be the run's peak memory."""
    return (row for batch in batches for row in batch.split(1))


class FFNMerge(WholeModelMethod):
    """Chooses its window with the whole model's calibration loss: the whole-model driver."""

    name = "ffn-merge"
    config_class = FFNMergeConfig
    config: FFNMergeConfig
    tasks = ("causal-lm",)  # the window is chosen by the calibration LM loss

    def groups(self, n_blocks: int) -> list[list[int]]:
        return [[b] for b in range(n_blocks)]

    # ---- budget -------------------------------------------------------------------------
    def window_size(self, shapes: list[GroupShape], total_params: int) -> int:
        c = self.config
        sizes = {s.dense for s in shapes}
        if len(sizes) != 1:
            raise BudgetError(f"ffn-merge needs every block's MLP to have the same size, got {sorted(sizes)}")
        ffn = sizes.pop()
        n = len(shapes)
        if c.window is not None:
            first, last = c.window
            if not 0 <= first < last < n:
                raise BudgetError(f"ffn-merge window {[first, last]} must satisfy 0 <= first < last < {n}")
            return last - first + 1
        base = total_params if c.ratio_of == "model" else ffn * n
        removed = int(round(c.ratio * base / ffn))
        if not 1 <= removed <= n - 1:
            step, hi = ffn / base, (n - 1) * ffn / base
            raise out_of_range(self.name, c.ratio, c.ratio_of,
                               f"it removes whole MLPs ({step:.2%} of the {c.ratio_of}'s parameters each) and "
                               f"the ratio rounds to {removed} of {n}", step / 2, hi + step / 2, lo_inclusive=True)
        return removed + 1

    def plan(self, shapes: list[GroupShape], total_params: int, bytes_per_param: int) -> Plan:
        k = self.window_size(shapes, total_params)
        # which blocks merge is chosen later; the sizes do not depend on it
        budgets = [GroupBudget(rank=0, nnz=0, stored=0.0 if 0 < i < k else float(s.dense), dense=s.dense, v_size=0)
                   for i, s in enumerate(shapes)]
        mlp = sum(s.dense for s in shapes)
        return make_plan(shapes, total_params, 1.0 - (k - 1) * shapes[0].dense / mlp, budgets)

    # ---- the whole-model pass ---------------------------------------------------------------
    @torch.no_grad()
    def hidden_activations(self, model: nn.Module, adapter: Adapter, batches: list[torch.Tensor],
                           device: str, max_tokens: int) -> list[torch.Tensor]:
        """Per block: the MLP hidden units' activations (input of the h -> d linear), N x h."""
        blocks = adapter.blocks(model)
        out_name = next(n for n, r in adapter.linears.items() if r != IN)
        acts: list[list[torch.Tensor]] = [[] for _ in blocks]
        seen = [0]

        def hook(b):
            def fn(m, a, kw):
                x = (a[0] if a else next(iter(kw.values()))).detach()
                acts[b].append(x.reshape(-1, x.shape[-1]).float().cpu())
            return fn

        handles = [get_path(blk, out_name).register_forward_pre_hook(hook(b), with_kwargs=True)
                   for b, blk in enumerate(blocks)]
        try:
            for ids in windows(batches):
                if seen[0] >= max_tokens:
                    break
                adapter.call(model, ids.to(device))
                seen[0] += ids.numel()
        finally:
            for h in handles:
                h.remove()
        out = []
        for b in range(len(acts)):  # concatenate block by block, freeing the pieces as it goes
            out.append(torch.cat(acts[b])[:max_tokens])
            acts[b] = []
        return out

    @torch.no_grad()
    def lm_loss(self, model: nn.Module, batches: list[torch.Tensor], device: str) -> float:
        """Mean next-token loss, one window at a time."""
        total, n = 0.0, 0
        for ids in windows(batches):
            ids = ids.to(device)
            total += mean_nll(model, ids) * (ids.numel() - 1)
            n += ids.numel() - 1
        return total / n

    def merged(self, model: nn.Module, adapter: Adapter, window: list[int], acts: list[torch.Tensor],
               perms: dict) -> list[dict[str, torch.Tensor]]:
        """Averaged (aligned) weights for each MLP linear of the window's reference block."""
        blocks = adapter.blocks(model)
        names, roles = list(adapter.linears), list(adapter.linears.values())
        ref = window[0]
        acc = None
        for b in window:
            if b == ref:
                perm = torch.arange(acts[ref].shape[1])
            else:
                if (ref, b) not in perms:
                    score = correlation(acts[ref], acts[b]).numpy()
                    perms[(ref, b)] = torch.from_numpy(linear_sum_assignment(score))
                perm = perms[(ref, b)]
            ws = permuted_weights([get_path(blocks[b], n) for n in names], roles, perm)
            acc = ws if acc is None else [{k: a[k] + w[k] for k in a} for a, w in zip(acc, ws)]
        return [{k: v / len(window) for k, v in a.items()} for a in acc]

    def compress(self, model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], plan: Plan, ctx) -> dict:
        c = self.config
        device = ctx.device
        blocks = adapter.blocks(model)
        n = len(blocks)
        k = sum(1 for g in plan.groups if g.stored == 0) + 1
        names = list(adapter.linears)
        if c.window is not None:
            candidates = [c.window[0]]
        else:
            candidates = list(range(n - k + 1))
        acts = self.hidden_activations(model, adapter, batches, device, c.corr_tokens)
        release_memory()
        select = batches[: c.select_batches]
        perms: dict = {}
        losses = {}
        best = None
        for s in tqdm(candidates, desc=f"ffn-merge windows of {k}", dynamic_ncols=True):
            window = list(range(s, s + k))
            avg = self.merged(model, adapter, window, acts, perms)
            if len(candidates) == 1:
                best = (s, avg)
                break
            saved = {(b, nm, key): getattr(get_path(blocks[b], nm), key).data
                     for b in window for nm, w in zip(names, avg) for key in w}
            try:
                for (b, nm, key) in saved:  # every block of the window runs the averaged MLP
                    getattr(get_path(blocks[b], nm), key).data = avg[names.index(nm)][key].to(device)
                losses[s] = self.lm_loss(model, select, device)
            finally:
                for (b, nm, key), t in saved.items():
                    getattr(get_path(blocks[b], nm), key).data = t
            if best is None or losses[s] < losses[best[0]]:
                best = (s, avg)
        s, avg = best
        window = list(range(s, s + k))
        prefix = adapter.blocks_path(model)
        for nm, w in zip(names, avg):
            m = get_path(blocks[s], nm)
            for key, t in w.items():
                getattr(m, key).data = t.clone().to(device)
            for b in window[1:]:
                set_path(model, f"{prefix}.{b}.{nm}", m)  # tied: one module, several blocks
        return {"window": window, "window_losses": losses}
