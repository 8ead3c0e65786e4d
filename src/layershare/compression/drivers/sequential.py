"""The sequential driver: group by group, with captured activations (llm-compressor's
sequential pipeline, which knows no algorithm).

1. One forward of the model over the calibration batches records the hidden states entering
   the first block and every block's call arguments (capture.py).
2. For each group: run its blocks on the stored hidden states, recording what the method
   asked for (needs()): each linear's input second moment (`grams`), the same on the model
   compressed so far (`update_grams`, from a second stream of hidden states run through the
   compressed groups), and the inputs/outputs of the method's objective (`objective(adapter)`).
3. `init` builds the compressed modules; they replace the dense ones and their shared modules
   go to the store. A tuned method (needs().tuning) is tuned by block-wise reconstruction
   (reconstruct.py). The group's error is the objective's, or, for a method without one (on
   the attention), the group's output error. `materialize` freezes them.
4. The next group's inputs are the dense group's outputs (propagate="dense") or the
   compressed group's ("compressed").
Only one group's activations are held at a time. The second moments accumulate on the recipe's
device (in the recipe's `stats_dtype`), the method's init runs beside them, and they are freed
with the group; the recorded activations are kept there too when they fit (record_device).
Where the weights are (all in memory, or read group by group from the checkpoint), which groups
this process compresses and which are already done (before this process's first group or
anywhere after it) is the context's Residency (drivers/base.py; onload.py), never this driver's.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from layershare.adapters import Adapter, set_path
from layershare.compression.budget import Plan
from layershare.compression.capture import (
    Captured,
    output_error,
    release_memory,
    run_group,
)
from layershare.compression.drivers.base import GroupReport, StageContext, StageReport
from layershare.compression.finite import check_group
from layershare.compression.reconstruct import ReconStats, reconstruct, relative_error
from layershare.methods.base import Group


def record_device(device: str, cap: Captured, n_blocks: int) -> str:
    """Where a group's recorded activations (the tuning's inputs and targets) are kept: on a CUDA
    device when they take at most a quarter of its free memory (no copy per tuning step, and no
    host synchronisation with it), else on the CPU (each step then copies its batch over)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not cap.hidden:
        return "cpu"
    need = 2 * n_blocks * sum(h.numel() for h in cap.hidden) * cap.hidden[0].element_size()
    free, _ = torch.cuda.mem_get_info(dev)
    return device if need <= free // 4 else "cpu"


def run_sequential(model: nn.Module, adapter: Adapter, method, batches: list[torch.Tensor],
                   groups: list[list[int]], plan: Plan, ctx: StageContext) -> StageReport:
    t0 = time.time()
    device = ctx.device
    res = ctx.residency
    needs = method.needs()
    propagate = getattr(method.config, "propagate", "dense")
    blocks = adapter.blocks(model)
    report = StageReport(method=method.name, plan=plan)
    objective = method.objective(adapter)
    cap = res.capture(model, blocks, batches, device, adapter)
    # the hidden states of the model compressed so far: for the update, or as the next groups' inputs
    comp_cap = (Captured(hidden=cap.hidden, args=cap.args)
                if needs.update_grams or propagate == "compressed" else None)
    streams = {"dense": cap, "compressed": comp_cap}
    first, ready, earlier = res.resume(ctx.stage, groups, streams)
    report.groups.extend(earlier)
    for g in range(ready, first):  # the dense inputs of the first group this process compresses
        res.onload(model, groups[g])
        _, _, cap.hidden = run_group(blocks, groups[g], cap, adapter, device, record=False)
        res.offload(model, groups[g])
    release_memory()
    todo = range(first, res.span(len(groups)).stop)
    bar = tqdm([(g, groups[g]) for g in todo], desc=f"{method.name} groups", dynamic_ncols=True)
    for g, group_blocks in bar:
        done_before = res.earlier(ctx.stage, g, groups, streams)
        if done_before is not None:
            report.groups.append(done_before)
            continue
        tg = time.time()
        ctx.callbacks.on_group_start(ctx.stage, g, group_blocks)
        res.onload(model, group_blocks)
        group = Group.of(model, adapter, g, group_blocks, method.linears(adapter))
        grams = {} if needs.grams else None
        linears = dict(zip(group.paths, group.modules))
        stats = dict(stats_device=device, stats_dtype=ctx.stats_dtype)  # the statistics stay where the forward runs
        X, Y, dense_out = run_group(blocks, group_blocks, cap, adapter, device, record=objective is not None,
                                    grams=grams, linears=linears, objective=objective,
                                    record_device=record_device(device, cap, len(group_blocks)), **stats)
        group.grams = grams
        if needs.update_grams and propagate == "compressed" and grams is not None:
            group.update_grams = grams  # cap is the compressed stream already: the same statistics
        elif needs.update_grams:  # the dense group's linears fed by the compressed model so far
            group.update_grams = {}
            run_group(blocks, group_blocks, comp_cap, adapter, device, record=False,
                      grams=group.update_grams, linears=linears, **stats)
        del linears, grams  # the group holds them; they go with it after init (a down projection's is h x h)
        comp = method.init(group, plan.groups[g])
        for path, module in comp.modules.items():
            dense = group.modules[group.paths.index(path)]
            set_path(model, path, module.to(device))
            for p in dense.parameters(recurse=False):  # free the replaced weights even if something still holds them
                p.data = p.data.new_empty(0)
        for part, shared in comp.shared.items():
            ctx.store.add(g, part, shared)
        del group
        fns = [lambda x, b=blocks[b]: objective.forward(b, x) for b in group_blocks] if objective is not None else None
        if needs.tuning:
            with torch.enable_grad():
                stats = reconstruct(fns, X, Y, comp.params, comp.pruner, method.config, device,
                                    desc=f"group {g + 1}/{len(groups)}", generator=ctx.generator(g))
        elif objective is not None:
            err = relative_error(fns, X, Y, device)
            stats = ReconStats(err, err, 0, [])
        method.materialize(comp)
        if objective is None:  # the error is the group's output error against the dense group's
            _, _, comp_out = run_group(blocks, group_blocks, cap, adapter, device, record=False)
            err = output_error(comp_out, dense_out)
            stats = ReconStats(err, err, 0, [])
            del comp_out
        check_group(f"stage {ctx.stage + 1} ({method.name}), group {g + 1} (blocks {group_blocks})",
                    {**comp.modules, **{f"shared {k}": m for k, m in comp.shared.items()}},
                    (stats.rel_err_before, stats.rel_err_after))
        del X, Y
        if comp_cap is not None:
            _, _, comp_cap.hidden = run_group(blocks, group_blocks, comp_cap, adapter, device, record=False)
        cap.hidden = comp_cap.hidden if propagate == "compressed" else dense_out
        info = comp.info
        del comp, dense_out
        budget = plan.groups[g]
        group_report = GroupReport(group_blocks, budget.rank, budget.nnz, stats, time.time() - tg, info)
        res.done(model, ctx.stage, g, group_report, streams)
        release_memory()
        report.groups.append(group_report)
        ctx.callbacks.on_group_end(ctx.stage, g, group_report)
        bar.set_postfix(err=f"{stats.rel_err_before:.3f}->{stats.rel_err_after:.3f}"
                            + (" (kept init)" if stats.kept_init else ""))
    del cap, comp_cap
    release_memory()
    report.seconds = time.time() - t0
    return report
