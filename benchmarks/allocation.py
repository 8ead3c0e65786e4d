"""FiPS's allocation="error" probe on a real model: each group's loss increase when it alone is
compressed one-shot, and the split of the budget over the groups that follows (no compression).

    python benchmarks/allocation.py                                  # SmolLM2-135M at 20%
    python benchmarks/allocation.py --model gemma3-270m --ratio 0.2
    python benchmarks/allocation.py --layers "LABEL"                 # plot what a run kept per layer type

--layers draws, from the rows of docs/llm_validation.json with that label and --ratio (fips_llm.py --validation
records `layer_removed` for every linear), the fraction each group removed per layer type
(up/gate/down: FiPS prunes V over the whole group, so the types differ), one panel per model:
docs/allocation_layers.png.

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
    ap.add_argument("--layers", metavar="LABEL", help="only plot the per-layer-type split of the validation rows "
                                                      "with this label (no probe)")
    args = ap.parse_args()
    if args.layers:
        plot_layers(args.layers, args.ratio)
        return
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


def plot_layers(label: str, ratio: float) -> None:
    from runner import VALID_RESULTS

    rows = [r for r in json.loads(VALID_RESULTS.read_text()) if r.get("label") == label and r.get("layer_removed")
            and abs(r["ratio_target"] - ratio) < 1e-9]
    if not rows:
        raise SystemExit(f"no row of {VALID_RESULTS.name} labelled {label!r} records layer_removed")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_removed(r: dict, t: str, g: int | None = None) -> float:
        """The mean removed fraction of the linears of type t (in group g, or in every group)."""
        v = [e["removed"] for e in r["layer_removed"] if e["type"] == t and g in (None, e["group"])]
        return sum(v) / len(v)

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        types = sorted({x["type"] for x in r["layer_removed"]})
        groups = sorted({x["group"] for x in r["layer_removed"]})
        for t in types:  # the mean over the group's blocks of that type
            ax.plot([g + 1 for g in groups], [mean_removed(r, t, g) for g in groups], "o-", ms=3, label=t)
        x = [g + 1 for g in groups]
        ax.plot(x, r["group_removed"], "k--", label="group (with bitmask)")
        ax.set_xlabel("group (blocks in order)")
        ax.set_ylabel("fraction of the weights removed")
        ax.set_title(f"{r['model']}, {r['ratio_target']:.0%} of the model ({label})", fontsize=9)
        ax.legend(fontsize=7)
        print(r["model"], {t: round(mean_removed(r, t), 3) for t in types})
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "allocation_layers.png", dpi=100)


if __name__ == "__main__":
    main()
