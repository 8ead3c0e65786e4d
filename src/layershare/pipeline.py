"""Sequential, group-by-group compression with captured activations.

1. One forward of the dense model over the calibration batches records, for every block,
   the keyword arguments it is called with (masks, position embeddings, cache positions:
   whatever this transformers version passes; Gemma-3 passes different ones to sliding and
   global layers) and the hidden states entering the first block. The forward stops after
   the last block, so the LM head never runs.
2. For each group: run the group's dense blocks on the stored hidden states, recording each
   MLP's input and output (X_j, Y_j, kept on CPU); the group's outputs become the next
   group's inputs. Only one group's activations are held at a time.
3. The method initialises compressed modules, they replace the dense ones in the model,
   `reconstruct` tunes them on (X_j, Y_j), and `materialize` freezes them.
A method on the attention (scope "attention") records nothing in step 2; its error is the
group's output error against the dense group's, untuned.
A method with a closed-form update (Method.update_needed) also gets each linear's input second
moment on the hidden states of the model compressed so far: a second stream of hidden states,
run through the compressed groups, is kept beside the dense one.
"""
from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, set_path
from .budget import Plan, count_params
from .methods.base import Group, Method
from .objectives import Objective, first, resolve_objective
from .recipe import Recipe
from .reconstruct import ReconStats, reconstruct

BASES_ATTR = "layershare_bases"


class _Stop(Exception):
    pass


@dataclass
class Captured:
    hidden: list[torch.Tensor]  # per batch: hidden states entering the first block of the next group
    args: list[dict[int, tuple]]  # per batch: block index -> (extra positional args, kwargs)


@dataclass
class GroupReport:
    blocks: list[int]
    rank: int
    nnz: int
    stats: ReconStats
    seconds: float


@dataclass
class CompressionReport:
    plan: Plan
    groups: list[GroupReport] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # what a whole-model method reports (ffn-merge: its window)


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and the peak RSS of a
    run grows group after group with the activations of groups already done)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device: str,
                   adapter: Adapter | None = None) -> Captured:
    """Hidden states entering block 0 and every block's call arguments, per batch."""
    if adapter is None:
        from .adapters import get_adapter

        adapter = get_adapter(model)
    hidden: list[torch.Tensor] = []
    args: list[dict[int, tuple]] = []
    current: dict[int, tuple] = {}

    def pre_hook(idx):
        def hook(module, a, kw):
            kw = dict(kw)
            h = a[0] if a else kw.pop("hidden_states")
            if idx == 0:
                hidden.append(h.detach().to("cpu"))
            # caches are per-forward state, never needed to re-run a block
            kw = {k: (None if "cache" in k or k in ("past_key_values", "layer_past") else v)
                  for k, v in kw.items()}
            if "use_cache" in kw:
                kw["use_cache"] = False
            current[idx] = (_to(tuple(a[1:]), "cpu"), _to(kw, "cpu"))
        return hook

    def stop_hook(module, a, out):
        raise _Stop

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop_hook))
    try:
        for batch in tqdm(batches, desc="capture", leave=False, dynamic_ncols=True):
            current = {}
            try:
                adapter.call(model, batch.to(device))
            except _Stop:
                pass
            args.append(current)
    finally:
        for h in handles:
            h.remove()
    return Captured(hidden=hidden, args=args)


