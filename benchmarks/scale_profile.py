"""What one group's peak memory is made of: a phase profile of the onloaded FiPS compression
benchmarks/scale.py runs, on a 2-block model of the same shape (its first two blocks, hard links
to the generated shards: each group's work is the same as in the 32-block run).

    python benchmarks/scale_profile.py        # after benchmarks/scale.py generated the model

Samples the process's RSS every 10 ms and attributes it to the phase running, named by wrapping
the library's functions for this diagnostic (capture, onload, forward with second moments, init,
the init's error at the final mask, tuning, pruning, materialize, staging, the final write).
Same recipe as the benchmark, the rank given (2,415: what the budget solver picks for the 32-block
model). Writes the peaks into docs/scale.json ("profile") for its estimates and tables.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("/tmp/layershare-scale/dense")
RANK = 2415
BASE = "RSS when the first group starts"
PHASES = [  # (module, attribute, label): the innermost running one is charged
    ("layershare.compression.onload", "Onloaded.capture", "capture (embeddings, block arguments)"),
    ("layershare.compression.onload", "Onloaded.onload", "onload (read one block)"),
    ("layershare.compression.drivers.sequential", "run_group", "dense forward + second moments"),
    ("layershare.methods.fips", "FiPS.init", "init (whitened, shared basis)"),
    ("layershare.compression.reconstruct", "_init_at_final_mask", "init's error at the final mask"),
    ("layershare.compression.drivers.sequential", "reconstruct", "tuning"),
    ("layershare.compression.sparsity", "GroupPruner.prune_to", "pruning"),
    ("layershare.methods.fips", "FiPS.materialize", "materialize (pack)"),
    ("layershare.compression.onload", "Onloaded.done", "staging the group"),
    ("layershare.checkpoint.save", "_save", "writing the output"),
]


def wrap_each(phases, wrap) -> None:
    """wrap(owner, name, label) for each (module, "Class.attr" or "attr", label) of `phases`."""
    import importlib

    for module, attr, label in phases:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        wrap(owner, name, label)


def two_block_copy(dst: Path) -> Path:
    idx = json.loads((SOURCE / "model.safetensors.index.json").read_text())
    cfg = json.loads((SOURCE / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    keep = {f for k, f in idx["weight_map"].items() if not k.startswith("model.layers.") or
            int(k.split(".")[2]) < 2}
    dst.mkdir(parents=True)
    for f in SOURCE.iterdir():
        if f.suffix == ".safetensors":
            if f.name in keep:
                os.link(f, dst / f.name)
        elif f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for k, f in idx["weight_map"].items() if f in keep}}))
    return dst


def main() -> None:
    from transformers import AutoTokenizer

    import layershare

    if not (SOURCE / "model.safetensors.index.json").exists():
        raise SystemExit(f"{SOURCE}: run benchmarks/scale.py first (it generates the model)")
    proc = psutil.Process()
    phase, peaks = ["other"], {}

    def sample():
        while True:
            r, k = proc.memory_info().rss, phase[0]
            peaks[k] = max(peaks.get(k, 0), r)
            time.sleep(0.01)

    def wrap(owner, name, label):
        f = getattr(owner, name)

        def run(*a, **k):
            prev, phase[0] = phase[0], label
            try:
                return f(*a, **k)
            finally:
                phase[0] = prev
        setattr(owner, name, run)

    wrap_each(PHASES, wrap)
    class Marks(layershare.Callback):
        def on_group_start(self, stage, group, blocks):
            peaks.setdefault(BASE, proc.memory_info().rss)
            phase[0] = "the driver, between those phases"

        def on_stage_end(self, stage, report):
            phase[0] = "assembling the output"

    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        model = two_block_copy(Path(tmp) / "dense2")
        phase[0] = "setup (skeleton, calibration, staging)"
        t0 = time.time()
        layershare.compress_checkpoint(
            model, layershare.Recipe(stages=[layershare.FiPSConfig(rank=RANK, steps=5, group_size=1)],
                                     nsamples=8, seqlen=256),
            data="austen:emma", tokenizer=AutoTokenizer.from_pretrained(model), output_dir=Path(tmp) / "out",
            callbacks=[Marks()])
        phase[0] = "after"
        time.sleep(0.05)
        wall = time.time() - t0
    order = [label for _, _, label in PHASES]
    order = ["other", "setup (skeleton, calibration, staging)", PHASES[0][2], BASE] + order[1:] + [
        "the driver, between those phases", "assembling the output"]
    rows = sorted(((k, v) for k, v in peaks.items() if k in order), key=lambda kv: order.index(kv[0]))
    rows = [("importing the libraries" if k == "other" else k, v) for k, v in rows]
    print(f"2-block model, FiPS rank {RANK}, 5 steps: {wall:.0f} s")
    for k, v in rows:
        print(f"  {k:45s} {v / 2**30:.2f} GiB")
    path = ROOT / "docs" / "scale.json"
    results = json.loads(path.read_text())
    results["profile"] = {"date": time.strftime("%Y-%m-%d"), "peaks": dict(rows)}
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
