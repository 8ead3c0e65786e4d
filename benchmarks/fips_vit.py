"""FiPS (and its peers) on the Fashion-MNIST ViT: dense vs 20/33/45% of whole-model parameters,
with and without fine-tuning.

    python benchmarks/train_fmnist_vit.py          # once: trains and caches the ViT
    python benchmarks/fips_vit.py                  # every run below (results merge)
    python benchmarks/fips_vit.py --runs fips:0.33:ft
    python benchmarks/fips_vit.py --table          # rewrite docs/fips_vit.md from the JSON

A run is METHOD:RATIO[:ft] (ratio 0 = dense). Calibration: NSAMPLES images of fmnist:train,
stratified by class; fine-tuning ("ft"): distillation from the dense ViT (logit KL) on FT_SAMPLES
images of fmnist:train; top-1/top-5 on the whole fmnist:test (10,000 images). Each run is its
own process, so its peak RSS is its own. Results: docs/vit_runs.json, docs/fips_vit.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from runner import merge_row, run_child

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "vit_runs.json"
CALIB, TEST = "fmnist:train", "fmnist:test"
NSAMPLES = 1024  # calibration images (of 60,000)
FT = dict(steps=600, batch_size=64, lr=1e-4, temperature=1.0, label_weight=0.0, max_samples=20_000)
RATIOS = (0.2, 0.33, 0.45, 0.57)  # 57%: the FiPS paper's ViT figure with fine-tuning
RUNS = (["dense:0"] + [f"fips:{r}" for r in RATIOS] + [f"fips:{r}:ft" for r in RATIOS]
        + [f"{m}:{r}" for m in ("basis-sharing", "svd-llm") for r in RATIOS])


def run_one(run: str, overrides: dict) -> dict:
    import torch

    import layershare
    from layershare.data.assets import fmnist_vit_dir

    torch.set_num_threads(os.cpu_count() or 1)
    method, ratio, *ft = run.split(":")
    ratio, ft = float(ratio), bool(ft)
    model, prep = layershare.load_model(str(fmnist_vit_dir()))
    row: dict = {"run": run, "method": "dense" if ratio == 0 else method, "ratio_target": ratio, "finetuned": ft}
    with tempfile.TemporaryDirectory() as tmp:
        if ratio == 0:
            model.save_pretrained(Path(tmp) / "d", safe_serialization=True)
            row["bytes_on_disk"] = (Path(tmp) / "d" / "model.safetensors").stat().st_size
            row["stored_params"] = sum(p.numel() for p in model.parameters())
            row["seconds"] = 0.0
        else:
            import copy

            teacher = copy.deepcopy(model) if ft else None
            recipe = layershare.Recipe.of(method, ratio=ratio, nsamples=NSAMPLES, **overrides)
            row["recipe"] = recipe.to_dict()
            t0 = time.time()
            result = layershare.compress(model, recipe, data=CALIB, processor=prep, output_dir=Path(tmp) / "c",
                                         batch_size=64)
            row["seconds"] = time.time() - t0
            row["stored_params"] = result.sizes.param_equivalents
            row["ratio_measured"] = result.sizes.ratio
            row["group_errors"] = [(g.stats.rel_err_before, g.stats.rel_err_after) for g in result.report.groups]
            model = layershare.load(Path(tmp) / "c")
            if ft:
                stats = layershare.finetune(model, teacher, CALIB, prep, seed=1, output_dir=Path(tmp) / "f", **FT)
                row["finetune"] = {**FT, "seconds": stats.seconds, "loss_before": stats.loss_before,
                                   "loss_after": stats.loss_after}
                model = layershare.load(Path(tmp) / "f")
            out = Path(tmp) / ("f" if ft else "c")
            row["bytes_on_disk"] = (out / "model.safetensors").stat().st_size
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    acc = layershare.evaluate_accuracy(model, prep, TEST)
    row.update(top1=acc.top1, top5=acc.top5, n_test=acc.n, protocol=acc.protocol)
    return row


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = ["| method | target | fine-tuned | params stored | measured ratio | weights on disk | disk vs dense | "
             "top-1 (test) | vs dense | top-5 | compress time | fine-tune time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"dense": 0, "fips": 1, "basis-sharing": 2, "svd-llm": 3}
    for r in sorted(rows, key=lambda r: (r["ratio_target"], order.get(r["method"], 9), r["finetuned"])):
        other = dense is not None and r is not dense
        target = "-" if r["ratio_target"] == 0 else f"{r['ratio_target']:.0%}"
        measured = f"{r['ratio_measured']:.2%}" if "ratio_measured" in r else "-"
        disk = f"{1 - r['bytes_on_disk'] / dense['bytes_on_disk']:.1%} smaller" if other else "-"
        delta = f"{(r['top1'] - dense['top1']) * 100:+.2f} pt" if other else "-"
        ft_time = f"{r['finetune']['seconds']:.0f} s" if r["finetuned"] else "-"
        lines.append(f"| {r['method']} | {target} | {'yes' if r['finetuned'] else 'no'} | {r['stored_params']:,.0f} | "
                     f"{measured} | {r['bytes_on_disk'] / 2**20:.2f} MiB | {disk} | {r['top1']:.2%} | {delta} | "
                     f"{r['top5']:.2%} | {r['seconds']:.0f} s | {ft_time} | {r['peak_rss_mb'] / 1024:.2f} GiB |")
    return "\n".join(lines)


def write_docs(rows: list[dict]) -> str:
    t = table(rows)
    protocol = next((r["protocol"] for r in rows), "")
    # rows written before the recipe had an init (prune_score) field used the SVD init (magnitude
    # pruning), the defaults then
    # (version-2 recipes keep FiPS's fields in their last stage)
    fips = [r["recipe"]["stages"][-1] if "stages" in r["recipe"] else r["recipe"] for r in rows if r["method"] == "fips"]
    inits = sorted({rc.get("init", "svd") for rc in fips})
    scores = sorted({rc.get("prune_score", "magnitude") for rc in fips})
    old = inits == ["svd"] and scores == ["magnitude"]
    init_note = (f" FiPS init of these rows: {', '.join(inits)}; pruning score: {', '.join(scores)}"
                 + (" (measured before the whitened init and the activation score became the defaults; "
                    "`--recipe '{\"init\": \"svd\", \"prune_score\": \"magnitude\"}'` reproduces them)."
                    if old else "."))
    (ROOT / "docs" / "fips_vit.md").write_text(
        "# FiPS on a Vision Transformer (Fashion-MNIST ViT, CPU, 2 cores)\n\n"
        "Produced by `python benchmarks/fips_vit.py`. The model: the small ViT that "
        "`benchmarks/train_fmnist_vit.py` trains on Fashion-MNIST (no pretrained ViT ships in a registry "
        "package). Target ratios are of the whole model's parameters. Calibration: "
        f"{NSAMPLES} images of `{CALIB}`, stratified by class; FiPS uses the FiPS code's ViT objective (each "
        "compressed block fed the dense previous block's output and trained to match the dense block's "
        f"output).{init_note} Basis Sharing and SVD-LLM are closed-form (whitened SVD on the same calibration images). "
        f"Fine-tuning: distillation from the dense ViT (logit KL, T={FT['temperature']}, no labels), "
        f"{FT['steps']} AdamW steps of {FT['batch_size']} images drawn from {FT['max_samples']:,} images of "
        f"`{CALIB}`, lr {FT['lr']} cosine. Top-1/top-5 on `{TEST}`: {protocol}.\n\n{t}\n\n"
        "Params stored: every tensor kept (shared bases once), the nonzeros of V and their bitmask as "
        "parameter-equivalents at float32. Weights on disk: `model.safetensors` (float32) against the dense "
        "model's `save_pretrained` file. Compress time and peak RSS: one process that loads the model, "
        "captures the calibration inputs, compresses, fine-tunes (when asked) and evaluates the reloaded "
        "directory.\n")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=RUNS, help="METHOD:RATIO[:ft] (ratio 0 = dense)")
    ap.add_argument("--recipe", default="{}", help="JSON of recipe overrides")
    ap.add_argument("--table", action="store_true", help="only rewrite docs/fips_vit.md from the JSON")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, json.loads(args.recipe))), flush=True)
        return
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for run in ([] if args.table else args.runs):
        print(f"== {run}", flush=True)
        row, _, code = run_child([__file__, "--one", run, "--recipe", args.recipe])
        if row is None:
            print(f"   failed (exit {code})", flush=True)
            continue
        rows = merge_row(RESULTS, row, key=lambda r: r["run"])
        print(f"   top-1 {row['top1']:.2%}  compress {row['seconds']:.0f} s", flush=True)
    print(write_docs(rows))


if __name__ == "__main__":
    main()
