"""Shared by the LLM benchmarks: one run (load, compress, evaluate) in its own subprocess.

A run is "MODEL:METHOD:RATIO" (ratio 0 = the dense model). METHOD may be "MLP+ATTENTION" (e.g.
"fips+masa"): one recipe, the attention method as its attention stage, the whole-model RATIO split
so that both parts lose the same fraction of their parameters (as the Basis Sharing paper
compresses every weight matrix at one ratio). Each run is a fresh process, so
its peak RSS (ru_maxrss: model load, calibration capture and compression; evaluation
excluded) is its own. Results accumulate in a JSON file keyed by (model, method, ratio).
BENCH_THREADS=N sets the torch threads of a run (default: every core); it is meant for runs
side by side, which share the machine: such a row records `shared: true` and the tables mark
its time, which is not a timing. BENCH_DEVICE=cuda compresses and evaluates on the GPU: the row
records the device (`device`) and the GPU's peak memory (`gpu_peak_mb`), and the tables mark it.
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
TEST = "austen:northangerabbey"  # reported numbers
VALID = "austen:mansfieldpark"  # where defaults are chosen (fips_llm.py --validation)
VALID_WINDOWS = 16  # of 2048 tokens: enough to rank variants, cheap enough to run several
RESULTS = ROOT / "docs" / "llm_runs.json"  # every run of fips_llm.py and compare_llm.py
VALID_RESULTS = ROOT / "docs" / "llm_validation.json"  # fips_llm.py --validation: variants tried


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layer_removed(model) -> list[dict]:
    """What FiPS kept, per group and layer type: for every SharedBasisLinear, its group (the
    blocks sharing its basis, in order), its type (the module's name: up_proj, gate_proj, ...),
    and the fraction of its dense d x h weight removed, counting its V's nonzeros and its share
    of the group's basis U (U's d x r entries split over the group's linears in proportion to h)."""
    from layershare.modules.shared_basis import SharedBasisLinear

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, SharedBasisLinear)]
    bases: dict[int, list] = {}
    for n, m in linears:
        bases.setdefault(id(m.basis), []).append((n, m))
    rows = []
    for g, members in enumerate(bases.values()):
        width = sum(m.v_shape[1] for _, m in members)
        U = members[0][1].basis.U.numel()
        for n, m in members:
            r, h = m.v_shape
            dense = m.in_features * m.out_features
            kept = m.nnz() + U * h / width
            rows.append({"group": g, "name": n, "type": n.rsplit(".", 1)[-1], "rank": r,
                         "removed": 1 - kept / dense})
    return rows


def make_recipe(model, method: str, ratio: float, overrides: dict):
    """One stage, or for "MLP+ATTENTION" the attention stage then the MLP stage, the ratio split
    by layershare.compression.budget.split_ratio (the same fraction of each part's weights) or, with
    the override "attention_share", that fraction of the ratio taken from the attention; other
    `overrides` are run fields or fields of the (MLP) stage."""
    import layershare
    from layershare.compression.budget import split_ratio
    from layershare.methods import config_class
    from layershare.recipe import RUN_FIELDS

    if "+" not in method:
        return layershare.Recipe.of(method, ratio=ratio, **overrides)
    mlp_method, attn_method = method.split("+")
    overrides = dict(overrides)
    share = overrides.pop("attention_share", None)  # the attention stage's part of the ratio (default: as split_ratio)
    r_mlp, r_attn = split_ratio(model, ratio) if share is None else (ratio * (1 - share), ratio * share)
    run = {k: v for k, v in overrides.items() if k in RUN_FIELDS}
    stage = {k: v for k, v in overrides.items() if k not in RUN_FIELDS}
    return layershare.Recipe(stages=[config_class(attn_method)(ratio=r_attn, ratio_of="model"),
                                     config_class(mlp_method)(ratio=r_mlp, **stage)], **run)


