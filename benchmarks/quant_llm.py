"""Quantization composed with sharing on SmolLM2-135M (issue 18): perplexity against bytes.
Other models with --model (Gemma-3-270M's rows: --model gemma3-270m --out docs/quant_llm_gemma3_cpu.json).

    python benchmarks/quant_llm.py --device cuda                  # every row (H100: ~10 min before the
                                                                  # distillation rows were added)
    python benchmarks/quant_llm.py --rows dense rtn-4 --device cpu
    python benchmarks/quant_llm.py --render                       # table and plot from the JSON

Rows: the dense model (bfloat16); round to nearest and GPTQ alone at 2, 3 and 4 bits (GPTQ: the
library's, sequential block by block, quant/sequential.py; damp 0.01, blocksize 128; "-wN": N
calibration windows instead of the library's, "-gN": groups of N weights instead of 128, "-act": act_order (rows
without it run without, the library's default until 2026-12-06), "-aN": GPTAQ's alpha N/100 (GPTQ aimed
at the float model's outputs, QuantConfig.gptaq; rows without it: 0), "-mse" / "-minmax": each group's
range by the MSE search / its min and max, where the library's default ("auto" since 2026-12-05: MSE
under GPTQ, min/max under RTN; min/max before) is not wanted; the table's "grid" column says which ran); FiPS with
quantization-aware tuning (qat: fake-quantized U and V inside the block-wise reconstruction, then
the same grid stored) at 3 and 4 bits, its sharing ratio solved so that its linear weights take as
many bits as GPTQ's at 2 and 3 bits (the paper's pairing: 3-bit FiPS against 2-bit quantization at
one size); Basis Sharing and SVD-LLM with GPTQ at the same pairing ("basis-sharing20-gptq-B",
"svd-llm20-gptq-B": the peer at 20% of the model, as FiPS's fips20 rows, then GPTQ-B); "fips20-ALGO-B": FiPS at the
library's default (20% of the model) then ALGO at B bits ("fips20-qat-B": the FiPS tuning itself
through fake quantization at B bits, then those codes stored, shared bases included). Every row: group size 128,
the library's default grid (a zero point per group; "-sym" rows: absmax, no zero point, the default
before 2026-12-05; the table's "grid" column), storage bfloat16 for what is not quantized (embeddings, norms), calibration Sense and
Sensibility (the library's default windows), perplexity on the whole of Northanger Abbey in
2048-token windows, computed in float32 from the stored values (`--validation N`: also the first N 2048-token windows of Mansfield Park, the
validation book that settings are chosen on, as "val_ppl"; `--shared`: the rows are marked as
measured while the machine ran other work, which slows them). "linear bits" are the bits of the attention and MLP weights (codes, scales,
FiPS's bases, V values and bitmasks, all counted) per dense linear weight, measured on the saved
file's tensors; "file" is the whole weights file. Each row also records its compression time and
peak memory (GPU allocated, or RSS; run one row per process for a per-row RSS peak).

QAT (the paper's baseline is 2-bit QAT of the dense model): "qat-B" is RTN at B bits, then
`layershare.finetune` of the quantized directory, which distils the dense model into it end to end
through fake quantization on the stored grid (quant/qat.py) with FINETUNE (steps x batch windows
of the calibration book); "ROW+ft" is ROW then the same distillation, so FiPS+QAT and QAT alone
get the same end-to-end budget (FiPS also has its block-wise tuning: its compression time says
what that costs). Such rows also record the perplexity before the distillation ("ppl_before").
Results: docs/quant_llm.json (docs/quant_llm_cpu.json for CPU rows), .md, .png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import tempfile
import time
from pathlib import Path

import torch

import layershare
from layershare import Recipe
from layershare.methods import BasisSharingConfig, FiPSConfig, QuantConfig, SVDLLMConfig

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "quant_llm.json"
OUT_CPU = ROOT / "docs" / "quant_llm_cpu.json"  # rows run on the 2-core CPU (--device cpu --out ...)
OUT_GEMMA = ROOT / "docs" / "quant_llm_gemma3_cpu.json"  # Gemma-3-270M's rows (--model gemma3-270m --out ...)
CALIB, VALID, TEST = "austen:sensesensibility", "austen:mansfieldpark", "austen:northangerabbey"
GROUP = 128
PAIRS = {"fips-qat3@2": ("fips", 3, 2, "unstructured"), "fips-dense-v-qat3@2": ("fips", 3, 2, "none"),
         "fips-qat4@3": ("fips", 4, 3, "unstructured"), "basis-sharing-gptq3@2": ("basis-sharing", 3, 2, None),
         "svd-llm-gptq3@2": ("svd-llm", 3, 2, None)}
# rows ending in "+ft" are then distilled end to end through fake quantization (layershare.finetune of a
# quantized model, quant/qat.py) with FINETUNE; "qat-B" is RTN-B distilled that way: QAT of the dense model alone
FINETUNE = {"steps": 40, "batch_size": 4, "seqlen": 512, "lr": 1e-3}  # at 1e-4 a 2-bit model did not move in 10 steps
# the paper's comparison first (a GPU lease may end before the last rows)
ROWS = ["dense", "gptq-2", "gptq-3", "fips-qat3@2", "fips-qat4@3", "rtn-2", "rtn-3", "rtn-4", "gptq-4",
        "basis-sharing-gptq3@2", "svd-llm-gptq3@2", "fips-dense-v-qat3@2", "qat-2", "fips-qat3@2+ft", "qat-3",
        "fips-qat4@3+ft", "gptq-3-w16", "gptq-3-act", "gptq-4-act", "fips20-gptq-4", "fips20-rtn-4", "fips20-gptq-3", "fips20-qat-4", "fips20-qat-3",
        "basis-sharing20-gptq-3", "svd-llm20-gptq-3"]
# "-mse" / "-minmax": each group's range chosen by the MSE search (QuantConfig.observer="mse") / its min and max
ROWS += [r + "-mse" for r in ("rtn-3", "rtn-4", "gptq-2", "gptq-3", "gptq-4", "gptq-4-act", "fips20-gptq-4",
                              "fips20-gptq-3", "fips20-rtn-4", "gptq-3-w16", "gptq-4-g64", "fips20-gptq-4-g64",
                              "fips20-gptq-4-act", "gptq-3-act", "fips20-gptq-4-g64-act")]
# "-aN": GPTAQ's alpha N/100 (QuantConfig.gptaq)
ROWS += [f"{r}-act-mse-a{a}" for r in ("gptq-4", "gptq-3", "fips20-gptq-4", "fips20-gptq-3") for a in (25, 100)]
ROWS += [r + "-minmax" for r in ("gptq-3", "gptq-4", "fips20-gptq-4", "fips20-gptq-3", "basis-sharing20-gptq-3",
                                 "svd-llm20-gptq-3")]
# "-sym": the absmax grid without zero points (the library's default before 2026-12-05)
ROWS += [r + "-sym" for r in ("rtn-2", "rtn-3", "rtn-4", "gptq-2", "gptq-3", "gptq-4", "gptq-3-w16", "qat-2",
                              "fips20-gptq-4", "fips20-gptq-3")]
PEERS20 = {"basis-sharing20": BasisSharingConfig, "svd-llm20": SVDLLMConfig}  # "PEER20-ALGO-B": the peer at 20% then ALGO-B


def linear_numel(model) -> tuple[int, int]:
    """(attention + MLP linear weights, of which MLP) of the model's blocks."""
    from layershare.adapters import get_adapter, get_path

    a = get_adapter(model)
    blocks = a.blocks(model)
    mlp = sum(get_path(b, n).weight.numel() for b in blocks for n in a.linears)
    attn = sum(get_path(b, n).weight.numel() for b in blocks for n in a.attention)
    return attn + mlp, mlp


