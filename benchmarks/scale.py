"""Scale: compress a model larger than the memory it is given, group by group from its shards.

    python benchmarks/scale.py                      # generate (if missing), run 1 and 2 processes, write docs/scale.*
    python benchmarks/scale.py --procs 1            # one run
    python benchmarks/scale.py --render             # the tables from docs/scale.json

Generates (not committed) a Llama-shaped model with random weights, >= 2B parameters, as
float32 safetensors shards (one per block) with SmolLM2's tokenizer, then runs
`layershare compress DIR --onload` (1 process, 2 threads) and
`torchrun --nproc_per_node 2 -m layershare compress DIR` (2 processes, 1 thread each) on it,
sampling the resident memory of the whole process tree every 0.2 s. Per group: seconds and
peak RSS (layershare.json; onload.py resets the peak at every group). Writes docs/scale.json
and docs/scale.md. Random weights: the numbers are time and memory, not quality.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)
RECIPE = ["--steps", "5", "--group-size", "1", "--nsamples", "8", "--seqlen", "256", "--calib", "austen:emma"]


def llama_block(i: int, d: int, kv: int, h: int, rand, ones) -> dict:
    """Block i's tensors of a Llama checkpoint (width d, KV width kv, MLP width h): rand(*shape)
    for the linear weights, ones(n) for the norms."""
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
            p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
            p + "mlp.gate_proj.weight": rand(h, d), p + "mlp.up_proj.weight": rand(h, d),
            p + "mlp.down_proj.weight": rand(d, h),
            p + "input_layernorm.weight": ones(d), p + "post_attention_layernorm.weight": ones(d)}


def generate(out: Path, seed: int = 0) -> None:
    """The model, block by block (never more than one block in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from layershare.data.assets import smollm2_gguf

    if (out / "model.safetensors.index.json").exists():
        print(f"{out}: already generated")
        return
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    folder, gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)
    g = torch.Generator().manual_seed(seed)
    d, h, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    kv = d // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    n = L + 1
    weight_map, total = {}, 0

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < L:
            t = llama_block(i, d, kv, h, rand, torch.ones)
        else:
            t = {"model.embed_tokens.weight": rand(SHAPE["vocab_size"], d), "model.norm.weight": torch.ones(d),
                 "lm_head.weight": rand(SHAPE["vocab_size"], d)}
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        for k, v in t.items():
            weight_map[k] = name
            total += v.numel() * 4
        print(f"\rgenerating {i + 1}/{n} shards", end="", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    os.rename(tmp, out)
    print(f"\n{out}: {total / 1e9:.2f} GB, {total // 4 / 1e9:.3f}B parameters")


class TreeRSS:
    """Peak resident memory of a process and all its descendants (summed, and the largest one)."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.root, self.every = psutil.Process(pid), every
        self.peak_sum = self.peak_one = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak_sum = max(self.peak_sum, sum(rss))
                self.peak_one = max(self.peak_one, max(rss, default=0))
            except psutil.Error:
                pass
            time.sleep(self.every)

    def done(self):
        self.stop.set()
        self.thread.join()


def run(model: Path, work: Path, procs: int) -> dict:
    out = work / f"out-{procs}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.staging", ignore_errors=True)
    py = sys.executable
    if procs == 1:
        cmd = [py, "-m", "layershare", "compress", str(model), "--onload", "--output", str(out), *RECIPE]
    else:
        cmd = [str(Path(py).parent / "torchrun"), "--nproc_per_node", str(procs), "-m", "layershare", "compress",
               str(model), "--output", str(out), *RECIPE]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeRSS(p.pid)
    tail = []
    for line in p.stdout:
        tail = (tail + [line])[-40:]
        if "it/s" not in line and "s/it" not in line:
            print(line, end="", flush=True)
    rc = p.wait()
    mem.done()
    wall = time.time() - t0
    if rc:
        raise SystemExit(f"compression failed ({rc}):\n{''.join(tail)}")
    meta = json.loads((out / "layershare.json").read_text())
    groups = meta["stages"][0]["groups"]
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return {"processes": procs, "wall_s": wall, "peak_rss_tree": mem.peak_sum, "peak_rss_largest": mem.peak_one,
            "model_bytes": model_bytes, "dense_params": meta["dense_params"], "ratio": meta["sizes"]["ratio"],
            "output_bytes": meta["weights_bytes"],
            "groups": [{"blocks": g["blocks"], "seconds": g["seconds"], "peak_rss": g.get("peak_rss")}
                       for g in groups],
            "shards_sha256": {k: v["sha256"] for k, v in meta["weights_files"].items()}}


TARGETS = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}
GPU_SPEEDUP = 25  # SmolLM2-135M, FiPS default recipe: 2,217-2,938 s on this CPU vs 86-93 s on an H200 (llm_runs.json)


def _v_entries(shape: dict, group_size: int) -> tuple[int, int]:
    """(rank, V entries) of one FiPS group at 20%, from layershare's own planner on a meta skeleton."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    import layershare

    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**shape))
    stage = layershare.plan(model, layershare.Recipe.of("fips", group_size=group_size))[0]
    rank = stage.plan.groups[0].rank
    return rank, rank * 3 * shape["intermediate_size"] * group_size


