"""FiPS on the real causal LMs that ship in registry packages: dense vs 10/20/30% compression.

    python benchmarks/fips_llm.py                                   # all runs below
    python benchmarks/fips_llm.py --runs smollm2-135m:fips:0.2      # one run (results merge)

Calibration: Sense and Sensibility; perplexity on Northanger Abbey, the whole book in
non-overlapping 2048-token windows (defaults were chosen on Mansfield Park). Each run is
its own subprocess (see runner.py); results go to docs/llm_runs.json, shared with
compare_llm.py. Writes docs/fips_llm.md and prints the table.
"""
from __future__ import annotations

import argparse
import json

from runner import CALIB, RESULTS, ROOT, TEST, markdown_table, protocols, run_all

RUNS = ["smollm2-135m:dense:0", "smollm2-135m:fips:0.1", "smollm2-135m:fips:0.2", "smollm2-135m:fips:0.3",
        "gemma3-270m:dense:0", "gemma3-270m:fips:0.2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=RUNS, help="MODEL:METHOD:RATIO (ratio 0 = dense)")
    ap.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    ap.add_argument("--recipe", default="{}", help="JSON of recipe overrides (default: the library defaults)")
    args = ap.parse_args()
    rows, _ = run_all(args.runs, RESULTS, args.seqlen, json.loads(args.recipe))
    rows = [r for r in rows if r["method"] in ("dense", "fips")]
    table = markdown_table(rows)
    (ROOT / "docs" / "fips_llm.md").write_text(
        "# FiPS on real causal LMs (CPU, 2 cores)\n\n"
        f"Produced by `python benchmarks/fips_llm.py`. Calibration: `{CALIB}`, default recipe "
        f"(`layershare.Recipe(ratio=...)`). Perplexity on `{TEST}`:\n\n{protocols(rows)}\n\n{table}\n\n"
        "Params stored: every tensor kept (tied embeddings once, shared bases once), the nonzeros of V and "
        "their bitmask as parameter-equivalents at float32. Weights on disk: `model.safetensors` (float32) "
        "against the dense model written the same way (float32 safetensors, tied embeddings once). "
        "Compress time and peak RSS: one process that "
        "loads the model, captures the calibration inputs and compresses (evaluation excluded). The "
        "compressed numbers are measured on the saved directory reloaded with `layershare.load` (its sparse V "
        "expanded to dense before the evaluation, for speed: the same function, checked in tests/test_io.py).\n")
    print(table)


if __name__ == "__main__":
    main()