def planned_bits(model, method: str, ratio: float, bits: int, pattern: str | None) -> float:
    """Bits of the linear weights after `method` at `ratio` of the MLPs, then `bits`-bit codes
    (group GROUP, 16-bit scales): the attention's codes, the factors' codes, V's bitmask."""
    total, mlp = linear_numel(model)
    cfg = {"fips": FiPSConfig, "basis-sharing": BasisSharingConfig, "svd-llm": SVDLLMConfig}[method]
    kw = {"pattern": pattern} if pattern else {}
    stage = layershare.plan(model, Recipe(stages=[cfg(ratio=ratio, ratio_of="mlp", **kw)]))[0]
    sparse = method == "fips" and pattern != "none"
    masks = sum(g.v_size for g in stage.plan.groups) if sparse else 0
    values = sum(g.stored for g in stage.plan.groups) - masks / 32  # the plan counts a bitmask at 4 bytes/param
    kept = total - mlp + values
    return kept * (bits + 16 / GROUP) + masks


def solve_ratio(model, method: str, bits: int, target_bits: float, pattern: str | None) -> float:
    """The MLP ratio whose planned bits meet `target_bits` (bisection)."""
    lo, hi = 0.01, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        if planned_bits(model, method, mid, bits, pattern) > target_bits:
            lo = mid
        else:
            hi = mid
    return hi


