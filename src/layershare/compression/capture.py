"""Calibration activations: the hidden states entering the first block and every block's
call arguments (one forward, stopped after the last block), and running a group of blocks on
them while recording what an objective matches and each linear's input second moment.
Only one group's activations are held at a time. The captured hidden states stay on the CPU;
`run_group` accumulates the second moments and keeps the objective's activations on the devices
its caller names (the sequential driver: the recipe's device, where the forward runs).
"""
from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from layershare.adapters import Adapter, get_adapter
from layershare.compression.objectives import Objective, first


class _Stop(Exception):
    pass


@dataclass
class Captured:
    hidden: list[torch.Tensor]  # per batch: hidden states entering the first block of the next group
    args: list[dict[int, tuple]]  # per batch: block index -> (extra positional args, kwargs)


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and the peak RSS of a
    run grows group after group with the activations of groups already done)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def return_freed_memory() -> None:
    """From now on, glibc gives every freed block of 1 MiB or more back to the OS at once
    (M_MMAP_THRESHOLD fixed at 1 MiB instead of glibc's threshold that rises to 32 MiB after the
    first large free, below which freed tensors stay in the heap, fragmented). Onloading (onload.py)
    sets it: its peak is one group's working tensors, allocated and freed phase after phase
    (measured on two blocks of the 2B benchmark's shape: a group's peak RSS 2.58 GiB with 5 tuning
    steps -> 2.25 GiB with 3, the steady state reached after the first step; no change in time)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
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
                   adapter: Adapter | None = None, skip_blocks: bool = False) -> Captured:
    """Hidden states entering block 0 and every block's call arguments, per batch.
    skip_blocks: run no block (each returns its input; the model's own code computes every
    block's arguments before its loop): the blocks may be on the meta device (onload.py)."""
    adapter = adapter or get_adapter(model)
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
            if skip_blocks and idx == len(blocks) - 1:
                raise _Stop
        return hook

    def stop_hook(module, a, out):
        raise _Stop

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop_hook))
    if skip_blocks:
        for b in blocks:
            b.forward = _identity
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
        if skip_blocks:
            for b in blocks:
                del b.forward
    return Captured(hidden=hidden, args=args)


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@torch.no_grad()
def arguments_independent(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, device: str,
                          adapter: Adapter) -> bool:
    """Whether every block's call arguments are computed before the blocks run (so
    capture_inputs(skip_blocks=True) records what a full forward would): both captures of one
    row of `batch` compared exactly. True for the Hugging Face decoders and ViTs tried (SmolLM2,
    Gemma-3: masks and rotary embeddings are computed before the loop); a model that passes
    state from block to block (a position bias returned by the previous block) fails it."""
    probe = [batch[:1]]
    full = capture_inputs(model, blocks, probe, device, adapter)
    skipped = capture_inputs(model, blocks, probe, device, adapter, skip_blocks=True)
    return _same(full.hidden, skipped.hidden) and _same(full.args, skipped.args)


def call_block(block: nn.Module, h: torch.Tensor, args: tuple, device: str) -> torch.Tensor:
    """One block on one batch's hidden states, with that batch's captured (extra args, kwargs)."""
    extra, kw = args
    return first(block(h.to(device), *_to(extra, device), **_to(kw, device)))


@torch.no_grad()
def run_group(blocks: nn.ModuleList, group: list[int], cap: Captured, adapter: Adapter, device: str,
              record: bool, grams: dict[str, torch.Tensor] | None = None,
              linears: dict[str, nn.Module] | None = None, objective: Objective | None = None, *,
              stats_device: str | torch.device | None = None, stats_dtype: torch.dtype = torch.float64,
              record_device: str | torch.device | None = None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Run the group's blocks on the captured inputs; optionally record, per block, what the
    objective matches (default: each MLP's input/output, see objectives.py), and (with `grams`
    and `linears`) each linear's input second moment E[x x^T].
    stats_device, stats_dtype: where and in what dtype the second moments accumulate (default
    the CPU, float64; the sequential driver passes the recipe's device: they never leave it).
    record_device: where the recorded inputs/outputs are kept (default the CPU)."""
    objective = objective or Objective("mlp", adapter)
    stats_device = torch.device("cpu") if stats_device is None else torch.device(stats_device)
    record_device = torch.device("cpu") if record_device is None else torch.device(record_device)
    # each input/output goes straight into one preallocated tensor (no list + cat copy)
    n_rows = sum(h.shape[0] * h.shape[1] if objective.per_token else h.shape[0] for h in cap.hidden)
    X: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    filled = [[0, 0] for _ in group]
    handles = []
    if grams is not None:
        counts: dict[str, int] = {}
        # the input tensor seen last, as rows in stats_dtype, and the path that took its product: linears
        # that read one tensor (gate and up) share that one product, and their second moment one tensor
        last: list = [None, None, None]
        alias: dict[str, str] = {}  # path -> the path whose second moment it shares (set by the first batch)

        def accumulate(path):
            def hook(m, a, kw):
                x = a[0] if a else next(iter(kw.values()))
                shared = x is last[0]
                if path not in grams and shared:
                    alias.setdefault(path, last[2])
                if path in alias:
                    if not (shared and alias[path] == last[2]):
                        raise RuntimeError(f"{path} read the input of {alias[path]} on the first batch but not "
                                           "on a later one: the statistics cannot share it")
                    return
                if not shared:
                    last[:] = [x, x.detach().reshape(-1, x.shape[-1]).to(stats_device, stats_dtype), path]
                flat = last[1]
                if path in grams:  # x^T x added in place: a down projection's is h x h, never a copy
                    grams[path].addmm_(flat.t(), flat)
                else:
                    grams[path] = flat.t() @ flat
                counts[path] = counts.get(path, 0) + x.numel() // x.shape[-1]
            return hook

        for path, module in (linears or {}).items():
            handles.append(module.register_forward_pre_hook(accumulate(path), with_kwargs=True))
    if record:
        def put(store: list[torch.Tensor], j: int, side: int, t: torch.Tensor) -> None:
            t = t.detach().reshape(-1, t.shape[-1]) if objective.per_token else t.detach()
            if len(store) <= j:
                store.append(torch.empty(n_rows, *t.shape[1:], dtype=t.dtype, device=record_device))
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
            for b in group:
                h = call_block(blocks[b], h, per_block[b], device)
            outs.append(h.cpu())
    finally:
        for hd in handles:
            hd.remove()
    if grams is not None:
        last.clear()
        for path in grams:
            grams[path] /= counts[path]
        for path, owner in alias.items():  # one tensor for both (the inits read, never write, them)
            grams[path] = grams[owner]
    if record and any(f != [n_rows, n_rows] for f in filled):
        raise RuntimeError(f"captured {filled} input/output rows, expected {n_rows} each")
    return X, Y, outs


def output_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """sum ||out - ref||^2 / sum ||ref||^2 over the batches."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref))
    return num / max(sum(float(r.float().pow(2).sum()) for r in ref), 1e-30)
