"""Run time of compressed models against the dense one: load time, memory, prefill, decode.

    python benchmarks/runtime.py                       # SmolLM2-135M at 20%, CPU, every core
    python benchmarks/runtime.py --ratios 0.1 0.2 0.3  # more ratios
    python benchmarks/runtime.py --model smollm2-shape --device cuda   # random weights of
                                                       # SmolLM2's shape (a GPU machine has no GGUF)

1. Compress (once; kept under out/runtime/): FiPS with each V pattern and the peers, each at
   each ratio. FiPS runs the library's default recipe (`--steps 0`: one-shot; the tuning changes
   the values of U and V, not their shapes, ranks or nonzero counts, so only the perplexity
   depends on it).
2. Measure, each (model, run-time form) in its own process, the dense model first and last:
   load time (from the saved directory: the dense model through `from_pretrained`), resident
   memory after loading and one 16-token forward (which touches every weight page of a mapped
   file) and at the peak (RSS above the process's base RSS, read after its imports and after
   loading and running a tiny twin of the model compressed the same way, through the same route:
   twin_dir; on a GPU: allocated memory), the bytes the model's tensors hold, prefill latency (1 x 512 and
   1 x 2048 tokens, median of 3 after a warm-up), greedy decode tokens/s with the KV cache (batch
   1 and 8, 128 new tokens after a 16-token prompt), and perplexity on the first `--ppl-windows`
   2048-token windows of the test book (real weights only).
Writes docs/runtime.json (rows merge by model, device, label, ratio and runtime) and
docs/runtime.md, and prints the table. Ratios against the dense row of the same run are the
result; absolute times are context.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "runtime"
RESULTS = ROOT / "docs" / "runtime.json"
CALIB = "austen:sensesensibility"
TEST = "austen:northangerabbey"

# label -> (recipe overrides, runtime forms measured); FiPS labels say their V pattern
VARIANTS = {
    # the library's default FiPS (unstructured V at the width rule's sparsity: 0.43 at 20% of SmolLM2)
    "fips": ({"method": "fips"}, ["auto", "compact", "merged"]),
    "fips, bf16 file": ({"method": "fips", "dtype": "bfloat16"}, ["auto", "compact"]),
    "fips + rtn 4-bit": ({"method": "fips", "bits": 4}, ["auto"]),
    # V's 4-bit values held as codes in the bitmask kernels (runtime/kernels/ops.QuantValues), beside 4-bit RTN alone
    "fips + rtn 4-bit, bf16 file": ({"method": "fips", "bits": 4, "dtype": "bfloat16"}, ["auto"]),
    # the rows of 2026-12-04 (V at a fixed half sparsity, the default then)
    "fips (unstructured 50%)": ({"method": "fips", "pattern": "unstructured", "sparsity": 0.5},
                                ["auto", "compact", "merged"]),
    # saved in bfloat16 (the source model's own dtype): loaded in float32, the kernel form keeps V's values at 16 bits
    "fips (unstructured 50%), bf16 file": ({"method": "fips", "pattern": "unstructured", "sparsity": 0.5,
                                            "dtype": "bfloat16"},
                                           ["auto", "compact"]),
    "fips (2:4)": ({"method": "fips", "pattern": "2:4"}, ["auto", "compact", "factored"]),
    "fips (dense V)": ({"method": "fips", "pattern": "none"}, ["auto", "compact", "merged"]),
    "svd-llm": ({"method": "svd-llm"}, ["auto"]),
    "basis-sharing": ({"method": "basis-sharing"}, ["auto"]),
    "ffn-merge": ({"method": "ffn-merge"}, ["auto"]),
    # quantized: "auto" on the CPU keeps plain linears packed for PyTorch's int4 kernel (runtime/quantized.py);
    # the ratio applies to FiPS only ("quant" alone is sized by its bits)
    "rtn 4-bit": ({"method": "quant", "bits": 4}, ["auto"]),
    # what is not quantized (the embedding and tied head, norms) stored in bfloat16: loaded in float32,
    # the embedding and head stay 16-bit (runtime/narrow.py)
    "rtn 4-bit, bf16 file": ({"method": "quant", "bits": 4, "dtype": "bfloat16"}, ["auto"]),
    "fips (unstructured 50%) + rtn 4-bit": ({"method": "fips", "pattern": "unstructured", "sparsity": 0.5, "bits": 4},
                                            ["auto"]),
}


def host_cpu() -> str:
    """The CPU's model name (this machine's host changes between days: Zen 5, Xeon with AMX; speed
    ratios depend on it, so every row records it)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def release_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; nothing elsewhere), so that
    the base RSS holds no memory freed before it."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def random_model_dir(name: str) -> Path:
    """A model of SmolLM2-135M's shape with random weights, saved as a transformers directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = OUT / name / "dense"
    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# the twin's sizes: a tiny model of the measured model's architecture (see twin_dir)
TWIN = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, vocab_size=512)


def twin_dir(model_name: str) -> Path:
    """A tiny model of `model_name`'s architecture (its config at TWIN's sizes, random weights),
    saved as a transformers directory. Each measuring process loads and runs the twin, compressed
    the same way, through the same route before it reads its base RSS: what loading and a first
    forward import on first use (transformers' modeling, loading and masking code, torch._dynamo
    and so Triton where it is installed: about 100 MiB of modules and libraries, the same for
    every model) then belongs to the base, not to the model measured."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = OUT / "twin" / model_name / "dense"
    if (path / "config.json").exists():
        return path
    cfg = AutoConfig.from_pretrained(dense_dir(model_name))
    for k, v in TWIN.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def dense_dir(model_name: str) -> Path:
    """The dense model as a transformers directory (float32 safetensors), what a user loads."""
    if model_name.endswith("-shape"):
        return random_model_dir(model_name)
    path = OUT / model_name / "dense"
    if (path / "config.json").exists():
        return path
    from safetensors.torch import save_file

    import layershare
    from layershare.checkpoint.save import state_dict_unique

    model, tok = layershare.load_model(model_name)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):  # the GGUF's: the weights here are plain float32
        del model.config.quantization_config
    model.config.save_pretrained(path)
    tok.save_pretrained(path)
    save_file(state_dict_unique(model, model.dtype), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def compress(model_name: str, label: str, ratio: float, steps: int, device: str, twin: bool = False) -> Path | None:
    """The model (or its twin: twin_dir) compressed by `label`'s recipe at `ratio`, saved once."""
    import torch

    import layershare

    overrides = dict(VARIANTS[label][0])
    method = overrides.pop("method")
    if method == "fips" and steps is not None:
        overrides["steps"] = steps
    tuned = "" if method != "fips" or steps == 0 else f" steps{'default' if steps is None else steps}"
    path = (OUT / "twin" if twin else OUT) / model_name / f"{label} {ratio}{tuned}".replace(" ", "_").replace("(", "").replace(")", "").replace(":", "-")
    if (path / "layershare.json").exists():
        return path
    from transformers import AutoModelForCausalLM

    src = twin_dir(model_name) if twin else dense_dir(model_name)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    bits = overrides.pop("bits", None)
    file_dtype = overrides.pop("dtype", "float32")
    if method == "quant":
        recipe = layershare.Recipe.of(method, bits=bits, algorithm="rtn", device=device)
    else:
        recipe = layershare.Recipe.of(method, ratio=ratio, device=device, **overrides)
        if bits:  # then quantized: the stage after the method, round to nearest (run time does not
            # depend on how the codes were chosen), group 128
            from layershare.methods import QuantConfig

            recipe.stages.append(QuantConfig(bits=bits, algorithm="rtn"))
    recipe.dtype = file_dtype
    if twin or model_name.endswith("-shape"):  # random weights: a few random windows calibrate as well as any
        recipe.nsamples = 8
        data = torch.randint(0, model.config.vocab_size, (recipe.nsamples * recipe.seqlen + 1,),
                             generator=torch.Generator().manual_seed(0))
        tok = None
    else:
        data, tok = CALIB, layershare.load_preprocessing(src)
    try:
        layershare.compress(model, recipe, data=data, tokenizer=tok, output_dir=path)
    except ValueError as e:  # a budget the method cannot reach
        print(f"   {label} at {ratio:.0%}{' (twin)' if twin else ''}: {e}", flush=True)
        return None
    return path


def measure(spec: dict) -> dict:
    """One model in one form, in this (fresh) process."""
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM

    import layershare
    from layershare.runtime.forms import forms, resident_bytes

    dev = spec["device"]
    cuda = dev.startswith("cuda")
    dtype = getattr(torch, spec.get("dtype", "float32"))

    def load(path):
        if spec["runtime"] == "dense":
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
        return layershare.load(path, device=dev, runtime=spec["runtime"], dtype=dtype)

    if spec.get("twin"):  # its first-use imports into the base (twin_dir)
        twin = load(spec["twin"])
        with torch.inference_mode():
            twin(torch.randint(0, twin.config.vocab_size, (1, 16)).to(dev), use_cache=False)
        del twin
    gc.collect()
    release_heap()
    if cuda:
        torch.zeros(1, device=dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = rss_mb()
    t0 = time.perf_counter()
    model = load(spec["dir"])
    if cuda:
        torch.cuda.synchronize()
    row = {"load_s": time.perf_counter() - t0, "resident_bytes": resident_bytes(model), "forms": forms(model),
           "cpu": host_cpu()}
    if not cuda:
        from layershare.runtime.kernels import ops

        row["kernel"] = ops.isa() + (f" ({ops.spread()})" if ops.isa() == "avx512" else "")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # one short forward: every weight page is touched (a mapped file counts)
        model(torch.randint(0, vocab, (1, 16), generator=gen).to(dev), use_cache=False)
    row["memory_mb"] = torch.cuda.memory_allocated(dev) / 2**20 if cuda else rss_mb() - base

    def timed(fn, reps: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    with torch.inference_mode():
        for n in (512, 2048):
            ids = torch.randint(0, vocab, (1, n), generator=gen).to(dev)
            row[f"prefill_{n}_s"] = timed(lambda: model(ids, use_cache=False), spec.get("reps", 3))
        for b in (1, 8):
            ids = torch.randint(0, vocab, (b, 16), generator=gen).to(dev)
            new_tokens = spec.get("new_tokens", 128)
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0)
            row[f"decode_b{b}_tok_s"] = b * new_tokens / timed(lambda: model.generate(ids, **kw), 1)
        if spec.get("ppl_windows"):
            from layershare.data.text import read_text, tokenize

            tok = layershare.load_preprocessing(spec["dir"])
            ppl = layershare.evaluate_perplexity(model, tok, tokenize(tok, read_text(TEST)), seqlen=2048,
                                                 max_windows=spec["ppl_windows"])
            row["ppl_slice"] = ppl.ppl
    if cuda:
        row["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return row


def run_child(spec: dict) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    return rows[-1] if rows and proc.returncode == 0 else None


def table(rows: list[dict]) -> str:
    lines = ["| model | device | dtype | method | ratio | runtime | load | memory | vs dense | peak | tensors | "
             "prefill 512 | vs dense | prefill 2048 | vs dense | decode b1 | vs dense | decode b8 | vs dense | "
             "ppl (slice) | host CPU, kernel path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {}
    for r in rows:
        if r["runtime"] == "dense":
            dense.setdefault((r["model"], r["device"], r.get("dtype", "float32")), []).append(r)

    def mean(rs, k):
        return sum(x[k] for x in rs) / len(rs)

    for r in rows:
        d = dense.get((r["model"], r["device"], r.get("dtype", "float32")))
        rel = (lambda k, inv=False: "-" if not d or r["runtime"] == "dense" else
               f"{(mean(d, k) / r[k]) if inv else (r[k] / mean(d, k)):.2f}x")
        ratio = "-" if r["runtime"] == "dense" else f"{r['ratio']:.0%}"
        ppl = f"{r['ppl_slice']:.2f}" if "ppl_slice" in r else "-"
        lines.append(
            f"| {r['model']} | {r['device']} | {r.get('dtype', 'float32')} | {r['label']} | {ratio} | {r['runtime']} | "
            f"{r['load_s']:.1f} s | {r['memory_mb']:,.0f} MiB | {rel('memory_mb')} | {r['peak_mb']:,.0f} MiB | "
            f"{r['resident_bytes'] / 2**20:,.0f} MiB | {r['prefill_512_s'] * 1e3:,.0f} ms | {rel('prefill_512_s', True)} | "
            f"{r['prefill_2048_s'] * 1e3:,.0f} ms | {rel('prefill_2048_s', True)} | "
            f"{r['decode_b1_tok_s']:.1f} | {rel('decode_b1_tok_s')} | {r['decode_b8_tok_s']:.1f} | "
            f"{rel('decode_b8_tok_s')} | {ppl} | {r.get('cpu', 'not recorded')}"
            f"{', ' + r['kernel'] if r.get('kernel') else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="an alias, or smollm2-shape (random weights)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=None,
                    help="FiPS tuning steps (default: the library's; 0: one-shot, as fast to run and to build)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ppl-windows", type=int, default=8, help="perplexity slice (real weights; 0: none)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="each row measured in each")
    ap.add_argument("--runtimes", nargs="+", help="only these run-time forms (default: each variant's list)")
    ap.add_argument("--quick", action="store_true", help="one timed prefill (after a warm-up) and 32 new tokens "
                    "per decode instead of the median of 3 and 128 (for a busy machine; marked in the rows)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("ROW " + json.dumps(measure(json.loads(args.child))), flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    real = not args.model.endswith("-shape")
    jobs = [("dense", "dense", 0.0, dense_dir(args.model), twin_dir(args.model))]
    for ratio in args.ratios:
        for label in args.variants:
            print(f"== compress {label} at {ratio:.0%}", flush=True)
            path = compress(args.model, label, ratio, args.steps, args.device)
            twin = compress(args.model, label, ratio, 0, args.device, twin=True)
            if path is not None:
                jobs += [(label, rt, ratio, path, twin) for rt in VARIANTS[label][1]
                         if not args.runtimes or rt in args.runtimes]
    jobs.append(jobs[0])  # the dense model last too: drift shows as a difference between its two rows
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.exists() else []
    device_name = args.device
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(args.device)
    new = []
    for (label, rt, ratio, path, twin), dtype in [(j, d) for j in jobs for d in args.dtypes]:
        print(f"== measure {label} {ratio:.0%} {rt} {dtype}", flush=True)
        spec = {"dir": str(path), "runtime": rt, "device": args.device, "threads": args.threads, "dtype": dtype,
                "ppl_windows": args.ppl_windows if real else 0, "twin": str(twin) if twin else None}
        if args.quick:
            spec.update(reps=1, new_tokens=32)
        row = run_child(spec)
        if row is None:
            print("   failed", flush=True)
            continue
        row.update(model=args.model, device=device_name, label=label, runtime=rt, ratio=ratio, threads=args.threads,
                   dtype=dtype, date=time.strftime("%Y-%m-%d"), quick=args.quick, ppl_windows=spec["ppl_windows"],
                   twin=twin is not None)
        new.append(row)
        print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    key = lambda r: (r["model"], r["device"], r["label"], r["ratio"], r["runtime"], r.get("dtype", "float32"))  # noqa: E731
    keys = {key(r) for r in new}
    rows = [r for r in rows if key(r) not in keys] + new
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=2))
    print(table(new))


if __name__ == "__main__":
    main()
