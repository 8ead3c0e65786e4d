"""Does every method compress, save, reload and run on a GPU, and agree with the CPU?

On tiny models built from configs (no downloads): each method compresses the same model with
the same recipe and calibration tokens on the CPU and on DEVICE; the table gives the largest
logit difference between the two compressed models (relative to the logits' scale), the same
difference between the GPU model and itself saved and reloaded on the GPU, and both times. Needs a GPU:

    python benchmarks/device_check.py [--device cuda] [--out docs/device_check.md]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import layershare

FIPS = dict(method="fips", batch_tokens=256)
RECIPES = {  # name -> stages (tiny: 4 layers, hidden 64)
    "fips": [dict(FIPS, ratio=0.3, steps=30)],
    "fips (svd init, static)": [dict(FIPS, ratio=0.3, steps=30, init="svd", schedule="static")],
    "fips + propagate compressed": [dict(FIPS, ratio=0.3, steps=30, propagate="compressed")],
    "svd": [dict(method="svd", ratio=0.3)],
    "svd-llm + update": [dict(method="svd-llm", ratio=0.3, update=True)],
    "basis-sharing (0.4: update)": [dict(method="basis-sharing", ratio=0.4)],
    "basis-sharing + attention": [dict(method="basis-sharing-attention", ratio=0.1),
                                  dict(method="basis-sharing", ratio=0.2)],
    "fips + masa": [dict(method="masa", ratio=0.1), dict(FIPS, ratio=0.2, steps=30)],
    "ffn-merge": [dict(method="ffn-merge", ratio=0.2)],
    "masa": [dict(method="masa", ratio=0.1)],
}
ARCHS = ("llama", "gemma3")  # the tests' tiny configs (tests/conftest.py), vocabulary 256
VOCAB = 256


def tiny(arch: str) -> torch.nn.Module:
    from layershare.testing import make_model

    return make_model(arch, vocab=VOCAB)


def compressed_logits(model, stages: list[dict], tokens, ids, device: str, tmp: Path):
    recipe = layershare.Recipe(stages=stages, nsamples=16, seqlen=64, device=device)
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.time()
    result = layershare.compress(model, recipe, data=tokens, output_dir=tmp,
                                 allow_ratio_miss=True)  # tiny models: the budget lands 1-5 points off
    seconds = time.time() - t0
    with torch.no_grad():
        logits = result.model(ids.to(device)).logits.float().cpu()
        reloaded = layershare.load(tmp, device=device)(ids.to(device)).logits.float().cpu()
    return logits, rel_diff(reloaded, logits), seconds, result.sizes.ratio


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="docs/device_check.md")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (8192,), generator=g)
    ids = torch.randint(0, VOCAB, (2, 48), generator=g)
    lines = [f"# Methods on a GPU ({name}) vs the CPU", "",
             "Tiny models from configs (4 layers, hidden 64), same recipe and calibration tokens on both; "
             "`max |gpu - cpu| / max |cpu|` over the logits of a 2 x 48 batch; round trip: the same between the "
             "GPU model and itself saved and reloaded on the GPU (bit-identical on the CPU: tests/test_io.py). "
             "Written by `benchmarks/device_check.py`.", "",
             "| arch | method | ratio | logit diff gpu vs cpu | round trip on gpu | cpu time | gpu time |",
             "|---|---|---|---|---|---|---|"]
    failures = 0
    for arch in ARCHS:
        for label, fields in RECIPES.items():
            base = tiny(arch)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    cpu, _, t_cpu, ratio = compressed_logits(copy.deepcopy(base), fields, tokens, ids, "cpu",
                                                             Path(tmp) / "cpu")
                    gpu, trip, t_gpu, _ = compressed_logits(copy.deepcopy(base), fields, tokens, ids, args.device,
                                                             Path(tmp) / "gpu")
                diff = rel_diff(gpu, cpu)
                row = f"| {arch} | {label} | {ratio:.1%} | {diff:.1e} | {trip:.1e} | {t_cpu:.1f} s | {t_gpu:.1f} s |"
                failures += trip > 1e-5 or diff > 1e-2
            except Exception as e:  # report every method, not only the first that breaks
                row = f"| {arch} | {label} | - | FAILED: {type(e).__name__}: {str(e)[:120]} | - | - | - |"
                failures += 1
            print(row, flush=True)
            lines.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}; {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
