"""FiPS's allocation="error" probe on a real model: each group's loss increase when it alone is
compressed one-shot, and the split of the budget over the groups that follows (no compression).

    python benchmarks/allocation.py                                  # SmolLM2-135M at 20%
    python benchmarks/allocation.py --model gemma3-270m --ratio 0.2

Calibration: Sense and Sensibility, the default recipe's windows (compression/allocate.py uses
the first 16 for the inits and the first 8 for the loss). Writes docs/allocation.json (one entry
per model and ratio) and docs/allocation.png (the fraction each group removes, uniform and split).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from runner import CALIB, ROOT, merge_row

import layershare
from layershare import FiPSConfig, Recipe

OUT = ROOT / "docs" / "allocation.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    args = ap.parse_args()
    from layershare.adapters import get_adapter
    from layershare.compression.allocate import PROBE_STEP, probe
    from layershare.compression.drivers import Residency
    from layershare.data.text import calibration_batches, read_text, tokenize

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    model, tok = layershare.load_model(args.model)
    recipe = Recipe(stages=[FiPSConfig(ratio=args.ratio, allocation="error")])
    adapter = get_adapter(model)
    stage = layershare.plan(model, recipe)[0]
    method = stage.method
    batches = calibration_batches(tokenize(tok, read_text(CALIB)), recipe.nsamples, recipe.seqlen, 8, recipe.seed)
    t0 = time.time()
    plans = method.probe_plans(model, adapter, stage.groups, stage.plan.total_params, recipe.bytes_per_param)
    losses = probe(model, adapter, method, batches, stage.groups, plans, "cpu", Residency())
    split = method.allocate(model, adapter, stage.groups, stage.plan.total_params, recipe.bytes_per_param, plans, losses)
    row = {"model": args.model, "ratio": args.ratio, "seconds": time.time() - t0, "threads": torch.get_num_threads(),
           "probe_step": PROBE_STEP, "groups": stage.groups, "loss_increase": losses,
           "removed_uniform": [1 - g.stored / g.dense for g in plans[0].groups],
           "removed_probe_step": [1 - g.stored / g.dense for g in plans[1].groups],
           "removed_split": [1 - g.stored / g.dense for g in split.groups],
           "rank_split": [g.rank for g in split.groups], "density_split": [g.density for g in split.groups]}
    rows = merge_row(OUT, row, key=lambda r: (r["model"], r["ratio"]))
    print(json.dumps(row, indent=1))
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        x = list(range(1, len(r["groups"]) + 1))
        ax.plot(x, r["removed_uniform"], "k--", label="uniform (default)")
        ax.plot(x, r["removed_split"], "o-", label='allocation="error"')
        ax.set_xlabel("group (blocks in order)")
        ax.set_ylabel("fraction of its MLP parameters removed")
        ax.set_title(f"{r['model']}, {r['ratio']:.0%} of the model")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "allocation.png", dpi=100)


if __name__ == "__main__":
    main()
