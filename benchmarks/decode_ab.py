"""Decode speed side by side: the dense model and compressed ones loaded in ONE process, timed in
alternation over several rounds (medians), so that a host whose speed drifts (this project's
2-core machine moves by 20% within minutes) moves every row alike.

benchmarks/runtime.py measures each model once, in a fresh process, one after another: the
right place for load time, memory and prefill, but its decode ratios inherit the drift between
rows. Here each round times every model at one and at eight sequences (greedy generation of
`--new-tokens` tokens after a 16-token prompt, after a warm-up); a row reports the median tok/s
over rounds and the median of its per-round ratios to the dense model of that round.
The quality of the very models timed is reported beside: perplexity on the first `--ppl-windows`
windows of the test book (the prompt path), and of 8 x 64 test tokens fed one token at a time
with the KV cache (the products at 8 rows that decoding runs).

  python benchmarks/decode_ab.py --labels "fips, bf16 file" "rtn 4-bit, bf16 file" --dtypes float32 bfloat16

The compressed directories are benchmarks/runtime.py's (out/runtime/<model>/<label>_<ratio>):
run it first. Results: docs/decode_ab.json (one entry per dtype and run) and a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import OUT, TEST, dense_dir, host_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "decode_ab.json"


def load(path: Path, dtype, dense: bool):
    from transformers import AutoModelForCausalLM

    import layershare

    if dense:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return layershare.load(path, dtype=dtype)


def tok_s(model, batch: int, new_tokens: int) -> float:
    import torch

    ids = torch.randint(0, 1000, (batch, 16), generator=torch.Generator().manual_seed(batch))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, **kw)
    return batch * new_tokens / (time.perf_counter() - t)


def decode_path_ppl(model, ids, batch: int = 8, tokens: int = 64) -> float:
    """Perplexity of `batch` sequences of `tokens` test tokens fed one token at a time with the KV
    cache: the products at `batch` rows that decoding runs (the windowed perplexity runs the prompt
    path), so the quality of the very path timed."""
    import math

    import torch

    from transformers import DynamicCache

    x = ids[: batch * tokens].view(batch, tokens)
    cache, logits = DynamicCache(config=model.config), []
    with torch.inference_mode():
        for t in range(tokens - 1):
            logits.append(model(x[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1].float())
    lp = torch.log_softmax(torch.stack(logits, 1), -1)
    return math.exp(-lp.gather(-1, x[:, 1:, None]).mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--labels", nargs="+", required=True, help="benchmarks/runtime.py variants, compressed already")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-windows", type=int, default=2)
    ap.add_argument("--note", default="", help="recorded with the results (what build, what else ran)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import layershare
    from layershare.data.text import read_text, tokenize
    from layershare.runtime.kernels import ops

    dirs = {"dense": dense_dir(args.model)}
    for label in args.labels:
        path = OUT / args.model / f"{label.replace(' ', '_')}_{args.ratio:g}"
        if not (path / "config.json").exists():
            sys.exit(f"{path} is missing: run benchmarks/runtime.py --variants {label!r} first")
        dirs[label] = path
    tok = layershare.load_preprocessing(dirs[args.labels[0]])
    ids = tokenize(tok, read_text(TEST))
    entries = []
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        models = {k: load(p, dtype, k == "dense") for k, p in dirs.items()}
        for m in models.values():  # warm-up: every weight page touched, the kernels' buffers made
            tok_s(m, 1, 4), tok_s(m, 8, 4)
        speed = {(k, b): [] for k in models for b in (1, 8)}
        for r in range(args.rounds):
            for k, m in models.items():
                for b in (1, 8):
                    speed[k, b].append(tok_s(m, b, args.new_tokens))
            print(f"{dt} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {speed[k, 1][-1]:.1f}/{speed[k, 8][-1]:.1f}" for k in models), flush=True)
        rows = []
        for k, m in models.items():
            row = {"label": k}
            for b in (1, 8):
                row[f"decode_b{b}_tok_s"] = statistics.median(speed[k, b])
                row[f"vs_dense_b{b}"] = statistics.median(s / d for s, d in zip(speed[k, b], speed["dense", b]))
            if args.ppl_windows:
                row["ppl_slice"] = layershare.evaluate_perplexity(m, tok, ids, seqlen=2048,
                                                                  max_windows=args.ppl_windows).ppl
            row["ppl_decode_b8"] = decode_path_ppl(m, ids)
            rows.append(row)
        entries.append({"model": args.model, "dtype": dt, "threads": args.threads, "rounds": args.rounds,
                        "new_tokens": args.new_tokens, "ratio": args.ratio, "ppl_windows": args.ppl_windows,
                        "date": time.strftime("%Y-%m-%d"), "cpu": host_cpu(),
                        "kernel": ops.isa() + (f" ({ops.spread()})" if ops.isa() == "avx512" else ""),
                        "note": args.note, "rows": rows})
        del models
    path = Path(args.results)
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + entries, indent=2))
    print("| loaded in | model | decode b1 tok/s | vs dense | decode b8 tok/s | vs dense | ppl (slice) | "
          "ppl (decode path, 8 x 64) |")
    print("|---|---|---|---|---|---|---|---|")
    for e in entries:
        for row in e["rows"]:
            ppl = row.get("ppl_slice", float("nan"))
            print(f"| {e['dtype']} | {row['label']} | {row['decode_b1_tok_s']:.1f} | {row['vs_dense_b1']:.2f}x | "
                  f"{row['decode_b8_tok_s']:.1f} | {row['vs_dense_b8']:.2f}x | {ppl:.2f} | "
                  f"{row['ppl_decode_b8']:.2f} |")


if __name__ == "__main__":
    main()
