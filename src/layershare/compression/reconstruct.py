"""Block-wise reconstruction: tune a group's compressed MLPs to match the dense MLPs.

Each compressed MLP j of the group sees the dense model's MLP inputs X_j and is trained
to produce the dense MLP's outputs Y_j; the group's loss is the sum over its MLPs of the
mean squared error ("mse"), or of the error relative to the output energy ("nmse").
AdamW with cosine decay; the pruner updates the masks on its schedule.

Tuning never leaves a group worse than its init: if the tuned error (on the calibration
tokens) is above the init's at the final mask, the group goes back to that init (the
one-shot pruned factors) and `ReconStats.kept_init` says so. Adam moves every entry by about
`lr` a step whatever its scale, so an init that is already close (a rank above the width,
pruned by activation score) can come out of 200 noisy steps worse than it went in.

A group that starts close needs fewer steps: with `full_steps_error` set (FiPSConfig), a group
whose one-shot error e (rel_err_before) is below it tunes for steps * max(min_steps_fraction,
e / full_steps_error) steps (planned_steps), its pruning schedule spread over them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from layershare.compression.train import compute_dtype, optimize
from layershare.modules.shared_basis import pack_bits, unpack_bits

MlpFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ReconStats:
    rel_err_before: float  # sum_j ||Y_j - f_j(X_j)||^2 / sum_j ||Y_j||^2, before tuning (see relative_error)
    rel_err_after: float
    steps: int  # optimiser steps taken
    loss_curve: list[float]
    kept_init: bool = False  # tuning ended above rel_err_before, so the group kept its (pruned) init


def _tokens_per_row(x: torch.Tensor) -> int:
    """Tokens in one row of X: 1 for the MLP objective (N x d), T for the block objective (N x T x d)."""
    n = 1
    for s in x.shape[1:-1]:
        n *= s
    return n


@torch.no_grad()
def relative_error(fns: list[MlpFn], X: list[torch.Tensor], Y: list[torch.Tensor], device: str,
                   chunk: int = 4096, max_rows: int = 8192) -> float:
    """sum_j ||Y_j - f_j(X_j)||^2 / sum_j ||Y_j||^2 on (at most `max_rows` evenly spaced) calibration tokens.
    Rows of a 3-D X are whole sequences (block objective): the limits count their tokens."""
    num = den = 0.0
    per_row = _tokens_per_row(X[0])
    chunk, max_rows = max(1, chunk // per_row), max(1, max_rows // per_row)
    for fn, x, y in zip(fns, X, Y):
        if x.shape[0] > max_rows:
            keep = torch.linspace(0, x.shape[0] - 1, max_rows).long()
            x, y = x[keep], y[keep]
        for i in range(0, x.shape[0], chunk):
            xb, yb = x[i:i + chunk].to(device), y[i:i + chunk].to(device)
            num += float((fn(xb).float() - yb.float()).pow(2).sum())
            den += float(yb.float().pow(2).sum())
    return num / max(den, 1e-30)


@torch.no_grad()
def _init_at_final_mask(fns, X, Y, params, pruner, device) -> tuple[float, tuple]:
    """The error of the untuned init at the final sparsity (what static pruning without tuning
    gives), and that state to return to if tuning does worse: every parameter, a pruned V as its
    kept values and its mask (a fraction of the dense V's bytes, held through the whole tuning)."""
    if pruner is None:
        return relative_error(fns, X, Y, device), ([p.detach().clone() for p in params], [])
    saved = [(layer.V.detach().clone(), layer.mask) for layer in pruner.layers]
    pruner.prune_to(pruner.n_final)
    err = relative_error(fns, X, Y, device)
    masked = {id(layer.V): layer.mask for layer in pruner.layers}
    values = [p.detach()[masked[id(p)]] if id(p) in masked else p.detach().clone() for p in params]
    state = (values, [(pack_bits(layer.mask), layer.mask.shape) for layer in pruner.layers])
    del masked
    for layer, (V, mask) in zip(pruner.layers, saved):
        layer.V.copy_(V)
        layer.mask = mask
    return err, state


@torch.no_grad()
def _restore(params, pruner, state) -> None:
    values, masks = state
    if pruner is not None:
        for layer, (bits, shape) in zip(pruner.layers, masks):
            layer.mask = unpack_bits(bits, shape)
    masked = {id(layer.V): layer.mask for layer in pruner.layers} if pruner is not None else {}
    for p, v in zip(params, values):
        if id(p) in masked:
            p.zero_().masked_scatter_(masked[id(p)], v)
        else:
            p.copy_(v)


def planned_steps(tune, before: float) -> int:
    """The group's tuning steps: `tune.steps`, or fewer when its one-shot error `before` is below
    `tune.full_steps_error` (in proportion to it, at least `tune.min_steps_fraction` of them)."""
    steps, full = tune.steps, getattr(tune, "full_steps_error", None)
    if steps <= 0 or full is None or before >= full:
        return steps
    fraction = max(getattr(tune, "min_steps_fraction", 1.0), before / full)
    return max(1, round(steps * fraction))


def reconstruct(fns: list[MlpFn], X: list[torch.Tensor], Y: list[torch.Tensor], params: list[torch.nn.Parameter],
                pruner, tune, device: str, desc: str = "reconstruct",
                generator: torch.Generator | None = None) -> ReconStats:
    """Tune `params` so that fns[j](X[j]) matches Y[j]; `tune` holds steps, lr, weight_decay,
    batch_tokens, loss ("mse" or "nmse"), tune_dtype, full_steps_error and min_steps_fraction
    (FiPSConfig)."""
    before, init_state = _init_at_final_mask(fns, X, Y, params, pruner, device)
    steps = planned_steps(tune, before)
    if pruner is not None:
        pruner.retime(steps)
        pruner.step(0)
    curve: list[float] = []
    trainable = [p for p in params if p.requires_grad]
    if steps > 0 and trainable:
        n = X[0].shape[0]
        bs = min(max(1, tune.batch_tokens // _tokens_per_row(X[0])), n)
        energy = [float(y.float().pow(2).mean()) for y in Y] if tune.loss == "nmse" else [1.0] * len(Y)
        amp = compute_dtype(getattr(tune, "tune_dtype", "float32"), device)
        dev_type = torch.device(device).type

        def forward(fn, xb):  # the products in `amp` (parameters, optimiser and loss stay float32)
            if amp is None:
                return fn(xb)
            with torch.autocast(dev_type, dtype=amp):
                return fn(xb).float()

        def permutation() -> torch.Tensor:
            """The order of the rows (drawn on the CPU, by the group's generator), where X is: rows
            kept on a GPU are indexed there, with no host synchronisation per step."""
            perm = torch.randperm(n, generator=generator)
            if X[0].device.type == "cuda":
                return perm.pin_memory().to(X[0].device, non_blocking=True)
            return perm

        order = {"perm": permutation(), "pos": 0}

        def loss_at(t: int) -> torch.Tensor:
            if order["pos"] + bs > n:
                order["perm"], order["pos"] = permutation(), 0
            idx = order["perm"][order["pos"]:order["pos"] + bs]
            order["pos"] += bs
            loss = 0.0
            for fn, x, y, e in zip(fns, X, Y, energy):
                xb, yb = x[idx].to(device), y[idx].to(device)
                loss = loss + torch.nn.functional.mse_loss(forward(fn, xb), yb) / e
            return loss

        def before_step(t: int) -> None:
            if pruner is not None and t > 0:
                pruner.step(t)

        def after_step() -> None:  # pruned entries back to zero (the forward reads V as it is)
            if pruner is not None:
                pruner.apply_masks()

        curve = optimize(trainable, steps, tune.lr, loss_at, weight_decay=tune.weight_decay, min_lr=0.01,
                         before_step=before_step, after_step=after_step, desc=desc)
    if pruner is not None:
        pruner.finish()
    after = relative_error(fns, X, Y, device)
    kept_init = after > before
    if kept_init:  # back to exactly the state `before` was measured on
        _restore(params, pruner, init_state)
        after = before
    return ReconStats(rel_err_before=before, rel_err_after=after, steps=len(curve), loss_curve=curve,
                      kept_init=kept_init)