def _block_bytes(d: int, h: int) -> float:
    """One block's float32 weights, roughly: attention ~ 4 d^2 (with h = 4d), MLP 3 d h."""
    return 12 * d * h * 4 / 3


def estimate(results: dict) -> list[dict]:
    """Wall time and memory for Llama-3-8B and 70B from the 1-process run and the phase profile
    (benchmarks/scale_profile.py; assumptions in the doc)."""
    run = next(r for r in results["runs"] if r["processes"] == 1)
    per_block = sum(g["seconds"] for g in run["groups"]) / sum(len(g["blocks"]) for g in run["groups"])
    peaks = results["profile"]["peaks"]
    d0, h0 = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    _, v0 = _v_entries(SHAPE, 1)
    base = peaks["RSS when the first group starts"]
    # the two large phases of a group: the dense forward (one block's weights and the down
    # projection's h x h float64 second moment) and the tuning (V, Adam's moments, one gradient,
    # activations: the group's V entries)
    forward0 = peaks["dense forward + second moments"] - base - h0 * h0 * 8 - _block_bytes(d0, h0)
    tuning0 = max(peaks["tuning"], peaks["pruning"]) - base
    rows = []
    for name, shape in TARGETS.items():
        d, h, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
        rank, v = _v_entries(shape, 1)
        work = (d * h * (d + h)) / (d0 * h0 * (d0 + h0))
        cpu_h = per_block * work * L / 3600
        tuning = tuning0 * v / v0
        forward = forward0 * d / d0 + h * h * 8 + _block_bytes(d, h)
        hidden = 8 * 256 * d * 4 * 2
        rows.append({"model": name, "blocks": L, "rank": rank, "v_entries": v, "work_per_block": work,
                     "cpu_hours": cpu_h, "gpu1_hours": cpu_h / GPU_SPEEDUP, "gpu8_hours": cpu_h / GPU_SPEEDUP / 8,
                     "cpu_peak": base + hidden + max(forward, tuning), "gpu_mem": tuning,
                     "host_ram": base + hidden + forward})
    return rows


GUIDE = """## How to compress a model larger than memory

The model must be a local transformers directory with safetensors weights (one file or shards);
the output and its staging area (`.OUT.staging/`, beside it) need room for the compressed model.

**One GPU** (a 70B model: its float32 weights never need to fit anywhere, one block at a time does):

```bash
layershare compress /models/Llama-3-70B --onload --device cuda --calib corpus.txt --output llama70b-fips20
# killed, out of memory, rebooted? the same command continues from the first unfinished group
layershare eval llama70b-fips20 --text heldout.txt
```

**8 GPUs on 2 machines** (4 each). The model directory and the output must be on a file system
both machines see (the staged groups are how the ranks hand over their work); every rank uses
`cuda:LOCAL_RANK`; the ranks exchange nothing but barriers (gloo over TCP, which torchrun's
rendezvous sets up):

```bash
# on each of the two machines (nodeA is reachable from both on port 29500)
torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint nodeA:29500 --rdzv-id fips70b \\
    -m layershare compress /shared/Llama-3-70B --device cuda --calib /shared/corpus.txt \\
    --output /shared/llama70b-fips20
```

Each rank takes a contiguous range of groups, runs the dense model forward (one block at a time)
to its first group, compresses its groups and stages them; rank 0 then writes the directory: one
shard per group (hard links to the staged files) and one for the embeddings, norms and head,
with transformers' `model.safetensors.index.json`. A crashed rank stops the job (torchrun ends
the others); rerunning the command resumes every rank from its first unfinished group (finished
groups are never redone, also after a change of the number of processes). A group
that needs the compressed model so far as its input (SVD-LLM's and Basis Sharing's closed-form
update, FiPS's `propagate: compressed`) is refused under torchrun before any work (it resumes in
one process). The output is identical, byte for byte, whether it was made by 1 process or several
and with or without interruptions, given the same number of threads per process (tested:
tests/test_onload.py); different thread counts sum floats in another order.
"""


