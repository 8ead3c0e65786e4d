"""A stage's budget split over its groups by measured sensitivity (a method whose needs() ask for
`probe`: FiPS with allocation="error").

Before any group is compressed, every group alone is compressed one-shot at two budgets (the
method's `probe_plans`: FiPS's uniform plan and one that removes PROBE_STEP of it): the method's
init on the second moments of the first PROBE_WINDOWS calibration windows, pruned to its final
mask, no tuning. What is measured is the model's loss: the mean next-token negative
log-likelihood on the first LOSS_WINDOWS of those windows with only that group compressed, minus
the dense model's (the blocks before the group are skipped: their captured output is fed in).
The compressed modules are dropped again (the dense ones stay in place), and the method turns the
loss increases into its plan (`allocate`). Then the run compresses group by group as usual. If no
group's loss grows with what it removes, there is nothing to split by: a NoSlopeWarning, and the
uniform plan.

Why the model's loss and not each group's own reconstruction error (docs/analysis.md): on
SmolLM2-135M an allocation that minimised the sum of the groups' relative MLP-output errors cut
that sum by 38% and raised the validation perplexity from 29.75 to 32.23 (it took budget from the
first, the last and the massive-activation blocks, whose small relative errors weigh most).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from layershare.adapters import Adapter, get_path, set_path
from layershare.compression.budget import Plan
from layershare.compression.capture import Captured, _identity, _Stop, release_memory, run_group
from layershare.methods.base import Group

PROBE_WINDOWS = 16  # calibration windows whose second moments the probe's inits use (of the recipe's nsamples)
LOSS_WINDOWS = 8  # of those, the windows the loss is measured on
PROBE_STEP = 0.75  # the second probe plan removes this fraction of what the stage removes
FLOOR = 1e-6  # a loss increase below this (nats per token) counts as this


@torch.no_grad()
def tail_nll(model: nn.Module, adapter: Adapter, start: int, cap: Captured, batches: list[torch.Tensor],
             device: str) -> float:
    """Mean next-token NLL of `model` on `batches` with the blocks before `start` skipped and block
    `start` fed the captured hidden states `cap.hidden` (the model's output head is applied a
    few rows at a time, so no batch-sized logits are held)."""
    blocks = adapter.blocks(model)
    head = model.get_output_embeddings()
    state = {"k": 0, "sum": 0.0, "n": 0}

    def feed(module, a, kw):
        h = cap.hidden[state["k"]].to(device)
        return ((h, *a[1:]), kw) if a else (a, {**kw, "hidden_states": h})

    def loss(module, a):
        x, ids = a[0], batches[state["k"]].to(device)
        for i in range(x.shape[0]):
            logits = F.linear(x[i, :-1], head.weight, head.bias).float()
            state["sum"] += float(F.cross_entropy(logits, ids[i, 1:], reduction="sum"))
            state["n"] += ids.shape[1] - 1
        raise _Stop

    handles = [blocks[start].register_forward_pre_hook(feed, with_kwargs=True), head.register_forward_pre_hook(loss)]
    for b in blocks[:start]:
        b.forward = _identity
    try:
        for k, batch in enumerate(batches):
            state["k"] = k
            try:
                adapter.call(model, batch.to(device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        for b in blocks[:start]:
            del b.forward
    return state["sum"] / max(state["n"], 1)


def probe(model: nn.Module, adapter: Adapter, method, batches: list[torch.Tensor], groups: list[list[int]],
          plans: list[Plan], device: str, residency, stats_dtype: torch.dtype = torch.float64) -> list[list[float]]:
    """losses[g][i]: the increase of the model's loss with only group g compressed one-shot at
    plans[i]'s budget (see the module docstring). The whole model must be in memory (`residency`
    only captures)."""
    blocks = adapter.blocks(model)
    objective = method.objective(adapter)
    if objective is None:
        raise ValueError(f"{method.name}: a sensitivity probe needs an objective to prune against")
    batches = batches[:PROBE_WINDOWS]
    cap = residency.capture(model, blocks, batches, device, adapter)
    # the loss is measured on whole batches of the first LOSS_WINDOWS windows
    n_loss, rows = 0, 0
    while n_loss < len(batches) and rows < LOSS_WINDOWS:
        rows += batches[n_loss].shape[0]
        n_loss += 1
    loss_batches = batches[:n_loss]
    dense_nll = tail_nll(model, adapter, 0, Captured(cap.hidden[:n_loss], cap.args[:n_loss]), loss_batches, device)
    losses = []
    for g, group_blocks in enumerate(tqdm(groups, desc=f"{method.name} allocation probe", dynamic_ncols=True)):
        group = Group.of(model, adapter, g, group_blocks, method.linears(adapter))
        grams: dict[str, torch.Tensor] = {}
        _, _, dense_out = run_group(blocks, group_blocks, cap, adapter, device, record=False, grams=grams,
                                    linears=dict(zip(group.paths, group.modules)), objective=objective,
                                    stats_device=device, stats_dtype=stats_dtype)
        row = []
        for plan in plans:
            group.grams = dict(grams)  # the init consumes its copy
            comp = method.init(group, plan.groups[g])
            dense = {path: get_path(model, path) for path in comp.modules}
            for path, module in comp.modules.items():
                set_path(model, path, module.to(device))
            if comp.pruner is not None:
                comp.pruner.prune_to(comp.pruner.n_final)
            nll = tail_nll(model, adapter, group_blocks[0], Captured(cap.hidden[:n_loss], cap.args[:n_loss]),
                           loss_batches, device)
            row.append(max(nll - dense_nll, FLOOR))
            for path, module in dense.items():
                set_path(model, path, module)
            del comp
        losses.append(row)
        del grams, group
        cap.hidden = dense_out
        release_memory()
    del cap
    release_memory()
    return losses


def split_by_error(removed: list[float], sizes: list[int], errors: list[float], slope: float,
                   lo: float, hi: float) -> list[float]:
    """Fractions r_g each group removes, minimising sum_g e_g exp(slope (r_g - removed_g)) (each
    group's error e_g measured at removed_g, log-linear in between) with sum_g sizes_g r_g equal to
    sum_g sizes_g removed_g, every r_g within [lo_g, hi_g] = [lo, hi] times removed_g (and below 0.95):
    r_g = (log(lambda sizes_g / (slope e_g)) + slope removed_g) / slope, lambda by bisection."""
    total = sum(s * r for s, r in zip(sizes, removed))
    bounds = [(lo * r, min(0.95, hi * r)) for r in removed]
    logs = [math.log(max(e, 1e-30)) for e in errors]

    def at(mu: float) -> list[float]:  # mu = log(lambda / slope)
        return [min(b, max(a, (mu + math.log(s) - le) / slope + r))
                for s, le, r, (a, b) in zip(sizes, logs, removed, bounds)]

    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        if sum(s * r for s, r in zip(sizes, at(mid))) < total:
            low = mid
        else:
            high = mid
    return at((low + high) / 2)


class NoSlopeWarning(UserWarning):
    """The probe found no group whose loss grows with the removed fraction: the split stays uniform."""


def common_slope(errors: list[list[float]], removed: list[list[float]]) -> float | None:
    """The median over groups of d log e / d r between the two probe plans (errors[g] = [at plan 0,
    at plan 1], removed likewise); a group whose error does not grow with removal does not vote.
    None when no group votes (the caller keeps the uniform split)."""
    slopes = sorted(math.log(e0 / e1) / (r0 - r1) for (e0, e1), (r0, r1) in zip(errors, removed)
                    if e0 > 0 and e1 > 0 and r0 != r1 and e0 > e1)
    return slopes[len(slopes) // 2] if slopes else None


def allocated_plan(model: nn.Module, adapter: Adapter, method, groups: list[list[int]], plan: Plan,
                   batches: list[torch.Tensor], device: str, residency, bytes_per_param: int,
                   stats_dtype: torch.dtype = torch.float64) -> Plan:
    """The stage's plan re-split by the method from a probe of every group (same total as `plan`)."""
    plans = method.probe_plans(model, adapter, groups, plan.total_params, bytes_per_param)
    losses = probe(model, adapter, method, batches, groups, plans, device, residency, stats_dtype)
    new = method.allocate(model, adapter, groups, plan.total_params, bytes_per_param, plans, losses)
    if new is None:
        warnings.warn(f"{method.name} allocation: the probe's loss increases (nats/token, one group at a time: "
                      f"{' '.join(f'{row[0]:.2g}/{row[1]:.2g}' for row in losses)} at the uniform plan/the lighter "
                      "one) do not grow with the removed fraction in any group; the split stays uniform",
                      NoSlopeWarning, stacklevel=2)
        return plan
    print(f"{method.name} allocation by the probe's loss increases (nats/token, one group at a time; at "
          f"the uniform plan: {' '.join(f'{row[0]:.2g}' for row in losses)}): fraction each group removes "
          f"{' '.join(f'{1 - g.stored / g.dense:.3f}' for g in new.groups)} (uniform "
          f"{1 - plan.groups[0].stored / plan.groups[0].dense:.3f})", flush=True)
    return new
