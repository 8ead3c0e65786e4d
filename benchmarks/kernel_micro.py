"""Micro-benchmark of the native sparse-V kernels (runtime/kernels) against dense products, per
token of a SmolLM2-135M-shaped MLP.

    python -m layershare.runtime.kernels.build   # once
    python benchmarks/kernel_micro.py [--reps 30] [--blocks 30]

Shapes: d = 576, h = 1536, rank r = 642 with half of each V kept at random (FiPS's default at 20%
on SmolLM2-135M); one U per group of 2 blocks (FiPS's default group size); `--blocks` blocks'
worth of weights (30: SmolLM2's depth, ~320 MB dense), so that every step reads its weights
from memory rather than from a cache. One step = the MLP products of every block for a batch of
1 or 8 tokens:
  dense   up, gate and down as float32 nn.Linear (bias-free)
  kernel  z = x @ U once, z @ V_up and z @ V_gate (in-products), then (a @ V_down^T) @ U^T
          (out-product, then a dense product), through ops.in_product/out_product as the
          "kernel" form calls them (Python overhead included)
with V's values stored in float32 or bfloat16 (activations float32). Reported: the median (and
min) wall time of a step over `--reps` runs, dense and kernel steps interleaved so that both see
the same background load, divided by the number of blocks (µs per block per token), and the bytes
each holds per block. With 1 thread, also the median CPU time of the calling thread (all the
work runs there), which time spent waiting for a shared CPU does not inflate. The load average
is printed before and after (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import time
from functools import partial

import torch
from torch import nn

from layershare.modules.shared_basis import pack_bits
from layershare.runtime import kernels
from layershare.runtime.kernels import ops

D, H, R, DENSITY, GROUP = 576, 1536, 642, 0.5, 2


def sparse_v(dtype: torch.dtype, g: torch.Generator):
    keep = torch.rand(R, H, generator=g) < DENSITY
    values = (torch.randn(int(keep.sum()), generator=g) * 0.02).to(dtype)
    mask = pack_bits(keep)
    return values, mask, ops.prepare(mask, (R, H))


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def timed(fn, reps: int, others=()) -> tuple[list[float], list[float]]:
    """Wall and calling-thread CPU seconds per call of fn over `reps` runs (each sorted), each run
    followed by one run of every `others`."""
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
        for other in others:
            other()
    return sorted(wall), sorted(cpu)


def dense_step(dense: list, x: torch.Tensor, a: torch.Tensor) -> None:
    for up, gate, down in dense:
        up(x), gate(x), down(a)


def kernel_step(blocks: list, bases: list, x: torch.Tensor, a: torch.Tensor) -> None:
    for i, (v_up, v_gate, v_down) in enumerate(blocks):
        U = bases[i // GROUP]
        z = x @ U  # once for up and gate
        ops.in_product(z, *v_up, H), ops.in_product(z, *v_gate, H)
        ops.out_product(a, *v_down) @ U.t()


def us(times: list[float], n_blocks: int) -> tuple[float, float]:
    """(median, min) of sorted step times, in µs per block."""
    return times[len(times) // 2] / n_blocks * 1e6, times[0] / n_blocks * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=30)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the native kernel is not built: run `python -m layershare.runtime.kernels.build`")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n_blocks = args.blocks
    dense = [(nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False))
             for _ in range(n_blocks)]
    bases = [torch.randn(D, R, generator=g) * 0.05 for _ in range(-(-n_blocks // GROUP))]
    sparse = {dt: [[sparse_v(dt, g) for _ in range(3)] for _ in range(n_blocks)]
              for dt in (torch.float32, torch.bfloat16)}

    dense_bytes = 3 * D * H * 4
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs; the machine may be shared)")
    print(f"native path: {ops.isa()}; {n_blocks} blocks, d={D} h={H} r={R}, {DENSITY:.0%} of V kept, "
          f"one U per {GROUP} blocks; µs per block per step: median (min) over {args.reps} steps")
    print(f"dense weights per block: {dense_bytes / 2**20:.2f} MiB")
    for dt, blocks in sparse.items():
        held = nbytes(bases[0]) / GROUP + sum(nbytes(*v) for v in blocks[0])
        print(f"kernel weights per block, values {str(dt).split('.')[-1]}: {held / 2**20:.2f} MiB "
              f"({held / dense_bytes:.2f}x dense; U shared by {GROUP} blocks, offsets included)")
    print()
    print("| threads | batch | values | dense µs wall | kernel µs wall | speed-up wall | dense µs CPU | kernel µs CPU "
          "| speed-up CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for batch in (1, 8):
                x, a = torch.randn(batch, D, generator=g), torch.randn(batch, H, generator=g)

                run_dense = partial(dense_step, dense, x, a)
                steps = {dt: partial(kernel_step, blocks, bases, x, a) for dt, blocks in sparse.items()}
                for fn in (run_dense, *steps.values()):  # warm-up
                    fn()
                dense_t = timed(run_dense, args.reps, others=list(steps.values()))
                for dt, fn in steps.items():
                    kernel_t = timed(fn, args.reps, others=[run_dense])
                    (dw, dc), (kw, kc) = ([us(ts, n_blocks) for ts in pair] for pair in (dense_t, kernel_t))
                    cpu = (f"{dc[0]:.0f} | {kc[0]:.0f} | {dc[0] / kc[0]:.2f}x" if threads == 1
                           else "- | - | -")  # CPU time adds up both threads: not a duration
                    print(f"| {threads} | {batch} | {str(dt).split('.')[-1]} | {dw[0]:.0f} ({dw[1]:.0f}) "
                          f"| {kw[0]:.0f} ({kw[1]:.0f}) | {dw[0] / kw[0]:.2f}x | {cpu} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