def run_one(model_name: str, method: str, ratio: float, seqlen: int, overrides: dict,
            eval_text: str = TEST, max_windows: int | None = None, test_too: bool = False) -> dict:
    import torch

    import layershare
    from layershare.data.text import read_text, tokenize

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    device = os.environ.get("BENCH_DEVICE", "cpu")
    model, tok = layershare.load_model(model_name)
    row: dict = {"model": model_name, "method": "dense" if ratio == 0 else method, "ratio_target": ratio,
                 "threads": torch.get_num_threads(), "shared": "BENCH_THREADS" in os.environ}
    if device != "cpu":
        row["device"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    with tempfile.TemporaryDirectory() as tmp:
        if ratio == 0:
            # the same writer as the compressed models (GGUF-loaded models refuse save_pretrained)
            from safetensors.torch import save_file

            from layershare.checkpoint.save import state_dict_unique

            save_file(state_dict_unique(model, torch.float32), str(Path(tmp) / "dense.safetensors"))
            row["bytes_on_disk"] = (Path(tmp) / "dense.safetensors").stat().st_size
            row["stored_params"] = sum(p.numel() for p in model.parameters())
            row["seconds"] = 0.0
            row["peak_rss_mb"] = peak_rss_mb()
        else:
            recipe = make_recipe(model, method, ratio, {"device": device, **overrides})
            row["recipe"] = recipe.to_dict()
            t0 = time.time()
            # a row for every feasible plan, its ratio as measured (ffn-merge removes whole MLPs)
            result = layershare.compress(model, recipe, data=CALIB, tokenizer=tok, output_dir=Path(tmp) / "c",
                                         allow_ratio_miss=True)
            row["seconds"] = time.time() - t0
            missed = json.loads((Path(tmp) / "c" / "layershare.json").read_text()).get("ratio_missed")
            if missed:
                row["ratio_missed"] = missed
            row["peak_rss_mb"] = peak_rss_mb()
            row["stored_params"] = result.sizes.param_equivalents
            row["ratio_measured"] = result.sizes.ratio
            row["bytes_on_disk"] = (Path(tmp) / "c" / "model.safetensors").stat().st_size
            row["group_errors"] = [(g.stats.rel_err_before, g.stats.rel_err_after) for g in result.report.groups]
            row["groups_kept_init"] = [i for i, g in enumerate(result.report.groups) if g.stats.kept_init]
            row["group_removed"] = [1 - g.stored / g.dense for g in result.plan.groups]  # the split of the budget
            row["layer_removed"] = layer_removed(result.model)  # empty unless the model holds shared bases
            row["extra"] = result.report.extra  # what whole-model methods report (ffn-merge: its window)
            # evaluate what was saved, not what is in memory, in the default run-time form (tests check
            # that every form computes the same function)
            model = layershare.load(Path(tmp) / "c", device=device)
    model.to(device)
    ppl = layershare.evaluate_perplexity(model, tok, tokenize(tok, read_text(eval_text)), seqlen=seqlen,
                                         max_windows=max_windows)
    if device.startswith("cuda"):
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    row["ppl"], row["protocol"] = ppl.ppl, ppl.protocol
    if test_too:  # a validation run that also measures the test book (one compression serves both)
        ppl = layershare.evaluate_perplexity(model, tok, tokenize(tok, read_text(TEST)), seqlen=seqlen)
        row["ppl_test"], row["protocol_test"] = ppl.ppl, ppl.protocol
    return row


def parse_run(run: str) -> tuple[str, str, float]:
    model, method, ratio = run.split(":")
    return model, method, float(ratio)


def run_child(argv: list[str]) -> tuple[dict | None, str | None, int]:
    """`python *argv` in its own process (its own peak RSS): the row it printed ("ROW {json}"),
    the library's refusal ("INFEASIBLE message") and its exit code."""
    proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.splitlines()
    for line in lines:  # what the library printed (stage messages) goes on to the log
        if not line.startswith(("ROW ", "INFEASIBLE ")):
            print(line, file=sys.stderr, flush=True)
    found = [line[4:] for line in lines if line.startswith("ROW ")]
    refused = [line[11:] for line in lines if line.startswith("INFEASIBLE ")]
    row = json.loads(found[-1]) if found and proc.returncode == 0 else None
    return row, (refused[-1] if refused else None), proc.returncode


def merge_row(json_path: Path, row: dict, key, sort_key=None) -> list[dict]:
    """Put `row` into the results file in place of the row with its key; re-read just before
    writing, so that runs beside this one do not lose theirs."""
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    rows = [r for r in rows if key(r) != key(row)] + [row]
    if sort_key is not None:
        rows.sort(key=sort_key)
    json_path.write_text(json.dumps(rows, indent=2))
    return rows


def run_key(r: dict) -> tuple:
    """What identifies a row of a results file: model, method, ratio and the variant's label."""
    return r["model"], r["method"], r["ratio_target"], r.get("label")


def run_order(r: dict) -> tuple:
    """The order of a results file's rows."""
    return r["model"], r["ratio_target"], r["method"]


def run_all(runs: list[str], json_path: Path, seqlen: int, overrides: dict, eval_text: str = TEST,
            max_windows: int | None = None, label: str | None = None, test_too: bool = False
            ) -> tuple[list[dict], list[str]]:
    """Run each in its own process; returns every row in the results file and the runs whose
    budget cannot be reached (with the library's message). Rows are keyed by model, method,
    ratio (and `label`, naming a variant, where one is given)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    spec = {"seqlen": seqlen, "overrides": overrides, "eval_text": eval_text, "max_windows": max_windows,
            "test_too": test_too}
    infeasible = []
    for run in runs:
        print(f"== {run}", flush=True)
        row, refused, code = run_child([__file__, run, json.dumps(spec)])
        if refused:
            print(f"   infeasible: {refused}", flush=True)
            infeasible.append(f"{run}: {refused}")
            continue
        if row is None:
            print(f"   failed (exit {code})", flush=True)
            continue
        if label is not None:
            row["label"] = label
        rows = merge_row(json_path, row, run_key, sort_key=run_order)
        print(f"   ppl {row['ppl']:.3f}  compress {row['seconds']:.0f} s  peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
    return rows, infeasible


def method_label(r: dict) -> str:
    """The method, and for FiPS rows made with a non-default init or pruning score, which (rows
    from before those options existed used the paper's: SVD init, magnitude pruning)."""
    if r["method"] != "fips":
        return r["method"]
    recipe = r.get("recipe", {})
    recipe = recipe["stages"][-1] if "stages" in recipe else recipe  # version-2 recipes: FiPS is the last stage
    notes = [n for n, old in (("svd init", recipe.get("init", "svd") == "svd"),
                              ("magnitude pruning", recipe.get("prune_score", "magnitude") == "magnitude")) if old]
    return "fips" + (f" ({', '.join(notes)})" if notes else "")


def markdown_table(rows: list[dict], label: bool = False) -> str:
    """One row per run; `label` adds a column naming the variant (validation tables)."""
    dense = {r["model"]: r for r in rows if r["ratio_target"] == 0}
    lines = ["| model | method |" + (" variant |" if label else "") + " target | params stored | measured ratio | "
             "weights on disk | disk vs dense | " + ("ppl (validation)" if label else "ppl (test)") + " | ppl vs dense | "
             "compress time | peak RSS |" + (" ppl (test) |" if label else ""),
             "|---|---|" + ("---|" if label else "") + "---|---|---|---|---|---|---|---|---|" + ("---|" if label else "")]
    for r in rows:
        d = dense.get(r["model"])
        other = d is not None and r is not d
        target = "-" if r["ratio_target"] == 0 else f"{r['ratio_target']:.0%}"
        measured = f"{r['ratio_measured']:.2%}" if "ratio_measured" in r else "-"
        disk = f"{1 - r['bytes_on_disk'] / d['bytes_on_disk']:.1%} smaller" if other else "-"
        rel = f"+{r['ppl'] / d['ppl'] - 1:.1%}" if other else "-"
        variant = f" {r.get('label', '')} |" if label else ""
        method = method_label(r)
        lines.append(f"| {r['model']} | {method} |{variant} {target} | {r['stored_params'] / 1e6:,.2f} M | {measured} | "
                     f"{r['bytes_on_disk'] / 2**20:,.1f} MiB | {disk} | {r['ppl']:.2f} | {rel} | "
                     f"{r['seconds'] / 60:,.1f} min{' *' if r.get('shared') else ''}{' †' if r.get('device') else ''} | "
                     f"{r['peak_rss_mb'] / 1024:,.2f} GiB |"
                     + (f" {r['ppl_test']:.2f} |" if "ppl_test" in r else " - |" if label else ""))
    if any(r.get("shared") for r in rows):
        lines.append("\n\\* run beside another run (BENCH_THREADS on the CPU; on a GPU, other benchmark processes on the same device): its time is not a timing.")
    gpus = sorted({r["device"] for r in rows if r.get("device")})
    if gpus:
        lines.append(f"\n† compressed and evaluated on a GPU ({', '.join(gpus)}; BENCH_DEVICE): its time is a GPU time, "
                     "not comparable with the CPU rows'; peak RSS is host memory.")
    return "\n".join(lines)


def protocols(rows: list[dict]) -> str:
    return "\n".join(f"- {p}" for p in sorted({f"{r['model']}: {r['protocol']}" for r in rows}))


if __name__ == "__main__":  # a child: python runner.py MODEL:METHOD:RATIO SPEC_JSON (see run_all)
    from layershare.compression.budget import BudgetError

    m, meth, ratio = parse_run(sys.argv[1])
    try:
        row = run_one(m, meth, ratio, **json.loads(sys.argv[2]))
    except BudgetError as e:  # raised before any long work
        print(f"INFEASIBLE {e}", flush=True)
        sys.exit(3)
    print("ROW " + json.dumps(row), flush=True)