def recipe_for(row: str, model, device: str, overrides: dict) -> Recipe:
    run = {"dtype": "bfloat16", "device": device,
           **{k: overrides[k] for k in ("nsamples", "seqlen", "seed") if k in overrides}}
    row = row.removesuffix("+ft")
    if row.startswith(("rtn-", "gptq-", "qat-")):
        quant, windows = quant_stage(row)
        return Recipe(stages=[quant], **{**run, **windows})
    if row.startswith("fips20-qat-"):  # the same, tuned through fake quantization on the grid then stored
        bits = int(row.rpartition("-")[2])
        return Recipe(stages=[FiPSConfig(ratio=0.2, qat_bits=bits, qat_group_size=GROUP),
                              QuantConfig(bits=bits, basis_bits=None, group_size=GROUP, algorithm="rtn")], **run)
    if row.startswith("fips20-"):  # FiPS at the library's default (20% of the model), then quantization
        return Recipe(stages=[FiPSConfig(ratio=0.2), quant_stage(row.removeprefix("fips20-"))[0]], **run)
    peer, _, quant = row.partition("-gptq-")
    if peer in PEERS20:  # a peer at its default (20% of the model), then GPTQ
        return Recipe(stages=[PEERS20[peer](ratio=0.2), quant_stage("gptq-" + quant)[0]], **run)
    method, bits, paired, pattern = PAIRS[row]
    total, _ = linear_numel(model)
    target = total * (paired + 16 / GROUP)  # GPTQ alone at `paired` bits
    ratio = solve_ratio(model, method, bits, target, pattern)
    if method == "fips":
        steps = {"steps": overrides["steps"]} if "steps" in overrides else {}
        main = FiPSConfig(ratio=ratio, ratio_of="mlp", pattern=pattern, qat_bits=bits, qat_group_size=GROUP, **steps)
        quant = QuantConfig(bits=bits, basis_bits=None, group_size=GROUP, algorithm="rtn")
    else:  # (planned_bits counts every factor at `bits`)
        main = {"basis-sharing": BasisSharingConfig, "svd-llm": SVDLLMConfig}[method](ratio=ratio, ratio_of="mlp")
        quant = QuantConfig(bits=bits, basis_bits=None, group_size=GROUP, algorithm="gptq")
    return Recipe(stages=[main, quant], **run)


def quant_stage(row: str) -> tuple[QuantConfig, dict]:
    """ALGO-BITS[-wN][-gN][-act][-sym|-asym][-mse|-minmax][-aN] -> the quantization stage and the run's calibration windows (qat-B:
    RTN codes, then the quantization-aware distillation)."""
    algo, bits, *options = row.split("-")
    act = "act" in options
    windows = {"nsamples": int(o[1:]) for o in options if o.startswith("w")}
    group = next((int(o[1:]) for o in options if o.startswith("g") and o[1:].isdigit()), GROUP)
    kind = {"symmetric": o == "sym" for o in options if o in ("sym", "asym")}  # else the library's default
    observer = {"observer": o for o in options if o in ("mse", "minmax")}  # else the library's default
    gptaq = next((int(o[1:]) / 100 for o in options if o.startswith("a") and o[1:].isdigit()), 0.0)
    stage = QuantConfig(bits=int(bits), group_size=group, algorithm="rtn" if algo == "qat" else algo, act_order=act,
                        gptaq=gptaq, **kind, **observer)
    return stage, windows