def render(results: dict) -> str:
    rows = results["runs"]
    lines = ["# Scale: onloaded compression of a 2B-parameter model", "", GUIDE, "## Measured", "",
             f"Measured {results['date']} on {results['machine']}. Model: Llama-shaped, random weights, "
             f"{results['shape']}; float32 safetensors, one shard per block. Recipe: FiPS 20% "
             f"(default), `{' '.join(RECIPE)}`. Command: `benchmarks/scale.py`. "
             + ("Each run had the machine to itself." if results.get("alone") else "SHARED MACHINE: see notes."),
             "",
             "| processes | wall | peak RSS (all processes) | largest process | model (fp32) | peak / model | output |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['wall_s'] / 60:.1f} min | {r['peak_rss_tree'] / 2**30:.2f} GiB | "
                     f"{r['peak_rss_largest'] / 2**30:.2f} GiB | {r['model_bytes'] / 2**30:.2f} GiB | "
                     f"{r['peak_rss_tree'] / r['model_bytes']:.1%} | {r['output_bytes'] / 2**30:.2f} GiB |")
    if len(rows) > 1:
        same = rows[0]["shards_sha256"] == rows[1]["shards_sha256"]
        lines += ["", f"Output shards of 1 and 2 processes byte-identical: {same}"
                      + ("" if same else " (1 process ran 2 threads, each of 2 processes 1: float sums in another "
                                         "order; the tests show identity at equal thread counts)")]
    prof = results.get("profile")
    if prof:
        lines += ["", "**What the peak is made of** (benchmarks/scale_profile.py, " + prof["date"] + ": the same "
                  "recipe on the first two blocks, RSS sampled every 10 ms and charged to the phase running; "
                  "alone):", "", "| phase | peak RSS |", "|---|---|"]
        lines += [f"| {k} | {v / 2**30:.2f} GiB |" for k, v in prof["peaks"].items()]
        lines += ["", "Not the model: the per-group peaks are flat from the first group to the last (table below) "
                  "and the process holds one block's weights at a time. The dense forward holds the block and the "
                  "down projection's 8192 x 8192 float64 second moment (0.5 GiB); FiPS's init uses it without "
                  "any h x h factor (the h-side whitening cancels: docs/design.md) and frees it; tuning holds V "
                  "(rank 2,415 x 24,576 = 59M entries), Adam's two moments, one parameter's gradient at a time "
                  "(each parameter is stepped inside the backward), the bool mask and the init kept as its "
                  "nonzeros; pruning picks the kept entries by a threshold search (no top-k index list). "
                  "About 0.36 GiB of every number is the libraries' code (file-backed pages). Before commit "
                  "fd17c90 (2026-11-28) the same group peaked at 4.27-4.51 GiB: a Cholesky factor of the "
                  "second moment, float masks and a masked copy of V, all gradients and Adam's temporaries at "
                  "once, a top-k over 59M scores with int64 indices, and freed memory kept by glibc."]
    est = results.get("estimates") or []
    if est:
        lines += ["", "## Estimates for Llama-3-8B and 70B (this recipe: 5 steps, 8 x 256 calibration tokens)", "",
                  "| model | blocks | rank per block | 1 CPU (2 cores) | 1 GPU | 8 GPUs | peak RSS, CPU run | "
                  "GPU memory | host RAM per process |", "|---|---|---|---|---|---|---|---|---|"]
        for e in est:
            lines.append(f"| {e['model']} | {e['blocks']} | {e['rank']} | {e['cpu_hours']:.1f} h | "
                         f"{e['gpu1_hours'] * 60:.0f} min | {e['gpu8_hours'] * 60:.0f} min | "
                         f"{e['cpu_peak'] / 2**30:.0f} GiB | {e['gpu_mem'] / 2**30:.0f} GiB | "
                         f"{e['host_ram'] / 2**30:.0f} GiB |")
        lines += ["", "Assumptions: (1) time per block scales as d*h*(d+h) (the whitening products "
                  "dominate; the forward passes scale slower), from this run's mean time per block; (2) a GPU is " f"{GPU_SPEEDUP}x this CPU (SmolLM2-135M, default FiPS recipe: 2,217-2,938 s "
                  "here vs 86-93 s on an H200, both from shared machines, docs/llm_runs.json); (3) 8 GPUs divide "
                  "the groups 8 ways (the groups are independent under propagate='dense'; each rank's dense "
                  "forward to its first group adds less than one forward of the model); (4) memory: a group's peak "
                  "is the larger of its two phases in the profile above, each above the process's base: the "
                  "dense forward (one block's float32 weights, the down projection's h^2 float64 second moment, "
                  "the rest scaled with d) and the tuning (scaled with the group's V entries: V, Adam's moments, "
                  "the mask, the pruning scores); on a GPU the tuning part is GPU memory, the second moments, "
                  "calibration hidden states and one block's dense weights stay in host RAM. "
                  "The default recipe (200 steps, 64 x 512 tokens) multiplies the time by roughly 10-20x; its "
                  "memory is the same per group but for 16x the hidden states."]
    lines += ["", "Per group (1 process): seconds and peak RSS within the group", "",
              "| group | blocks | seconds | peak RSS |", "|---|---|---|---|"]
    for i, g in enumerate(rows[0]["groups"]):
        rss = f"{g['peak_rss'] / 2**30:.2f} GiB" if g.get("peak_rss") else "-"
        lines.append(f"| {i + 1} | {g['blocks']} | {g['seconds']:.0f} | {rss} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/layershare-scale", help="where the model and outputs go (~17 GB)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--shared", action="store_true", help="mark the results as from a shared machine")
    ap.add_argument("--estimate-only", action="store_true", help="recompute the estimates from docs/scale.json")
    args = ap.parse_args()
    path = DOCS / "scale.json"
    if args.render:
        (DOCS / "scale.md").write_text(render(json.loads(path.read_text())))
        print((DOCS / "scale.md").read_text())
        return
    work = Path(args.work)
    model = work / "dense"
    generate(model)
    import platform

    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    results.update(date=time.strftime("%Y-%m-%d"), machine=f"{os.cpu_count()} CPU cores, {platform.machine()}",
                   shape=", ".join(f"{k}={v}" for k, v in SHAPE.items()), alone=not args.shared)
    if args.estimate_only:
        results["estimates"] = estimate(results)
        path.write_text(json.dumps(results, indent=2))
        (DOCS / "scale.md").write_text(render(results))
        print((DOCS / "scale.md").read_text())
        return
    for procs in args.procs:
        r = run(model, work, procs)
        results["runs"] = [x for x in results["runs"] if x["processes"] != procs] + [r]
        results["runs"].sort(key=lambda x: x["processes"])
        path.write_text(json.dumps(results, indent=2))
        print(f"{procs} process(es): {r['wall_s'] / 60:.1f} min, peak RSS {r['peak_rss_tree'] / 2**30:.2f} GiB "
              f"= {r['peak_rss_tree'] / r['model_bytes']:.1%} of the model's {r['model_bytes'] / 2**30:.2f} GiB")
    results["estimates"] = estimate(results)
    path.write_text(json.dumps(results, indent=2))
    (DOCS / "scale.md").write_text(render(results))
    print((DOCS / "scale.md").read_text())


if __name__ == "__main__":
    main()
