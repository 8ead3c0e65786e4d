"""FiPS against its peers on the same model, calibration text, evaluation text and budget.

    python benchmarks/compare_llm.py                       # every model x method x ratio below
    python benchmarks/compare_llm.py --models smollm2-135m --ratios 0.2

Every method removes the same fraction of the whole model's parameters, with the same
calibration windows (Sense and Sensibility, seed 0) and its library defaults; perplexity on
Northanger Abbey (whole book, 2048-token windows). fips, basis-sharing, svd-llm, svd and
ffn-merge compress the MLPs, masa the attention; "A+B" runs MLP method A with attention method
B as its attention stage (one recipe), both parts losing the same fraction of their weights
("basis-sharing+basis-sharing-attention" is the Basis Sharing paper's whole method). A ratio
beyond what a method's part of the model holds is refused by the library and listed as not run. Results merge into docs/llm_runs.json (shared with
fips_llm.py); writes docs/compare_llm.md and docs/compare_llm.png.
"""
from __future__ import annotations

import argparse

from runner import CALIB, RESULTS, ROOT, TEST, markdown_table, protocols, run_all

METHODS = ["fips", "basis-sharing", "svd-llm", "svd", "ffn-merge", "masa"]
COMBINED = ["fips+basis-sharing-attention", "basis-sharing+basis-sharing-attention", "fips+masa"]
GRID = METHODS + COMBINED  # the default runs, in the plot's colour order
MODELS = ["smollm2-135m", "gemma3-270m"]
RATIOS = [0.1, 0.2, 0.3, 0.4]
PPL_CAP = 1e5  # the plot's top: broken models (plain SVD, MASA post hoc) are marked there with their value
RESULTS_INFEASIBLE = RESULTS.with_name("llm_infeasible.json")  # runs the library refused, with its reason


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        dense = next((r for r in rows if r["model"] == model and r["method"] == "dense"), None)
        for i, method in enumerate(GRID):
            pts = sorted((r["ratio_measured"], r["ppl"]) for r in rows if r["model"] == model and r["method"] == method)
            if not pts:
                continue
            color = f"C{i}"
            shown = [(x, y) for x, y in pts if y <= PPL_CAP]
            ax.plot([100 * x for x, _ in shown], [y for _, y in shown], marker="o", label=method, color=color)
            for x, y in pts:  # off the scale: a triangle at the top edge, with its value
                if y > PPL_CAP:
                    ax.plot(100 * x, PPL_CAP, marker="^", color=color, label=method if not shown else None)
                    ax.annotate(f"{y:.0e}", (100 * x, PPL_CAP), textcoords="offset points", xytext=(4, -10),
                                fontsize=7, color=color)
                    shown = shown or [(x, y)]
        if dense:
            ax.axhline(dense["ppl"], color="gray", ls="--", label="dense")
        ax.set_title(model)
        ax.set_xlabel("parameters removed (% of whole model)")
        ax.set_ylabel(f"perplexity on {TEST}")
        ax.set_yscale("log")
        ax.set_ylim(top=PPL_CAP * 1.5)
        ax.set_xlim(0, 45)
        ax.set_xticks([100 * r for r in RATIOS])
        ax.grid(alpha=0.3)
    legend = {}  # one legend for every panel, beside them (methods keep their colours)
    for ax in axes[0]:
        legend.update(zip(ax.get_legend_handles_labels()[1], ax.get_legend_handles_labels()[0]))
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=5, fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--methods", nargs="*", default=GRID)
    ap.add_argument("--ratios", nargs="*", type=float, default=RATIOS)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--skip-done", action="store_true", help="do not rerun runs already in the results file")
    args = ap.parse_args()
    import json

    done = {(r["model"], r["method"], r["ratio_target"]) for r in json.loads(RESULTS.read_text())} \
        if args.skip_done and RESULTS.exists() else set()
    known = json.loads(RESULTS_INFEASIBLE.read_text()) if RESULTS_INFEASIBLE.exists() else []
    refused_before = {k.split(": ")[0] for k in known}
    runs = []
    for model in args.models:
        if (model, "dense", 0.0) not in done:
            runs.append(f"{model}:dense:0")
        for ratio in args.ratios:
            runs += [f"{model}:{m}:{ratio}" for m in args.methods
                     if (model, m, ratio) not in done and f"{model}:{m}:{ratio}" not in refused_before]
    rows, refused = run_all(runs, RESULTS, args.seqlen, {})
    known = sorted(set(known) | set(refused))
    RESULTS_INFEASIBLE.write_text(json.dumps(known, indent=2))
    table = markdown_table(rows)
    plot(rows, ROOT / "docs" / "compare_llm.png")
    note = ("\n\nNot run: the budget is out of the method's range (the library's message, raised before any "
            "work):\n" + "\n".join(f"- {k}" for k in known)) if known else ""
    (ROOT / "docs" / "compare_llm.md").write_text(
        "# FiPS and its peers on real causal LMs (CPU, 2 cores; rows marked † on a GPU)\n\n"
        f"Produced by `python benchmarks/compare_llm.py`. Every method removes the same fraction of the "
        f"whole model's parameters (masa from the attention, 'A+B' from both, the same fraction of each, "
        f"the others from the MLPs) with its library defaults, calibrated on the same windows of `{CALIB}`; "
        f"perplexity on `{TEST}`:\n\n{protocols(rows)}\n\n{table}{note}\n\n![perplexity vs compression](compare_llm.png)\n\n"
        f"Perplexities above {PPL_CAP:.0e} are drawn as triangles at the top edge, labelled with their value.\n")
    print(table)


if __name__ == "__main__":
    main()