def linear_bits(folder: Path, dense_linear: int) -> tuple[float, int]:
    """(bits per dense linear weight, bytes of the whole weights) from the saved files' tensors."""
    from layershare.checkpoint.verify import read_headers, weight_files

    header = read_headers(folder, weight_files(folder, str(folder)), str(folder))
    size = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}
    nbytes = {k: size[d] * torch.Size(s).numel() for k, (d, s) in header.items()}
    lin = sum(n for k, n in nbytes.items() if not any(x in k for x in ("embed", "norm", "lm_head")))
    return lin * 8 / dense_linear, sum(nbytes.values())


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(row: str, model_name: str, loaded, device: str, overrides: dict, validation: int = 0,
            shared: bool = False) -> dict:
    import copy

    model, tok = copy.deepcopy(loaded[0]), loaded[1]  # the GGUF is read once for all rows
    total, _ = linear_numel(model)
    out = {"row": row, "model": model_name, "device": torch.cuda.get_device_name(device) if device.startswith("cuda")
           else "cpu", "date": time.strftime("%Y-%m-%d"), **({"shared": True} if shared else {})}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c"
        if row == "dense":
            from safetensors.torch import save_file

            from layershare.checkpoint.save import state_dict_unique

            path.mkdir()
            save_file(state_dict_unique(model, torch.bfloat16), str(path / "model.safetensors"))
            out.update(seconds=0.0, linear_bits=16.0, file_bytes=(path / "model.safetensors").stat().st_size)
            model.to(device)
        else:
            recipe = recipe_for(row, model, device, overrides)
            out["recipe"] = recipe.to_dict()
            t0 = time.time()
            if row.startswith("fips20-"):  # the FiPS stage runs once for every fips20 row (same recipe, same seed)
                model, out["fips_seconds"] = shared_fips(model, recipe, tok)
                recipe = dataclasses.replace(recipe, stages=recipe.stages[1:])
                t0 = time.time() - out["fips_seconds"]  # a row's seconds: the FiPS stage's plus its quantization
            res = layershare.compress(model, recipe, data=CALIB, tokenizer=tok, output_dir=path, allow_ratio_miss=True)
            out["ratio_of_model"] = res.sizes.ratio
            del model, res
            out["seconds"] = time.time() - t0
            if row.endswith("+ft") or row.startswith("qat-"):
                out["finetune"] = finetune(path, loaded, device, overrides)
                out["seconds"] += out["finetune"]["seconds"]  # compression + distillation, not the evaluation between
                path = path.with_name("ft")
            out["peak_mb"] = peak_mb(device)
            out["linear_bits"], out["file_bytes"] = linear_bits(path, total)
            model = layershare.load(path, device=device, dtype=torch.float32)  # stored bf16, fp32 arithmetic
        ppl = layershare.evaluate_perplexity(model, tok, TEST, seqlen=2048, **eval_windows(overrides))
        if validation:
            val = layershare.evaluate_perplexity(model, tok, VALID, seqlen=2048, max_windows=validation)
            out["val_ppl"], out["val_protocol"] = val.ppl, f"{VALID}: {val.protocol}"
    out["ppl"], out["protocol"] = ppl.ppl, ppl.protocol
    return out


_FIPS: dict = {}


def shared_fips(model, recipe: Recipe, tok) -> tuple[object, float]:
    """(a copy of the model after `recipe`'s first stage, that stage's seconds): run once per
    process and stage; the fips20 rows then differ only in their quantization stage."""
    import copy

    key = json.dumps(recipe.to_dict()["stages"][0], sort_keys=True)
    if key not in _FIPS:
        first = dataclasses.replace(recipe, stages=recipe.stages[:1])
        t0 = time.time()
        layershare.compress(model, first, data=CALIB, tokenizer=tok, allow_ratio_miss=True)
        _FIPS[key] = (model, time.time() - t0)
        print(f"FiPS stage: {_FIPS[key][1]:.0f} s", flush=True)
    kept, seconds = _FIPS[key]
    return copy.deepcopy(kept), seconds


def eval_windows(overrides: dict) -> dict:
    """The test book's first N windows only (--set eval_windows, a smoke run), else all of it."""
    return {"max_windows": overrides["eval_windows"]} if "eval_windows" in overrides else {}


