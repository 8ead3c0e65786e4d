"""FiPS on the real causal LMs that ship in registry packages: dense vs 10/20/30% compression.

    python benchmarks/fips_llm.py                                   # all runs below
    python benchmarks/fips_llm.py --runs smollm2-135m:fips:0.2      # one run (results merge)
    python benchmarks/fips_llm.py --validation --label s0.25 --recipe '{"sparsity": 0.25}' \
        --runs gemma3-270m:fips:0.2                                 # a variant, on the validation book
    python benchmarks/fips_llm.py --promote "LABEL"                 # its --test-too rows become the test rows

Calibration: Sense and Sensibility; perplexity on Northanger Abbey, the whole book in
non-overlapping 2048-token windows. Defaults are chosen with --validation: the first 16
windows of Mansfield Park, results in docs/llm_validation.json (docs/llm_validation.md), one
row per model, method, ratio and --label. Each run is its own subprocess (see runner.py);
results go to docs/llm_runs.json, shared with compare_llm.py. Writes docs/fips_llm.md and
prints the table.
"""
from __future__ import annotations

import argparse
import json

from runner import (
    CALIB,
    RESULTS,
    ROOT,
    TEST,
    VALID,
    VALID_RESULTS,
    VALID_WINDOWS,
    markdown_table,
    merge_row,
    protocols,
    run_all,
    run_key,
    run_order,
)

RUNS = ["smollm2-135m:dense:0", "smollm2-135m:fips:0.1", "smollm2-135m:fips:0.2", "smollm2-135m:fips:0.3",
        "gemma3-270m:dense:0", "gemma3-270m:fips:0.2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=RUNS, help="MODEL:METHOD:RATIO (ratio 0 = dense)")
    ap.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    ap.add_argument("--recipe", default="{}", help="JSON of recipe overrides (default: the library defaults)")
    ap.add_argument("--validation", action="store_true",
                    help=f"evaluate on {VALID} ({VALID_WINDOWS} windows), results apart: for choosing defaults")
    ap.add_argument("--label", default=None, help="names the variant (with --validation)")
    ap.add_argument("--test-too", action="store_true",
                    help="with --validation: also measure the test book on the same compressed model (recorded "
                         "as ppl_test; the choice between variants is made on the validation numbers)")
    ap.add_argument("--render", action="store_true", help="with --validation: only rewrite the table from the JSON "
                                                               "(rows run elsewhere, e.g. on a GPU machine)")
    ap.add_argument("--promote", metavar="LABEL",
                    help="copy the validation rows with this label that measured the test book (--test-too) into "
                         f"{RESULTS.name} as the test rows of their model, method and ratio (ppl = the test book's, "
                         "val_ppl = the validation book's: one compression for both), then rewrite the table")
    args = ap.parse_args()
    if args.promote:
        promote(args.promote)
        args.runs = []
    if args.validation:
        if args.render:
            rows = json.loads(VALID_RESULTS.read_text())
        else:
            rows, _ = run_all(args.runs, VALID_RESULTS, args.seqlen, json.loads(args.recipe), eval_text=VALID,
                              max_windows=VALID_WINDOWS, label=args.label or "default", test_too=args.test_too)
        table = markdown_table(rows, label=True)
        (ROOT / "docs" / "llm_validation.md").write_text(
            "# Choosing defaults: variants on the validation book\n\n"
            f"Produced by `python benchmarks/fips_llm.py --validation`. Calibration `{CALIB}`; perplexity on "
            f"the first {VALID_WINDOWS} windows of `{VALID}`; variants are chosen on it, never on the test book. "
            f"Runs made with --test-too also measured `{TEST}` on the same compressed model (last column). The "
            f"label names the variant; its recipe overrides are in docs/llm_validation.json. These runs are "
            "for choosing, not timing: several ran side by side at one thread each (BENCH_THREADS=1), so their "
            "compress times are not comparable with docs/fips_llm.md.\n\n"
            f"{protocols(rows)}\n\n{table}\n")
        print(table)
        return
    rows, _ = run_all(args.runs, RESULTS, args.seqlen, json.loads(args.recipe)) if args.runs else (
        json.loads(RESULTS.read_text()), None)
    rows = [r for r in rows if r["method"] in ("dense", "fips")]
    table = markdown_table(rows)
    (ROOT / "docs" / "fips_llm.md").write_text(
        "# FiPS on real causal LMs (CPU, 2 cores)\n\n"
        f"Produced by `python benchmarks/fips_llm.py`. Calibration: `{CALIB}`, default recipe "
        f"(`layershare.FiPSConfig(ratio=...)`; rows marked \"svd init\" ran before the default init became "
        f"\"whitened\", rows marked \"magnitude pruning\" before the default pruning score became \"activation\"). Perplexity on `{TEST}`:\n\n{protocols(rows)}\n\n{table}\n\n"
        "Params stored: every tensor kept (tied embeddings once, shared bases once), the nonzeros of V and "
        "their bitmask as parameter-equivalents at float32. Weights on disk: `model.safetensors` (float32) "
        "against the dense model written the same way (float32 safetensors, tied embeddings once). "
        "Compress time and peak RSS: one process that "
        "loads the model, captures the calibration inputs and compresses (evaluation excluded). The "
        "compressed numbers are measured on the saved directory reloaded with `layershare.load` (its sparse V "
        "expanded to dense before the evaluation, for speed: the same function, checked in tests/test_io.py).\n")
    print(table)


def promote(label: str) -> None:
    rows = [r for r in json.loads(VALID_RESULTS.read_text()) if r.get("label") == label and r.get("ppl_test")]
    if not rows:
        raise SystemExit(f"no row of {VALID_RESULTS.name} labelled {label!r} measured the test book (--test-too)")
    for r in rows:
        drop = ("label", "ppl", "protocol", "ppl_test", "protocol_test", "layer_removed")  # (the last stays there)
        row = {k: v for k, v in r.items() if k not in drop}
        row.update(val_ppl=r["ppl"], val_protocol=r["protocol"], ppl=r["ppl_test"], protocol=r["protocol_test"],
                   promoted_from=label)
        merge_row(RESULTS, row, run_key, sort_key=run_order)
        print(f"{r['model']} {r['method']} {r['ratio_target']:.0%}: test {r['ppl_test']:.2f} (validation "
              f"{r['ppl']:.2f}) from {label!r}")


if __name__ == "__main__":
    main()
