"""Held-out zero-shot task accuracy (and perplexity) of SmolLM2-135M, dense and compressed 20%.

    BENCH_THREADS=2 python benchmarks/tasks_llm.py                  # every row, limit 100
    python benchmarks/tasks_llm.py --rows dense svd-llm --limit 20  # a subset
    python benchmarks/tasks_llm.py --redo                           # rerun rows already done

Rows: dense; FiPS 20% with the `quick` preset (one-shot: whitened init, activation pruning, no
tuning steps, 16 calibration windows; the full FiPS recipe takes 20-40 min here, too long for
this table); Basis Sharing 20% and SVD-LLM 20% (library defaults). Each row runs in its own
process: load, compress on Sense and Sensibility, save, reload from disk, then the local Austen
tasks through lm-evaluation-harness (first LIMIT examples each) and perplexity on the first 8
windows of 2048 tokens of Northanger Abbey. Rows merge into docs/tasks_llm.json (a row already
there is skipped unless --redo); writes docs/tasks_llm.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from runner import CALIB, ROOT, TEST, merge_row, peak_rss_mb, run_child

MODEL = "smollm2-135m"
RATIO = 0.2
TASKS = ["austen_lastword", "austen_nextsent"]
SEQLEN, WINDOWS = 2048, 8
ROWS = ["dense", "fips-quick", "basis-sharing", "svd-llm"]
JSON, MD = ROOT / "docs" / "tasks_llm.json", ROOT / "docs" / "tasks_llm.md"
DATE = "2026-11-27"


def recipe_for(name: str):
    import layershare
    from layershare.recipe import PRESETS

    if name == "fips-quick":
        recipe = PRESETS["quick"]()
        recipe.stages[-1].ratio = RATIO
        return recipe
    return layershare.Recipe.of(name, ratio=RATIO)


def run_row(name: str, limit: int) -> dict:
    """One row, in this process: compress (unless dense), reload what was saved, evaluate."""
    import torch

    import layershare
    from layershare.evaluate.lm_eval import run_tasks

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    t_row = time.time()
    model, tok = layershare.load_model(MODEL)
    row = {"row": name, "model": MODEL, "method": "dense" if name == "dense" else name.replace("-quick", ""),
           "ratio_target": 0.0 if name == "dense" else RATIO, "threads": torch.get_num_threads(),
           "shared": True, "seconds": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        if name != "dense":
            recipe = recipe_for(name)
            row["recipe"] = recipe.to_dict()
            t0 = time.time()
            result = layershare.compress(model, recipe, data=CALIB, tokenizer=tok, output_dir=Path(tmp) / "c",
                                         allow_ratio_miss=True)
            row["seconds"] = time.time() - t0
            row["ratio_measured"] = result.sizes.ratio
            row["stored_params"] = result.sizes.param_equivalents
            model = layershare.load(Path(tmp) / "c")  # evaluate what was saved
        else:
            row["stored_params"] = sum(p.numel() for p in model.parameters())
    row["peak_rss_mb"] = peak_rss_mb()
    model.eval()
    t0 = time.time()
    row["tasks"] = {r.task: {"metric": r.metric, "acc": r.value, "stderr": r.stderr, "n": r.n}
                    for r in run_tasks(model, tok, TASKS, limit=limit)}
    row["limit"] = limit
    row["tasks_seconds"] = time.time() - t0
    ppl = layershare.evaluate_perplexity(model, tok, TEST, seqlen=SEQLEN, max_windows=WINDOWS)
    row["ppl"], row["protocol"] = ppl.ppl, ppl.protocol
    row["row_seconds"] = time.time() - t_row
    return row


def table(rows: list[dict]) -> str:
    head = ("| row | method | target | measured ratio | " + " | ".join(f"{t} ({m})" for t, m in
            [(t, next((r["tasks"][t]["metric"] for r in rows if t in r["tasks"]), "?")) for t in TASKS])
            + " | ppl | compress time |")
    lines = [head, "|" + "---|" * (6 + len(TASKS))]
    for r in sorted(rows, key=lambda r: ROWS.index(r["row"]) if r["row"] in ROWS else 99):
        accs = " | ".join(f"{100 * r['tasks'][t]['acc']:.1f} ± {100 * r['tasks'][t]['stderr']:.1f} "
                          f"(n={r['tasks'][t]['n']})" for t in TASKS)
        target = "-" if r["ratio_target"] == 0 else f"{r['ratio_target']:.0%}"
        measured = f"{r['ratio_measured']:.2%}" if "ratio_measured" in r else "-"
        lines.append(f"| {r['row']} | {r['method']} | {target} | {measured} | {accs} | {r['ppl']:.2f} | "
                     f"{r['seconds'] / 60:.1f} min * |")
    return "\n".join(lines)


def write_md(rows: list[dict], partial: bool) -> None:
    limits = sorted({r["limit"] for r in rows})
    protocols = sorted({r["protocol"] for r in rows})
    missing = [n for n in ROWS if n not in {r["row"] for r in rows}]
    MD.write_text(
        f"# Held-out zero-shot tasks on SmolLM2-135M{' (PARTIAL)' if partial else ''}\n\n"
        "Produced by `BENCH_THREADS=2 python benchmarks/tasks_llm.py`; rows in [tasks_llm.json](tasks_llm.json).\n"
        + (f"\n**Partial: rows not run yet: {', '.join(missing)}.**\n" if partial else "") +
        f"\n- model: `{MODEL}` (SmolLM2-135M), compressed {RATIO:.0%} of its parameters, calibrated on `{CALIB}`; "
        "each row compressed, saved and reloaded from disk before evaluation\n"
        "- `austen_lastword` (acc): LAMBADA-style, a 60-150-word passage of *Persuasion* ending on a word of 3+ "
        "letters that already occurs in it; predict that word greedily\n"
        "- `austen_nextsent` (acc_norm): HellaSwag-style, 3 sentences of *Persuasion*, pick the true next "
        "sentence among 4 (3 from elsewhere in the book, similar length)\n"
        f"- limit: the first {', '.join(map(str, limits))} examples of each task (lm-evaluation-harness, zero-shot, "
        "seed 1234); ± is lm-eval's standard error\n"
        f"- ppl: the first {WINDOWS} windows of {SEQLEN} tokens of `{TEST}` ({'; '.join(protocols)})\n"
        "- FiPS row: the one-shot `quick` preset (whitened init, activation pruning, no tuning steps, 16 "
        "calibration windows); the full FiPS recipe (200 tuning steps per group) takes ~20-40 min on this CPU, "
        "too long here. Basis Sharing and SVD-LLM: library defaults (64 calibration windows)\n"
        f"- CPU, 2 threads, shared machine (\\* times are not timings); {DATE}\n\n"
        f"{table(rows)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--redo", action="store_true", help="rerun rows already in the JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one row in this process; the parent reads the ROW line
        print("ROW " + json.dumps(run_row(args.child, args.limit)), flush=True)
        return
    done = {r["row"] for r in json.loads(JSON.read_text())} if JSON.exists() else set()
    t0 = time.time()
    for name in args.rows:
        if name in done and not args.redo:
            print(f"== {name}: done, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        row, _, code = run_child([__file__, "--child", name, "--limit", str(args.limit)])
        if row is None:
            print(f"   failed (exit {code})", flush=True)
            continue
        merge_row(JSON, row, key=lambda r: r["row"])
        print(f"   compress {row['seconds']:.0f} s, row {row['row_seconds']:.0f} s, ppl {row['ppl']:.2f}, "
              + ", ".join(f"{t} {v['acc']:.3f}" for t, v in row["tasks"].items()), flush=True)
    rows = json.loads(JSON.read_text()) if JSON.exists() else []
    if rows:
        write_md(rows, partial=not set(ROWS) <= {r["row"] for r in rows})
        print(table(rows))
    print(f"total {time.time() - t0:.0f} s (shared machine)", flush=True)
    sys.exit(0 if set(args.rows) <= {r["row"] for r in rows} else 1)


if __name__ == "__main__":
    main()