def test_ppl(model, tok, overrides: dict) -> float:
    return layershare.evaluate_perplexity(model, tok, TEST, seqlen=2048, **eval_windows(overrides)).ppl


def finetune(path: Path, loaded, device: str, overrides: dict) -> dict:
    """Distil the dense model into the quantized directory `path` through fake quantization
    (FINETUNE, each overridable with --set as ft_KEY); saved beside it as "ft". Returns the settings and losses."""
    import copy

    from layershare.checkpoint.read import read_meta

    ft = {k: overrides.get("ft_" + k, v) for k, v in FINETUNE.items()}
    _, meta = read_meta(path)
    model = layershare.load(path, device=device, runtime="compact", dtype=torch.float32)
    before = test_ppl(model, loaded[1], overrides)  # not timed below
    teacher = copy.deepcopy(loaded[0])
    stats = layershare.finetune(model, teacher, CALIB, loaded[1], steps=ft["steps"], batch_size=ft["batch_size"],
                                lr=ft["lr"], seqlen=ft["seqlen"], output_dir=path.with_name("ft"), meta=meta)
    return {**ft, "data": CALIB, "loss_before": stats.loss_before, "loss_after": stats.loss_after,
            "seconds": stats.seconds, "ppl_before": before}


def table(rows: list[dict]) -> str:
    lines = ["| row | grid | linear bits/weight | file MB | test ppl | validation ppl | compress s | peak MB | device | date |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["linear_bits"], r["row"])):
        val = f"{r['val_ppl']:.2f}" if "val_ppl" in r else "-"
        lines.append(f"| {r['row']} | {grid(r)} | {r['linear_bits']:.3f} | {r['file_bytes'] / 1e6:.1f} | {r['ppl']:.2f} | {val} | "
                     f"{r['seconds']:.0f} | {r.get('peak_mb', 0):.0f} | {r['device']}{' (shared)' if r.get('shared') else ''}"
                     f" | {r['date']} |")
    return "\n".join(lines)


def grid(row: dict) -> str:
    """"zero point" (asymmetric) or "absmax" (symmetric): the grid of the row's quantization stage."""
    quant = [s for s in row.get("recipe", {}).get("stages", []) if s.get("method") == "quant"]
    if not quant:
        return "-"
    stage = quant[-1]
    kind = "absmax" if stage.get("symmetric") else "zero point"
    # the stage's own rule resolves "auto"; rows made before the field ran min/max ranges
    ranges = QuantConfig(algorithm=stage.get("algorithm", "gptq"), observer=stage.get("observer", "minmax")).ranges
    return kind + (", MSE ranges" if ranges == "mse" else "")


def notes(rows: list[dict]) -> str:
    """The distillation settings and the perplexity before it, for the rows that have one."""
    lines = []
    for r in rows:
        f = r.get("finetune")
        if f:
            lines.append(f"- {r['row']}: perplexity {f['ppl_before']:.2f} before the distillation ({f['steps']} steps "
                         f"x {f['batch_size']} windows x {f['seqlen']} tokens of {f['data']}, lr {f['lr']:g}, "
                         f"{f['seconds']:.0f} s; loss {f['loss_before']:.3f} -> {f['loss_after']:.3f})")
    return "\n".join(lines) + ("\n" if lines else "")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # one line per kind of row (the -wN/-act variants of GPTQ are in the table, not on the plot)
    groups = {"quantization alone (RTN)": r"rtn-\d", "quantization alone (GPTQ)": r"gptq-\d",
              "QAT alone (distilled)": r"qat-\d", "FiPS + QAT": r"fips-.*", "FiPS 20% + GPTQ": r"fips20-gptq-\d",
              "FiPS 20% + RTN": r"fips20-rtn-\d",
              "FiPS 20% + QAT": r"fips20-qat-\d", "Basis Sharing + GPTQ": r"basis-sharing.*", "SVD-LLM + GPTQ": r"svd-llm.*"}

    def where(r):
        return "" if r["device"].startswith("NVIDIA") else f" ({r['device'].upper()})"

    # per bit width, the row closest to the library's default: activation order, searched ranges and GPTAQ
    # ("-act-mse-a100") where run, else without GPTAQ ("-act-mse"), else searched ranges ("-mse"), else the plain row;
    # the other variants stay in the table
    present = {r["row"] for r in rows}

    def base(row: str) -> str:  # the row without its "-act" / "-mse" / "-aN" (and "+ft") suffixes
        return re.sub(r"(-act)?(-mse)?(-a\d+)?$", "", row.removesuffix("+ft"))

    def preferred(r) -> bool:
        base_row = base(r["row"])
        if not re.fullmatch(r"(fips20-)?gptq-\d", base_row):
            return r["row"] == base_row
        for suffix in ("-act-mse-a100", "-act-mse", "-mse", ""):
            if base_row + suffix in present:
                return r["row"] == base_row + suffix
        return False

    rows = [r for r in rows if preferred(r) or r["row"].endswith("+ft")]
    for label, pattern in groups.items():
        for ft in (False, True):
            for dev in sorted({where(r) for r in rows}):
                pts = sorted((r["linear_bits"], r["ppl"], r["row"]) for r in rows
                             if re.fullmatch(pattern, base(r["row"]))
                             and r["row"].endswith("+ft") == ft and where(r) == dev)
                if not pts:
                    continue
                name = label + (" + distillation" if ft else "") + dev
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ("s" if dev else "o") + ("-" if len(pts) > 1 else ""),
                        label=name)
                for x, y, row in pts:
                    ax.annotate(row, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    dense = [r for r in rows if r["row"] == "dense"]
    if dense:
        ax.axhline(dense[0]["ppl"], color="gray", ls="--", lw=0.8, label=f"dense bf16 ({dense[0]['ppl']:.1f})")
    ax.set_xlabel("bits per dense linear weight (everything counted)")
    ax.set_ylabel("perplexity, Northanger Abbey (log)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: sharing + quantization vs quantization alone")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    ap.add_argument("--model", default="smollm2-135m", help="alias or .gguf path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(OUT), help="results JSON (rows merge by name)")
    ap.add_argument("--set", default="{}", help='JSON overrides for a smoke run: {"nsamples", "seqlen", "seed", "steps", '
                                                '"eval_windows", "ft_steps", "ft_batch_size", "ft_seqlen", "ft_lr"}')
    ap.add_argument("--validation", type=int, default=0, metavar="N",
                    help=f"also the perplexity on the first N 2048-token windows of {VALID} (val_ppl)")
    ap.add_argument("--shared", action="store_true", help="mark the rows as measured on a machine running other work")
    ap.add_argument("--render", action="store_true", help="only write the table and the plot from the JSON")
    args = ap.parse_args()
    out = Path(args.out)
    rows = {r["row"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    if not args.render:
        loaded = layershare.load_model(args.model)
        for row in args.rows:
            rows[row] = run_row(row, args.model, loaded, args.device, json.loads(args.set), args.validation,
                                args.shared)
            print(json.dumps(rows[row]), flush=True)
            out.write_text(json.dumps(list(rows.values()), indent=1))
    print(table(list(rows.values())))
    if args.render:  # every results file: one table per file, one plot
        parts, every = [], []
        for f in (OUT, OUT_CPU, OUT_GEMMA):
            if f.exists():
                found = json.loads(f.read_text())
                models = sorted({r["model"].split(" ")[0] for r in found})
                every += [r for r in found if r["model"].startswith("smollm2-135m")]  # the plot: SmolLM2's
                parts.append(f"## {f.name} ({', '.join(models)})\n\n" + table(found) + "\n\n" + notes(found))
        (ROOT / "docs" / "quant_llm.md").write_text(
            "# Quantization composed with sharing\n\nWritten by `benchmarks/quant_llm.py --render`; "
            "the protocol is its docstring. Rows sorted by size; \"compress s\" includes the distillation of "
            "QAT rows (not the evaluation); \"-gN\": groups of N weights instead of 128; \"-aN\": GPTAQ alpha N/100 (the library's default since 2026-12-06: 1; rows without it: 0). The plot draws SmolLM2's rows, "
            "for GPTQ per bit width the one closest to the library's default (\"-act-mse-a100\", else \"-act-mse\", else \"-mse\").\n\n" + "\n".join(parts))
        plot(every, ROOT / "docs" / "quant_llm.png")


if __name__ == "__main__":
    main()
