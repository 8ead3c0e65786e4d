"""`layershare compress | eval | info`: the command line over api.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .recipe import Recipe


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe; command-line options override its fields")
    p.add_argument("--method", help="compression method (default fips)")
    p.add_argument("--ratio", type=float, help="fraction of parameters to remove (default 0.2)")
    p.add_argument("--ratio-of", choices=["model", "mlp", "attention"],
                   help="ratio of the whole model's parameters or of the part compressed (MLPs; attention for masa)")
    p.add_argument("--attention-method", help="also compress the attention with this method (masa), run first")
    p.add_argument("--attention-ratio", type=float, help="fraction of the attention parameters it removes")
    p.add_argument("--group-size", type=int, help="adjacent blocks sharing one basis")
    p.add_argument("--sparsity", type=float, help="fraction of V entries pruned")
    p.add_argument("--schedule", choices=["gradual", "static"])
    p.add_argument("--steps", type=int, help="optimiser steps per group")
    p.add_argument("--lr", type=float)
    p.add_argument("--nsamples", type=int, help="calibration windows")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="storage dtype")
    p.add_argument("--device")
    p.add_argument("--seed", type=int)


def _recipe(args) -> Recipe:
    base = Recipe.from_yaml(args.recipe).to_dict() if args.recipe else Recipe().to_dict()
    for key in ("method", "ratio", "ratio_of", "group_size", "sparsity", "schedule", "steps", "lr",
                "nsamples", "seqlen", "dtype", "device", "seed"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.attention_method or args.attention_ratio is not None:
        att = dict(base.get("attention") or {})
        if args.attention_method:
            att["method"] = args.attention_method
        if args.attention_ratio is not None:
            att.update(ratio=args.attention_ratio, ratio_of="attention")
        base["attention"] = att
    return Recipe.from_dict(base)


def cmd_compress(args) -> int:
    import layershare
    from layershare.api import plan_stages
    from layershare.io import check_output_dir

    recipe = _recipe(args)
    check_output_dir(args.output, args.overwrite)
    print(f"loading {args.model} ...", flush=True)
    model, tok = layershare.load_model(args.model)
    # checked here too so a bad budget fails before the dense evaluation
    plan_stages(model, recipe)
    dense_ppl = None
    if args.eval_text:
        dense_ppl = layershare.evaluate_perplexity(model, tok, args.eval_text, seqlen=args.eval_seqlen)
    result = layershare.compress(model, recipe, data=args.calib, tokenizer=tok, output_dir=args.output,
                                 overwrite=args.overwrite)
    s = result.sizes
    print(f"\n{recipe.method} on {args.model}: target ratio {recipe.ratio} of the {recipe.ratio_of}'s parameters")
    print(f"  compression time    {result.report.seconds:,.1f} s")
    print(f"  parameters          dense {s.dense_params:,}  ->  stored {s.param_equivalents:,.0f} "
          f"(values {s.stored_values:,} + bitmask {s.index_bytes:,} bytes)  =  {s.ratio:.2%} fewer")
    weights = result.output_dir / "model.safetensors"
    disk = weights.stat().st_size
    print(f"  weights on disk     dense {_human(s.dense_bytes)} ({recipe.dtype})  ->  {_human(disk)}  "
          f"=  {1 - disk / s.dense_bytes:.2%} smaller")
    if args.eval_text:
        comp_ppl = layershare.evaluate_perplexity(result.model, tok, args.eval_text, seqlen=args.eval_seqlen)
        print(f"  perplexity on {args.eval_text}: dense {dense_ppl.ppl:.3f} -> compressed {comp_ppl.ppl:.3f}")
        print(f"    protocol: {comp_ppl.protocol}")
        meta_file = result.output_dir / "layershare.json"
        meta = json.loads(meta_file.read_text())
        meta["eval"] = {"text": args.eval_text, "dense_ppl": dense_ppl.ppl, "ppl": comp_ppl.ppl,
                        "protocol": comp_ppl.protocol}
        meta_file.write_text(json.dumps(meta, indent=2, default=str))
    print(f"  saved to {result.output_dir}")
    return 0


def cmd_eval(args) -> int:
    import layershare
    from layershare.io import read_meta

    path = Path(args.model)
    if path.is_dir() and (path / "layershare.json").exists():
        read_meta(path)
        from transformers import AutoTokenizer

        model, tok = layershare.load(path), AutoTokenizer.from_pretrained(path)
    else:
        model, tok = layershare.load_model(args.model)
    ppl = layershare.evaluate_perplexity(model, tok, args.text, seqlen=args.seqlen)
    print(f"{args.model}: perplexity {ppl.ppl:.3f} on {args.text}")
    print(f"  protocol: {ppl.protocol}")
    return 0


def cmd_info(args) -> int:
    from layershare.io import read_meta

    config, meta = read_meta(args.dir)
    entry = config["layershare"]
    s = meta.get("sizes", {})
    print(f"{args.dir}: {config.get('model_type')} compressed with {meta.get('method')}")
    if s:
        print(f"  parameters  dense {s['dense_params']:,} -> stored {s['param_equivalents']:,.0f} "
              f"({s['ratio']:.2%} fewer; bitmask {s['index_bytes']:,} bytes counted)")
    print(f"  weights file {meta['weights_bytes']:,} bytes; dtype {entry['dtype']}")
    print(f"  shared bases/atoms {len(entry['bases'])}, compressed linears {len(entry['layers'])}, "
          f"tied modules {len(entry.get('tied', {}))}")
    if "window" in meta:
        print(f"  merged MLPs of blocks {meta['window']} (one MLP, tied)")
    if "attention" in meta:
        a = meta["attention"]
        print(f"  attention: {a['method']}, {a['ratio']:.2%} of the model's parameters removed")
    for g in meta.get("groups", []):
        print(f"    blocks {g['blocks']}: rank {g['rank']}, nnz {g['nnz']:,}, "
              f"rel. error {g['rel_err_before']:.4f} -> {g['rel_err_after']:.4f} ({g['seconds']:.0f} s)")
    if "eval" in meta:
        e = meta["eval"]
        print(f"  perplexity on {e['text']}: dense {e['dense_ppl']:.3f} -> {e['ppl']:.3f} ({e['protocol']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layershare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("model", help="alias (smollm2-135m, gemma3-270m), a local HF directory or a .gguf file")
    c.add_argument("--calib", required=True, help="calibration text: file, folder, saved dataset, hf:NAME, austen:BOOK")
    c.add_argument("--output", required=True, help="output directory (refused if it exists, unless --overwrite)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--eval-text", help="also report dense and compressed perplexity on this text")
    c.add_argument("--eval-seqlen", type=int, help="evaluation window (default: model context, at most 2048)")
    _add_recipe_args(c)
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity of a compressed directory or a dense model")
    e.add_argument("model")
    e.add_argument("--text", required=True)
    e.add_argument("--seqlen", type=int)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="what a compressed directory holds")
    i.add_argument("dir")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"layershare: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
