"""Held-out zero-shot task accuracy (and perplexity) of SmolLM2-135M, dense and compressed.

    BENCH_THREADS=2 python benchmarks/tasks_llm.py                  # every row, every example
    python benchmarks/tasks_llm.py --rows dense svd-llm --limit 20  # a subset
    python benchmarks/tasks_llm.py --redo                           # rerun rows already done

Rows: dense; FiPS at 20/30/40% with the library's default recipe; Basis Sharing 20% and SVD-LLM
20% (library defaults). Each row runs in its own process: load, compress on Sense and
Sensibility, save under --keep (default out/tasks/ROW; a directory already saved there is
reloaded instead of compressed again, its recipe and compression time read from its
layershare.json), reload from disk, then the local Austen tasks through lm-evaluation-harness
(every example unless --limit) and perplexity on the first 8 windows of 2048 tokens of
Northanger Abbey. Rows merge into docs/tasks_llm.json (a row already there is skipped unless
--redo); writes docs/tasks_llm.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from runner import CALIB, ROOT, TEST, merge_row, peak_rss_mb, run_child

MODEL = "smollm2-135m"
RATIO = 0.2
TASKS = ["austen_lastword", "austen_nextsent"]
SEQLEN, WINDOWS = 2048, 8
ROWS = ["dense", "fips-20", "fips-30", "fips-40", "basis-sharing", "svd-llm"]
JSON, MD = ROOT / "docs" / "tasks_llm.json", ROOT / "docs" / "tasks_llm.md"
DATE = "2026-12-05"


def ratio_of(name: str) -> float:
    return int(name.split("-")[1]) / 100 if name.startswith("fips-") else RATIO


def recipe_for(name: str):
    import layershare

    return layershare.Recipe.of(name.split("-")[0] if name.startswith("fips-") else name, ratio=ratio_of(name))


def run_row(name: str, limit: int | None, keep: Path, dtype: str) -> dict:
    """One row, in this process: compress (unless dense), reload what was saved, evaluate."""
    import torch

    import layershare
    from layershare.evaluate.lm_eval import run_tasks

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    t_row = time.time()
    model, tok = layershare.load_model(MODEL)
    row = {"row": name, "model": MODEL, "method": "dense" if name == "dense" else name.split("-")[0]
           if name.startswith("fips-") else name, "ratio_target": 0.0 if name == "dense" else ratio_of(name),
           "threads": torch.get_num_threads(), "shared": True, "seconds": 0.0}
    if name != "dense":
        out = keep / name
        if not (out / "layershare.json").exists():
            t0 = time.time()
            layershare.compress(model, recipe_for(name), data=CALIB, tokenizer=tok, output_dir=out,
                                allow_ratio_miss=True)
            row["seconds"] = time.time() - t0
        else:
            row["reused"] = str(out)
        meta = json.loads((out / "layershare.json").read_text())
        row["recipe"], row["seconds"] = meta["recipe"], row["seconds"] or meta["seconds"]
        row["ratio_measured"] = meta["sizes"]["ratio"]
        row["stored_params"] = meta["sizes"]["param_equivalents"]
        del model
        model = layershare.load(out, dtype=getattr(torch, dtype))  # evaluate what was saved
    else:
        row["stored_params"] = sum(p.numel() for p in model.parameters())
        model = model.to(getattr(torch, dtype))
    row["eval_dtype"] = dtype
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
    counts = sorted({v["n"] for r in rows for v in r["tasks"].values()})
    protocols = sorted({r["protocol"] for r in rows})
    missing = [n for n in ROWS if n not in {r["row"] for r in rows}]
    MD.write_text(
        f"# Held-out zero-shot tasks on SmolLM2-135M{' (PARTIAL)' if partial else ''}\n\n"
        "Produced by `BENCH_THREADS=2 python benchmarks/tasks_llm.py`; rows in [tasks_llm.json](tasks_llm.json).\n"
        + (f"\n**Partial: rows not run yet: {', '.join(missing)}.**\n" if partial else "") +
        f"\n- model: `{MODEL}` (SmolLM2-135M), compressed by the fraction of its parameters in `target`, calibrated "
        f"on `{CALIB}`; each row compressed, saved and reloaded from disk before evaluation\n"
        "- `austen_lastword` (acc): LAMBADA-style, a 60-150-word passage of *Persuasion* ending on a word of 3+ "
        "letters that already occurs in it; predict that word greedily\n"
        "- `austen_nextsent` (acc_norm): HellaSwag-style, 3 sentences of *Persuasion*, pick the true next "
        "sentence among 4 (3 from elsewhere in the book, similar length)\n"
        f"- examples per task: {', '.join(map(str, counts))} (lm-evaluation-harness, zero-shot, seed 1234); ± is "
        "lm-eval's standard error\n"
        f"- evaluated in {', '.join(sorted({r.get('eval_dtype', 'float32') for r in rows}))} (each model loaded "
        "so; compression runs in float32 and saves float32)\n"
        f"- ppl: the first {WINDOWS} windows of {SEQLEN} tokens of `{TEST}` ({'; '.join(protocols)})\n"
        "- every row the library's default recipe for its method (FiPS: 400 tuning steps per group; 64 "
        "calibration windows of 512 tokens), the recipe stored with the row\n"
        + "".join(f"- {r['row']}: the directory compressed before with the same recipe was reloaded ({r['reused']}); its "
                  "compress time is that compression's\n" for r in rows if r.get("reused")) +
        f"- CPU, 2 threads, shared machine (\\* times are not timings); {DATE}\n\n"
        f"{table(rows)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="the dtype every model is evaluated in (compression runs in float32)")
    ap.add_argument("--keep", type=Path, default=ROOT / "out" / "tasks", help="where compressed rows are saved")
    ap.add_argument("--redo", action="store_true", help="rerun rows already in the JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one row in this process; the parent reads the ROW line
        print("ROW " + json.dumps(run_row(args.child, args.limit, args.keep, args.dtype)), flush=True)
        return
    done = {r["row"] for r in json.loads(JSON.read_text())} if JSON.exists() else set()
    t0 = time.time()
    for name in args.rows:
        if name in done and not args.redo:
            print(f"== {name}: done, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        row, _, code = run_child([__file__, "--child", name, "--keep", str(args.keep), "--dtype", args.dtype]
                                 + ([] if args.limit is None else ["--limit", str(args.limit)]))
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
