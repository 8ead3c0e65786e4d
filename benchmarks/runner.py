"""Shared by the LLM benchmarks: one run (load, compress, evaluate) in its own subprocess.

A run is "MODEL:METHOD:RATIO" (ratio 0 = the dense model). Each run is a fresh process, so
its peak RSS (ru_maxrss: model load, calibration capture and compression; evaluation
excluded) is its own. Results accumulate in a JSON file keyed by (model, method, ratio).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = "austen:sensesensibility"  # calibration
TEST = "austen:northangerabbey"  # reported numbers (defaults were chosen on austen:mansfieldpark)
RESULTS = ROOT / "docs" / "llm_runs.json"  # every run of fips_llm.py and compare_llm.py


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(model_name: str, method: str, ratio: float, seqlen: int, overrides: dict) -> dict:
    import torch

    import layershare
    from layershare.data import read_text, tokenize

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = layershare.load_model(model_name)
    row: dict = {"model": model_name, "method": "dense" if ratio == 0 else method, "ratio_target": ratio}
    with tempfile.TemporaryDirectory() as tmp:
        if ratio == 0:
            # the same writer as the compressed models (GGUF-loaded models refuse save_pretrained)
            from safetensors.torch import save_file

            from layershare.io import _state_dict_unique

            save_file(_state_dict_unique(model, torch.float32), str(Path(tmp) / "dense.safetensors"))
            row["bytes_on_disk"] = (Path(tmp) / "dense.safetensors").stat().st_size
            row["stored_params"] = sum(p.numel() for p in model.parameters())
            row["seconds"] = 0.0
            row["peak_rss_mb"] = peak_rss_mb()
        else:
            recipe = layershare.Recipe(method=method, ratio=ratio, **overrides)
            row["recipe"] = recipe.to_dict()
            t0 = time.time()
            result = layershare.compress(model, recipe, data=CALIB, tokenizer=tok, output_dir=Path(tmp) / "c")
            row["seconds"] = time.time() - t0
            row["peak_rss_mb"] = peak_rss_mb()
            row["stored_params"] = result.sizes.param_equivalents
            row["ratio_measured"] = result.sizes.ratio
            row["bytes_on_disk"] = (Path(tmp) / "c" / "model.safetensors").stat().st_size
            row["group_errors"] = [(g.stats.rel_err_before, g.stats.rel_err_after) for g in result.report.groups]
            row["extra"] = result.report.extra  # what whole-model methods report (ffn-merge: its window)
            model = layershare.load(Path(tmp) / "c")  # evaluate what was saved, not what is in memory
            for m in model.modules():  # sparse V to dense for the evaluation's speed (same function; tests check)
                if hasattr(m, "unpack"):
                    m.unpack()
    ppl = layershare.evaluate_perplexity(model, tok, tokenize(tok, read_text(TEST)), seqlen=seqlen)
    row["ppl"], row["protocol"] = ppl.ppl, ppl.protocol
    return row


def parse_run(run: str) -> tuple[str, str, float]:
    model, method, ratio = run.split(":")
    return model, method, float(ratio)


def run_all(runs: list[str], json_path: Path, seqlen: int, overrides: dict) -> tuple[list[dict], list[str]]:
    """Run each in its own process; returns every row in the results file and the runs whose
    budget cannot be reached (with the library's message)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    key = lambda r: (r["model"], r["method"], r["ratio_target"])  # noqa: E731
    infeasible = []
    for run in runs:
        print(f"== {run}", flush=True)
        proc = subprocess.run([sys.executable, __file__, run, str(seqlen), json.dumps(overrides)],
                              stdout=subprocess.PIPE, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        refused = [line[11:] for line in proc.stdout.splitlines() if line.startswith("INFEASIBLE ")]
        if refused:
            print(f"   infeasible: {refused[-1]}", flush=True)
            infeasible.append(f"{run}: {refused[-1]}")
            continue
        if proc.returncode != 0 or not found:
            print(f"   failed (exit {proc.returncode})", flush=True)
            continue
        row = json.loads(found[-1][4:])
        rows = [r for r in rows if key(r) != key(row)] + [row]
        rows.sort(key=lambda r: (r["model"], r["ratio_target"], r["method"]))
        json_path.write_text(json.dumps(rows, indent=2))
        print(f"   ppl {row['ppl']:.3f}  compress {row['seconds']:.0f} s  peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
    return rows, infeasible


def markdown_table(rows: list[dict]) -> str:
    dense = {r["model"]: r for r in rows if r["ratio_target"] == 0}
    lines = ["| model | method | target | params stored | measured ratio | weights on disk | disk vs dense | "
             "ppl (test) | ppl vs dense | compress time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense.get(r["model"])
        other = d is not None and r is not d
        target = "-" if r["ratio_target"] == 0 else f"{r['ratio_target']:.0%}"
        measured = f"{r['ratio_measured']:.2%}" if "ratio_measured" in r else "-"
        disk = f"{1 - r['bytes_on_disk'] / d['bytes_on_disk']:.1%} smaller" if other else "-"
        rel = f"+{r['ppl'] / d['ppl'] - 1:.1%}" if other else "-"
        lines.append(f"| {r['model']} | {r['method']} | {target} | {r['stored_params'] / 1e6:,.2f} M | {measured} | "
                     f"{r['bytes_on_disk'] / 2**20:,.1f} MiB | {disk} | {r['ppl']:.2f} | {rel} | "
                     f"{r['seconds'] / 60:,.1f} min | {r['peak_rss_mb'] / 1024:,.2f} GiB |")
    return "\n".join(lines)


def protocols(rows: list[dict]) -> str:
    return "\n".join(f"- {p}" for p in sorted({f"{r['model']}: {r['protocol']}" for r in rows}))


if __name__ == "__main__":  # a child: python runner.py MODEL:METHOD:RATIO SEQLEN OVERRIDES_JSON
    from layershare.budget import BudgetError

    m, meth, ratio = parse_run(sys.argv[1])
    try:
        row = run_one(m, meth, ratio, int(sys.argv[2]), json.loads(sys.argv[3]))
    except BudgetError as e:  # raised before any long work
        print(f"INFEASIBLE {e}", flush=True)
        sys.exit(3)
    print("ROW " + json.dumps(row), flush=True)
