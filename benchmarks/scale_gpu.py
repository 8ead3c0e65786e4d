"""Scale on a GPU: the default FiPS recipe, onloaded (`compress_checkpoint`, what `layershare compress
M --onload --device cuda` runs), on the first blocks of a Llama-shaped model, timed group by group
and by phase, with the GPU's and the host's memory sampled.

    python benchmarks/scale_gpu.py --shape 8b 70b          # on a GPU: appends docs/scale_gpu.json
    python benchmarks/scale_gpu.py --shape tiny --device cpu --out /tmp/scale_gpu.json   # a dry run (< 1 min)

Per shape: the model's config (8b: Llama-3-8B's widths, 70b: Llama-3-70B's; tiny: a dry run's,
with a short recipe unless --steps/--nsamples/--seqlen say otherwise: DRY_RUN),
its budget planned on the whole model (on the meta device: the rank the default recipe gives every
group of the real model), then a checkpoint of its first `--blocks` blocks written with random
weights (bfloat16 on disk, a 4,096-token vocabulary: the embeddings and head are no group's work),
and compressed with the recipe at that rank on random calibration tokens. Random weights: the
numbers are time and memory, not quality.

Phases (benchmarks/scale_profile.py's approach: the library's functions wrapped for this
diagnostic; the innermost running one is charged, exclusive of those inside it; on a GPU the
device is synchronised at every phase boundary, so kernels are charged to the phase that queued
them): onload, forward + statistics, init (its whitened SVD and projection apart), the init's error
at the final mask, tuning, pruning (its threshold search apart), materialize, staging, and the
driver's own work between them. `phases_s` is the last group's; `per_group_s` every group's wall
time (group start to end, staging included). Memory: host RSS (psutil) and GPU memory allocated by
PyTorch, sampled every 10 ms, and torch's exact peak of allocated GPU memory.

Each run appends one entry per shape to --out (default docs/scale_gpu.json, a JSON list):
{"device", "shape": {hidden_size, intermediate_size, num_attention_heads, num_key_value_heads},
"recipe": {steps, nsamples, seqlen, group_size, ratio, rank, stats_dtype}, "blocks", "per_group_s",
"phases_s", "gpu_peak_gib", "host_peak_gib", and the context: date, torch, import_s, setup_s,
wall_s, phase_peaks_gib}.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import torch

import layershare
import layershare.api  # what a compression imports: timed with the rest
import layershare.compression.onload
from scale import llama_block
from scale_profile import wrap_each

IMPORT_S = time.perf_counter() - T_START
ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
VOCAB = 4096  # of the generated checkpoint (the plan uses the real one)
SHAPES = {  # the model's config; `layers` and `vocab` of the real model, for the plan
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               layers=32, vocab=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                layers=80, vocab=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                 layers=4, vocab=VOCAB, max_position_embeddings=1024, rope_theta=10000.0),
}
# the tiny shape is a dry run of this script (seconds on a CPU): a short recipe unless one is given
DRY_RUN = dict(steps=20, nsamples=16, seqlen=256)
PHASES = [  # (module, attribute, label)
    ("layershare.compression.onload", "Onloaded.capture", "capture (block arguments)"),
    ("layershare.compression.onload", "Onloaded.onload", "onload (read the group's blocks)"),
    ("layershare.compression.drivers.sequential", "run_group", "forward + statistics"),
    ("layershare.methods.fips", "FiPS.init", "init"),
    ("layershare.methods.fips", "whitened_shared_svd", "init: whitened SVD"),
    ("layershare.methods.fips", "_project", "init: projection"),
    ("layershare.compression.reconstruct", "_init_at_final_mask", "init's error at the final mask"),
    ("layershare.compression.drivers.sequential", "reconstruct", "tuning"),
    ("layershare.compression.reconstruct", "relative_error", "error on the calibration tokens"),
    ("layershare.compression.sparsity", "GroupPruner.prune_to", "pruning"),
    ("layershare.compression.sparsity", "kth_largest", "pruning: threshold"),
    ("layershare.methods.fips", "FiPS.materialize", "materialize"),
    ("layershare.compression.onload", "Onloaded.done", "staging the group"),
]
DRIVER = "the driver, between those phases"


class Phases:
    """Exclusive wall time per phase (a stack of the running ones) and the memory sampled while
    each runs; the device is synchronised at every boundary."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.stack = [DRIVER]
        self.t = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, list[float]] = {}  # label -> [host, gpu] peak bytes
        self.host_peak = 0
        self.proc = psutil.Process()
        self.stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop.is_set():
            host = self.proc.memory_info().rss
            gpu = torch.cuda.memory_allocated(self.device) if self.cuda else 0
            peak = self.peaks.setdefault(self.stack[-1], [0, 0])
            peak[0], peak[1] = max(peak[0], host), max(peak[1], gpu)
            self.host_peak = max(self.host_peak, host)
            time.sleep(0.01)

    def _charge(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[self.stack[-1]] = self.seconds.get(self.stack[-1], 0.0) + now - self.t
        self.t = now

    def enter(self, label: str) -> None:
        self._charge()
        self.stack.append(label)

    def exit(self) -> None:
        self._charge()
        self.stack.pop()

    def take(self) -> dict[str, float]:
        """The seconds charged since the last take."""
        self._charge()
        out, self.seconds = self.seconds, {}
        return out


CURRENT: list[Phases] = []  # the wrappers charge the run in progress


def install_wrappers() -> None:
    def wrap(owner, name, label):
        f = getattr(owner, name)

        def run(*a, **k):
            if not CURRENT:
                return f(*a, **k)
            CURRENT[0].enter(label)
            try:
                return f(*a, **k)
            finally:
                CURRENT[0].exit()
        setattr(owner, name, run)

    wrap_each(PHASES, wrap)


def config_of(shape: str, layers: int | None = None, vocab: int | None = None):
    from transformers import LlamaConfig

    s = dict(SHAPES[shape])
    full_layers, full_vocab = s.pop("layers"), s.pop("vocab")
    config = LlamaConfig(**s, num_hidden_layers=layers or full_layers, vocab_size=vocab or full_vocab,
                         tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    return config


def planned_rank(shape: str, recipe) -> tuple[int, int]:
    """The rank and nonzeros the recipe gives a group of the whole model (planned on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from layershare.adapters import get_adapter
    from layershare.compression.pipeline import plan_stages

    with init_empty_weights():
        model = LlamaForCausalLM(config_of(shape))
    budget = plan_stages(model, get_adapter(model), recipe)[0].plan.groups[0]
    return budget.rank, budget.nnz


def generate(shape: str, blocks: int, out: Path, device: torch.device, seed: int = 0) -> None:
    """A checkpoint of the shape's first `blocks` blocks: random weights (std 0.02, drawn on `device`),
    bfloat16 safetensors, one shard per block and one for the rest."""
    from safetensors.torch import save_file

    config = config_of(shape, layers=blocks, vocab=VOCAB)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    d, h = config.hidden_size, config.intermediate_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    n = blocks + 1
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < blocks:
            t = llama_block(i, d, kv, h, rand, ones)
        else:
            t = {"model.embed_tokens.weight": rand(VOCAB, d), "model.norm.weight": ones(d),
                 "lm_head.weight": rand(VOCAB, d)}
        save_file(t, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        del t
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def warm_up(device: torch.device) -> None:
    """The device's libraries loaded (cuBLAS, cuSOLVER) before the timed run, as in any long run
    after its first group."""
    a = torch.randn(256, 256, dtype=torch.float64, device=device)
    g = a @ a.t() + 256 * torch.eye(256, dtype=torch.float64, device=device)
    torch.linalg.cholesky(g)
    torch.linalg.eigh(g)
    torch.linalg.solve_triangular(torch.linalg.cholesky(g).t(), a, upper=True)
    (a.float() @ a.float()).sum().item()


def run_shape(shape: str, args, device: torch.device) -> dict:
    from layershare import FiPSConfig, Recipe

    t_setup = time.perf_counter()
    given = {k: getattr(args, k) for k in ("steps", "nsamples", "seqlen") if getattr(args, k) is not None}
    if shape == "tiny":
        given = DRY_RUN | given
    stage = {"ratio": 0.2, **{k: v for k, v in given.items() if k == "steps"}}
    run = {k: v for k, v in given.items() if k != "steps"}
    recipe = Recipe(stages=[FiPSConfig(**stage)], device=args.device, stats_dtype=args.stats_dtype, **run)
    rank, nnz = planned_rank(shape, recipe)
    fixed = Recipe(stages=[FiPSConfig(**stage, rank=rank)], device=args.device, stats_dtype=args.stats_dtype, **run)
    main = fixed.main
    print(f"{shape}: {args.blocks} blocks, rank {rank} (the whole model's plan at ratio {main.ratio}), "
          f"{main.steps} steps, {fixed.nsamples} x {fixed.seqlen} tokens, group size {main.group_size}, "
          f"statistics in {fixed.stats_dtype} on {args.device}", flush=True)
    work = Path(tempfile.mkdtemp(prefix=f"scale_gpu_{shape}_", dir=args.workdir))
    try:
        generate(shape, args.blocks, work / "dense", device)
        tokens = torch.randint(0, VOCAB, (fixed.nsamples * fixed.seqlen,),
                               generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            warm_up(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        setup_s = time.perf_counter() - t_setup
        phases = Phases(device)
        CURRENT[:] = [phases]
        groups: list[dict] = []
        before: dict[str, float] = {}  # what runs once before the first group (skeleton, capture)

        class Marks(layershare.Callback):
            def on_group_start(self, stage, group, blocks):
                seconds = phases.take()
                if not groups:
                    before.update({("setup (skeleton, plan, calibration)" if k == DRIVER else k): v
                                   for k, v in seconds.items()})
                groups.append({"blocks": blocks, "t": time.perf_counter()})

            def on_group_end(self, stage, group, report):
                seconds = phases.take()
                groups[-1].update(s=time.perf_counter() - groups[-1]["t"], phases=seconds)
                print(f"  group {group + 1} (blocks {report.blocks}): {groups[-1]['s']:.1f} s, "
                      f"error {report.stats.rel_err_before:.4f} -> {report.stats.rel_err_after:.4f}", flush=True)

        t0 = time.perf_counter()
        try:
            layershare.compress_checkpoint(work / "dense", fixed, data=tokens, output_dir=work / "out",
                                           callbacks=[Marks()], allow_ratio_miss=True)
        finally:
            phases.take()
            phases.stop.set()
            CURRENT.clear()
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cuda = device.type == "cuda"
    last = {k: round(v, 3) for k, v in groups[-1]["phases"].items()}
    entry = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "shape": {k: SHAPES[shape][k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                "num_key_value_heads")},
        "recipe": {"steps": main.steps, "nsamples": fixed.nsamples, "seqlen": fixed.seqlen,
                   "group_size": main.group_size, "ratio": main.ratio, "rank": rank, "nnz": nnz,
                   "stats_dtype": fixed.stats_dtype},
        "blocks": args.blocks,
        "per_group_s": [round(g["s"], 2) for g in groups],
        "median_group_s": round(statistics.median(g["s"] for g in groups), 2),
        "phases_s": dict(sorted(last.items(), key=lambda kv: -kv[1])),
        "before_groups_s": {k: round(v, 2) for k, v in before.items()},
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2) if cuda else None,
        "host_peak_gib": round(phases.host_peak / GIB, 2),
        "phase_peaks_gib": {k: {"host": round(h / GIB, 2), **({"gpu": round(g / GIB, 2)} if cuda else {})}
                            for k, (h, g) in phases.peaks.items()},
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "import_s": round(IMPORT_S, 2),
        "setup_s": round(setup_s, 1), "wall_s": round(wall, 1), "shape_name": shape,
    }
    print(f"  per group {entry['per_group_s']} s; the last group by phase:")
    for k, v in entry["phases_s"].items():
        print(f"    {k:40s} {v:8.2f} s")
    print(f"  peaks: GPU {entry['gpu_peak_gib']} GiB allocated, host {entry['host_peak_gib']} GiB RSS", flush=True)
    if cuda:
        torch.cuda.empty_cache()
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["8b"])
    ap.add_argument("--blocks", type=int, default=2, help="blocks of the model compressed (default 2: one group)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "scale_gpu.json",
                    help="the JSON list the entries are appended to (default docs/scale_gpu.json)")
    ap.add_argument("--steps", type=int, help="tuning steps (default: the default recipe's)")
    ap.add_argument("--nsamples", type=int, help="calibration windows (default: the default recipe's)")
    ap.add_argument("--seqlen", type=int, help="tokens per window (default: the default recipe's)")
    ap.add_argument("--stats-dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--workdir", help="where the generated checkpoints go (default the system's temp folder)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: this machine has no CUDA device; use --device cpu for a dry run")
    if args.blocks < 1:
        sys.exit("--blocks must be >= 1")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    print(f"imports: {IMPORT_S:.1f} s", flush=True)
    install_wrappers()
    for shape in args.shape:
        entry = run_shape(shape, args, device)
        entries = json.loads(args.out.read_text()) if args.out.exists() else []
        entries.append(entry)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(entries, indent=1) + "\n")
        print(f"  appended to {args.out}", flush=True)


if __name__ == "__main__":
    main()
