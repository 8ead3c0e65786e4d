"""Sequential GPTQ: block by block, each tensor's Hessian gathered from the inputs the model
quantized so far feeds it (IST-DASLab/gptq's `llama_sequential` with `true_sequential`,
llm-compressor's sequential pipeline).

1. The hidden states entering block 0 and every block's call arguments are captured once
   (compression/capture.py).
2. The blocks are walked in units: a block alone, or the blocks a shared tensor spans (FiPS's
   and Basis Sharing's bases, quant/inputs.py) with every block between them.
3. Within a block, the order is the forward's (true-sequential): the block is run once on one
   batch, and its quantized tensors are put in steps, one per distinct input tensor in the order
   first read, first factors before second ones: Llama's q/k/v (one input), o, gate/up, down;
   in a FiPS layer of role "in", U before V (V reads x @ U). Each step runs the block on every
   batch only until the step's modules have read their inputs, summing X^T X (float64) per
   tensor; then its tensors are quantized (`quantize(target, H)`) before the next step runs.
4. A tensor used in several blocks gets the sum of its uses' Hessians over the unit and is
   quantized at the end of the walk; the steps after it in each block (which read its output)
   wait for the next walk, which reruns the unit's blocks from the unit's inputs with it
   quantized. FiPS's group: the first walk quantizes the attention and gathers U's Hessian (the
   MLPs still with the float U), the second quantizes the V's from z = x @ U with U quantized.
5. The unit's blocks, fully quantized, make the next unit's inputs.

With `float_targets` (GPTAQ's asymmetric calibration, Li et al. 2025, arXiv:2504.02692), a float copy
of each unit's blocks runs beside them on the float model's own hidden states, and each step also
sums D = (X - X~)^T X~ of every target, X its input in the float model and X~ in the model quantized
so far: GPTQ then matches the float model's output W X instead of the layer's own output on the
quantized inputs W X~ (`quantize(target, H, D)`; quant/gptq.toward_float). "Float" is the model as
it enters this walk: tensors rounded before GPTQ (FiPS's bases at 8 bits, embeddings) are rounded in
the copies too.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from layershare.compression.capture import Captured, call_block, run_group
from layershare.quant.inputs import Target, Use

Step = list[tuple[Target, Use]]


class _Stop(Exception):
    pass


@torch.no_grad()
def quantize_sequentially(blocks: nn.ModuleList, cap: Captured, targets: dict[str, Target],
                          quantize: Callable[[Target, torch.Tensor, torch.Tensor | None], None], adapter,
                          device: str, float_targets: bool = False) -> None:
    """Quantize every target (in place, through `quantize(target, H, D)`; D None unless
    `float_targets`), unit after unit."""
    hidden = cap.hidden
    floats = cap.hidden if float_targets else None  # the float model's hidden states
    units_ = units(targets.values())
    for unit in tqdm(units_, desc="GPTQ blocks", unit="unit", dynamic_ncols=True):
        pending = {n: t for n, t in targets.items() if t.blocks & set(unit)}
        hidden, floats = _Unit(blocks, unit, cap.args, adapter, device, quantize, floats is not None).run(
            hidden, floats, pending)


def units(targets) -> list[list[int]]:
    """Consecutive blocks from 0 to the last a target uses, cut where no target spans the cut."""
    reach: dict[int, int] = {}
    for t in targets:
        lo, hi = min(t.blocks), max(t.blocks)
        reach[lo] = max(reach.get(lo, lo), hi)
    last = max(reach.values(), default=-1)
    out, start = [], 0
    while start <= last:
        end, b = reach.get(start, start), start
        while b <= end:
            end = max(end, reach.get(b, b))
            b += 1
        out.append(list(range(start, end + 1)))
        start = end + 1
    return out


class _Unit:
    """One unit of blocks: walked until every tensor it holds is quantized."""

    def __init__(self, blocks, unit: list[int], args, adapter, device: str, quantize, float_targets: bool):
        self.blocks, self.unit, self.args = blocks, unit, args
        self.adapter, self.device, self.quantize = adapter, device, quantize
        self.steps: dict[int, list[Step]] = {}
        self.floats: dict[int, nn.Module] | None = None  # float copies of the unit's blocks (float_targets)
        self.float_of: dict[int, nn.Module] = {}  # id(module) -> its float copy
        if float_targets:  # one deepcopy: a tensor shared by the unit's blocks stays shared in the copies
            copies = copy.deepcopy([blocks[b] for b in unit])
            self.floats = dict(zip(unit, copies))
            for b, c in self.floats.items():
                self.float_of.update({id(m): f for m, f in zip(blocks[b].modules(), c.modules())})

    def run(self, hidden: list[torch.Tensor], floats: list[torch.Tensor] | None, pending: dict[str, Target]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The unit's outputs once every pending target is quantized, and the float copies' outputs
        (None without float targets)."""
        out, float_out = None, None
        while pending:
            before = len(pending)
            out, float_out, at_end = self._walk(hidden, floats, pending)
            if len(pending) == before:
                raise RuntimeError(f"GPTQ: no tensor of blocks {self.unit} could be quantized "
                                   f"({', '.join(pending)})")
            if at_end:  # these outputs were made before the last tensors were quantized
                out = None
        if floats is not None and float_out is None:
            float_out = self._forward(floats, self.unit, self.floats)
        return (out if out is not None else self._forward(hidden, self.unit)), float_out

    def _walk(self, hidden, floats, pending) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, bool]:
        """One pass over the unit's blocks; returns their outputs, the float copies' outputs, and
        whether tensors were quantized at the end of the pass (after the outputs were made)."""
        gathered: dict[str, list] = {}  # name -> [H, D]
        seen: dict[str, int] = {}
        h, f = hidden, floats
        for b in self.unit:
            if b not in self.steps:
                self.steps[b] = self._probe(b, h, pending)
            self._walk_block(b, h, f, pending, gathered, seen)
            h = self._forward(h, [b])
            if f is not None:
                f = self._forward(f, [b], self.floats)
        complete = [n for n in gathered if seen[n] == len(pending[n].uses)]
        for n in complete:
            self.quantize(pending.pop(n), *gathered.pop(n))
        return h, f, bool(complete)

    def _walk_block(self, b: int, h, f, pending, gathered, seen) -> None:
        """Block b's steps in order: each step's Hessians gathered, its tensors used only in this
        block quantized at once. After a tensor that stays unquantized (it has uses in other
        blocks), only tensors already being gathered in this pass go on being gathered."""
        waiting = False
        for step in self.steps[b]:
            todo = [(t, u) for t, u in step if t.name in pending and (not waiting or t.name in gathered)]
            if not todo:
                continue
            for name, HD in self._gather(b, h, f, todo).items():
                _add(gathered, name, HD, copy=False)
            for t, _ in todo:
                seen[t.name] = seen.get(t.name, 0) + 1
            for t in {id(t): t for t, _ in todo}.values():
                if t.blocks == {b} and seen[t.name] == len(t.uses):
                    self.quantize(pending.pop(t.name), *gathered.pop(t.name))
                else:
                    waiting = True

    def _probe(self, b: int, h, pending) -> list[Step]:
        """Block b's steps: its targets' uses by the input they read (distinct input tensors in
        the order first read; first factors before second ones), from one batch's forward."""
        uses = [(t, u) for t in pending.values() for u in t.uses if u.block == b]
        if not uses:
            return []
        modules = {id(u.module): u.module for _, u in uses}
        calls: list[tuple[int, torch.Tensor]] = []

        def record(m, a, kw):
            calls.append((id(m), a[0] if a else next(iter(kw.values()))))

        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules.values()]
        try:
            call_block(self.blocks[b], h[0], self.args[0][b], self.device)
        finally:
            for hd in handles:
                hd.remove()
        inputs: list[torch.Tensor] = []
        read: dict[int, int] = {}
        for mid, x in calls:
            if mid not in read:
                k = next((i for i, y in enumerate(inputs) if y is x), None)
                if k is None:
                    inputs.append(x)
                    k = len(inputs) - 1
                read[mid] = k
        missing = [type(modules[m]).__name__ for m in modules if m not in read]
        if missing:
            raise RuntimeError(f"GPTQ: block {b}'s forward never called {', '.join(missing)}: no inputs to "
                               "gather its Hessian from")
        steps: dict[tuple[int, int], Step] = {}
        for t, u in uses:
            steps.setdefault((read[id(u.module)], u.factor), []).append((t, u))
        return [steps[k] for k in sorted(steps)]

    def _gather(self, b: int, h, f, todo: Step) -> dict[str, list]:
        """Per target in `todo`: [H, D], sums over the batches (float64) of H = X~^T X~ of its input X~
        and, with float copies (`f` their hidden states), D = (X - X~)^T X~ with X its input in the
        float copy (else None); each block runs on each batch only until every module in `todo`
        has read its input."""
        by_module: dict[int, Step] = {}
        for t, u in todo:
            by_module.setdefault(id(u.module), []).append((t, u))
        out: dict[str, list] = {}
        called: set[int] = set()
        grams: dict[tuple[int, int], tuple] = {}  # one product per input (q, k, v): (x, [H, D])
        float_x: dict[int, torch.Tensor] = {}  # id(module) -> its input in the float copy, this batch

        def hook(m, a, kw):
            x = a[0] if a else next(iter(kw.values()))
            for t, u in by_module[id(m)]:
                key = (id(x), id(u.source))
                if key not in grams:
                    xq = _rows(u.input(x))
                    cross = None
                    if f is not None:
                        xf = dataclasses.replace(u, module=self.float_of[id(u.module)]).input(float_x[id(m)])
                        cross = ((_rows(xf) - xq).t() @ xq).double()
                    grams[key] = (x, [(xq.t() @ xq).double(), cross])
                _add(out, t.name, grams[key][1], copy=True)  # one product, possibly several targets
            called.add(id(m))
            if len(called) == len(by_module):
                raise _Stop

        def float_hook(m, a, kw):
            float_x[original[id(m)]] = a[0] if a else next(iter(kw.values()))
            if len(float_x) == len(by_module):
                raise _Stop

        modules = {id(u.module): u.module for _, u in todo}
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules.values()]
        original = {}
        if f is not None:
            original = {id(self.float_of[k]): k for k in modules}
            handles += [self.float_of[k].register_forward_pre_hook(float_hook, with_kwargs=True) for k in modules]
        try:
            for i, hb in enumerate(h):
                called.clear()
                grams.clear()
                float_x.clear()
                if f is not None:
                    _until_stop(self.floats[b], f[i], self.args[i][b], self.device)
                _until_stop(self.blocks[b], hb, self.args[i][b], self.device)
        finally:
            for hd in handles:
                hd.remove()
        return out

    def _forward(self, h, blocks: list[int], modules=None) -> list[torch.Tensor]:
        return run_group(self.blocks if modules is None else modules, blocks, Captured(hidden=h, args=self.args),
                         self.adapter, self.device, record=False)[2]


def _until_stop(block: nn.Module, h: torch.Tensor, args, device: str) -> None:
    try:
        call_block(block, h, args, device)
    except _Stop:
        pass


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as rows of its last dimension in float32 (the products are computed in float32, summed in float64)."""
    return x.detach().reshape(-1, x.shape[-1]).float()


def _add(sums: dict[str, list], name: str, HD: list, copy: bool) -> None:
    """sums[name] += [H, D] in place (D None without float targets); a first entry is stored as
    given, or as a copy when `copy` (HD still read by other targets)."""
    if name in sums:
        for a, c in zip(sums[name], HD):
            if a is not None:
                a.add_(c)
    else:
        sums[name] = [c.clone() if copy and c is not None else c for c in HD]
