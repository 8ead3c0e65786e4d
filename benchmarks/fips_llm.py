"""FiPS on the real causal LMs that ship in registry packages: dense vs 10/20/30% compression.

    python benchmarks/fips_llm.py                      # SmolLM2-135M at 10/20/30%, Gemma-3-270M at 20%
    python benchmarks/fips_llm.py --runs smollm2-135m:0.2

Every run is its own subprocess, so its peak RSS (ru_maxrss of that process: model load,
calibration capture and compression) is its own. Calibration: Sense and Sensibility;
perplexity on Northanger Abbey (never used to choose defaults; Mansfield Park was the
validation book). Writes docs/fips_llm.md and docs/fips_llm.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ["smollm2-135m:0", "smollm2-135m:0.1", "smollm2-135m:0.2", "smollm2-135m:0.3",
                "gemma3-270m:0", "gemma3-270m:0.2"]
CALIB = "austen:sensesensibility"
TEST = "austen:northangerabbey"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(model_name: str, ratio: float, seqlen: int | None) -> dict:
    """Runs in a child process: load, (compress), evaluate."""
    import torch

    import layershare
    from layershare.data import read_text, tokenize

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = layershare.load_model(model_name)
    row: dict = {"model": model_name, "ratio_target": ratio}
    with tempfile.TemporaryDirectory(dir=ROOT / "out" if (ROOT / "out").exists() else None) as tmp:
        if ratio == 0:
            dense_dir = Path(tmp) / "dense"
            model.save_pretrained(dense_dir, safe_serialization=True)
            row["bytes_on_disk"] = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
            row["stored_params"] = sum(p.numel() for p in model.parameters())
            row["seconds"] = 0.0
            row["peak_rss_mb"] = peak_rss_mb()
        else:
            recipe = layershare.Recipe(ratio=ratio)
            row["recipe"] = recipe.to_dict()
            t0 = time.time()
            result = layershare.compress(model, recipe, data=CALIB, tokenizer=tok, output_dir=Path(tmp) / "c")
            row["seconds"] = time.time() - t0
            row["peak_rss_mb"] = peak_rss_mb()  # before evaluation: load + capture + compression
            row["stored_params"] = result.sizes.param_equivalents
            row["ratio_measured"] = result.sizes.ratio
            row["bytes_on_disk"] = (Path(tmp) / "c" / "model.safetensors").stat().st_size
            row["dense_bytes"] = result.sizes.dense_bytes
            row["group_errors"] = [(g.stats.rel_err_before, g.stats.rel_err_after) for g in result.report.groups]
            model = layershare.load(Path(tmp) / "c")  # measure what was saved, not what is in memory
    ids = tokenize(tok, read_text(TEST))
    ppl = layershare.evaluate_perplexity(model, tok, ids, seqlen=seqlen)
    row["ppl"] = ppl.ppl
    row["protocol"] = ppl.protocol
    return row


def table(rows: list[dict]) -> str:
    dense = {r["model"]: r for r in rows if r["ratio_target"] == 0}
    lines = ["| model | target | params stored | measured ratio | weights on disk | disk vs dense | "
             "ppl (test) | ppl vs dense | compress time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense.get(r["model"])
        disk_ratio = f"{1 - r['bytes_on_disk'] / d['bytes_on_disk']:.1%} smaller" if d and r is not d else "-"
        ppl_rel = f"+{r['ppl'] / d['ppl'] - 1:.1%}" if d and r is not d else "-"
        target = "dense" if r["ratio_target"] == 0 else f"{r['ratio_target']:.0%}"
        measured = f"{r['ratio_measured']:.2%}" if "ratio_measured" in r else "-"
        lines.append(
            f"| {r['model']} | {target} | {r['stored_params'] / 1e6:,.2f} M | {measured} | "
            f"{r['bytes_on_disk'] / 2**20:,.1f} MiB | {disk_ratio} | {r['ppl']:.2f} | {ppl_rel} | "
            f"{r['seconds'] / 60:,.1f} min | {r['peak_rss_mb'] / 1024:,.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="MODEL:RATIO (0 = dense)")
    ap.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    ap.add_argument("--out", default=str(ROOT / "docs" / "fips_llm"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, ratio = args.one.rsplit(":", 1)
        print("ROW " + json.dumps(one(name, float(ratio), args.seqlen)), flush=True)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    for run in args.runs:
        print(f"== {run}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", run, "--seqlen", str(args.seqlen)],
                              stdout=subprocess.PIPE, text=True)
        row_lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not row_lines:
            print(f"   failed (exit {proc.returncode})", flush=True)
            continue
        row = json.loads(row_lines[-1][4:])
        rows = [r for r in rows if (r["model"], r["ratio_target"]) != (row["model"], row["ratio_target"])] + [row]
        rows.sort(key=lambda r: (r["model"] != "smollm2-135m", r["model"], r["ratio_target"]))
        json_path.write_text(json.dumps(rows, indent=2))
        print(f"   ppl {row['ppl']:.3f}  time {row['seconds']:.0f} s  peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    md = table(rows)
    protocols = sorted({f"{r['model']}: {r['protocol']}" for r in rows})
    out.with_suffix(".md").write_text(
        "# FiPS on real causal LMs (CPU, 2 cores)\n\n"
        f"Produced by `python benchmarks/fips_llm.py`. Calibration: {CALIB} (default recipe: "
        f"`layershare.Recipe(ratio=...)`); perplexity on {TEST}, standard protocol:\n\n"
        + "\n".join(f"- {p}" for p in protocols) + "\n\n" + md + "\n\n"
        "Params stored count shared bases once, V nonzeros and their bitmask (as parameter-equivalents "
        "at float32). Weights on disk: `model.safetensors`, float32, against the dense model saved with "
        "`save_pretrained` (tied embeddings once). Compress time and peak RSS: one process that loads the "
        "model, captures calibration inputs and compresses (evaluation excluded).\n")
    print(md)


if __name__ == "__main__":
    main()