@torch.no_grad()
def run_group(blocks: nn.ModuleList, group: list[int], cap: Captured, adapter: Adapter, device: str,
              record: bool, grams: dict[str, torch.Tensor] | None = None,
              linears: dict[str, nn.Module] | None = None, objective: Objective | None = None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Run the group's blocks on the captured inputs; optionally record, per block, what the
    objective matches (default: each MLP's input/output, see objectives.py), and (with `grams`
    and `linears`) each linear's input second moment E[x x^T] in float64."""
    objective = objective or Objective("mlp", adapter)
    # each input/output goes straight into one preallocated CPU tensor (no list + cat copy)
    n_rows = sum(h.shape[0] * h.shape[1] if objective.per_token else h.shape[0] for h in cap.hidden)
    X: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    filled = [[0, 0] for _ in group]
    handles = []
    if grams is not None:
        counts: dict[str, int] = {}
        last: list = [None, None]  # the input tensor seen last and its x^T x: gate and up share one input

        def accumulate(path):
            def hook(m, a, kw):
                x = a[0] if a else next(iter(kw.values()))
                if x is not last[0]:
                    flat = x.detach().reshape(-1, x.shape[-1]).double().cpu()
                    last[:] = [x, flat.t() @ flat]
                grams[path] = grams.get(path, 0) + last[1]
                counts[path] = counts.get(path, 0) + x.numel() // x.shape[-1]
            return hook

        for path, module in (linears or {}).items():
            handles.append(module.register_forward_pre_hook(accumulate(path), with_kwargs=True))
    if record:
        def put(store: list[torch.Tensor], j: int, side: int, t: torch.Tensor) -> None:
            t = t.detach().reshape(-1, t.shape[-1]) if objective.per_token else t.detach()
            if len(store) <= j:
                store.append(torch.empty(n_rows, *t.shape[1:], dtype=t.dtype))
            start = filled[j][side]
            store[j][start:start + t.shape[0]].copy_(t)
            filled[j][side] = start + t.shape[0]

        def keep_input(j):
            def hook(m, a, kw):
                put(X, j, 0, a[0] if a else kw.get("hidden_states", next(iter(kw.values()))))
            return hook

        def keep_output(j):
            def hook(m, a, out):
                put(Y, j, 1, first(out))
            return hook

        for j, b in enumerate(group):
            m_in, m_out = objective.hooks(blocks[b])
            handles.append(m_in.register_forward_pre_hook(keep_input(j), with_kwargs=True))
            handles.append(m_out.register_forward_hook(keep_output(j)))
    outs = []
    try:
        for h, per_block in zip(cap.hidden, cap.args):
            h = h.to(device)
            for b in group:
                extra, kw = per_block[b]
                h = first(blocks[b](h, *_to(extra, device), **_to(kw, device)))
            outs.append(h.cpu())
    finally:
        for hd in handles:
            hd.remove()
    if grams is not None:
        last.clear()
        for path in grams:
            grams[path] /= counts[path]
    if record and any(f != [n_rows, n_rows] for f in filled):
        raise RuntimeError(f"captured {filled} input/output rows, expected {n_rows} each")
    return X, Y, outs


def output_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """sum ||out - ref||^2 / sum ||ref||^2 over the batches."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref))
    return num / max(sum(float(r.float().pow(2).sum()) for r in ref), 1e-30)


def plan_model(model: nn.Module, adapter: Adapter, method: Method, recipe: Recipe) -> tuple[list[list[int]], Plan]:
    """Groups and budget, checked before any long work starts."""
    n_blocks = len(adapter.blocks(model))
    groups = method.groups(n_blocks, recipe)
    return groups, method.plan_model(model, adapter, groups, count_params(model), recipe)


def compress_model(model: nn.Module, adapter: Adapter, method: Method, recipe: Recipe,
                   batches: list[torch.Tensor], groups: list[list[int]], plan: Plan) -> CompressionReport:
    t0 = time.time()
    device = recipe.device
    model.eval()
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = adapter.blocks(model)
    report = CompressionReport(plan=plan)
    if not hasattr(model, BASES_ATTR):
        model.add_module(BASES_ATTR, nn.ModuleDict())
    if method.whole_model:
        info = method.compress_whole(model, adapter, recipe, batches, plan)
        model.to(device)  # what the method built (from CPU weights) joins the model's device
        report.extra = info
        report.seconds = time.time() - t0
        return report
    gen = torch.Generator().manual_seed(recipe.seed)
    objective = resolve_objective(recipe, adapter)
    cap = capture_inputs(model, blocks, batches, device, adapter)
    update = method.update_needed(recipe)
    attention = method.scope == "attention"
    # the hidden states of the model compressed so far: for the update, or as the next groups' inputs
    comp_cap = Captured(hidden=cap.hidden, args=cap.args) if update or recipe.propagate == "compressed" else None
    release_memory()
    bar = tqdm(list(enumerate(groups)), desc=f"{method.name} groups", dynamic_ncols=True)
    for g, group_blocks in bar:
        tg = time.time()
        group = Group.of(model, adapter, g, group_blocks, method.linears(adapter))
        grams = {} if method.gram_needed(recipe) else None
        linears = dict(zip(group.paths, group.modules))
        X, Y, dense_out = run_group(blocks, group_blocks, cap, adapter, device, record=not attention,
                                    grams=grams, linears=linears, objective=objective)
        group.grams = grams
        if update and recipe.propagate == "compressed" and grams is not None:
            group.update_grams = grams  # cap is the compressed stream already: the same statistics
        elif update:  # the dense group's linears fed by the compressed model so far
            group.update_grams = {}
            run_group(blocks, group_blocks, comp_cap, adapter, device, record=False,
                      grams=group.update_grams, linears=linears)
        del linears
        comp = method.init(group, plan.groups[g], recipe)
        for path, module in comp.modules.items():
            set_path(model, path, module.to(device))
        for dense in group.modules:  # the replaced weights: free them even if something still holds the module
            for p in dense.parameters(recurse=False):
                p.data = p.data.new_empty(0)
        bases = getattr(model, BASES_ATTR)
        for key, shared in comp.shared.items():
            key = f"attn{key}" if attention else key  # an attention stage and an MLP stage share the dict
            if key in bases:
                raise RuntimeError(f"shared module {key!r} already exists (a second stage of the same scope?)")
            bases[key] = shared.to(device)
        del group
        if attention:  # no MLP objective: the error is the group's output error, untuned
            method.materialize(comp)
            _, _, comp_out = run_group(blocks, group_blocks, cap, adapter, device, record=False)
            err = output_error(comp_out, dense_out)
            stats = ReconStats(err, err, 0, [])
            del comp_out
        else:
            fns = [lambda x, b=blocks[b]: objective.forward(b, x) for b in group_blocks]
            with torch.enable_grad():
                stats = reconstruct(fns, X, Y, comp.params if method.tunable else [], comp.pruner, recipe,
                                    desc=f"group {g + 1}/{len(groups)}", generator=gen)
            method.materialize(comp)
        del X, Y
        if comp_cap is not None:
            _, _, comp_cap.hidden = run_group(blocks, group_blocks, comp_cap, adapter, device, record=False)
        cap.hidden = comp_cap.hidden if recipe.propagate == "compressed" else dense_out
        del comp, dense_out
        release_memory()
        report.groups.append(GroupReport(group_blocks, plan.groups[g].rank, plan.groups[g].nnz, stats,
                                         time.time() - tg))
        bar.set_postfix(err=f"{stats.rel_err_before:.3f}->{stats.rel_err_after:.3f}"
                                + (" (kept init)" if stats.kept_init else ""))
    del cap, comp_cap
    release_memory()
    report.seconds = time.time() - t0
    return report
