"""`layershare compress | eval | finetune | info`: the command line over api.py."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from layershare.config import RecipeError

# flags that set a field of the main stage (when its method has that field), and the run's own
STAGE_FLAGS = ("ratio", "ratio_of", "group_size", "pattern", "sparsity", "schedule", "prune_score", "init", "objective",
               "steps", "lr")
RUN_FLAGS = ("nsamples", "seqlen", "dtype", "device", "seed")
DEFAULT_PROMPT = "It is a truth universally acknowledged"


def _at_least(low: int):
    """An argparse type: a whole number >= low (refused at parse time, before anything loads)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _positive(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (exit 2)."""

    def error(self, message):
        self.exit(2, f"layershare: error: {message} (see `{self.prog} --help`)\n")


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def _config_of(name: str) -> dict | None:
    """config.json of a local model directory (dense or compressed), read without loading it."""
    path = Path(name) / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _context(config) -> int | None:
    """The model's context (positions) from its config (a dict or a transformers config)."""
    if config is None:
        return None
    if not isinstance(config, dict):
        config = {k: getattr(config, k, None) for k in CONTEXT_KEYS}
    for sub in (config, config.get("text_config") or {}):
        for k in CONTEXT_KEYS:
            if isinstance(sub.get(k), int) and not isinstance(sub.get(k), bool):
                return sub[k]
    return None


def _check_seqlen(flag: str, seqlen: int | None, config, name: str) -> None:
    context = _context(config)
    if seqlen is not None and context is not None and seqlen > context:
        raise ValueError(f"{flag} {seqlen} is longer than the context of {name} ({context} tokens): positions past "
                         f"it were never trained; use {flag} {context} or less")


def _check_sources(*flags: tuple[str, str | None]) -> None:
    """Local inputs exist (before any model loads); 'name:spec' sources are checked when read."""
    for flag, source in flags:
        if source and ":" not in source and not Path(source).exists():
            raise FileNotFoundError(f"{flag} {source!r}: no such file or directory")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe (its stages and run settings); options below override it")
    p.add_argument("--preset", choices=["quick", "default"],
                   help="quick: a few-minute FiPS recipe (fewer calibration windows and tuning steps); "
                        "default: the library's defaults")
    p.add_argument("--method", help="compression method of the (last) stage (default fips; none: no sharing, "
                                    "with --bits)")
    p.add_argument("--ratio", type=float, help="fraction of parameters to remove (default 0.2)")
    p.add_argument("--ratio-of", help="'model' (default) or the part the method compresses ('mlp'; 'attention')")
    p.add_argument("--attention-method",
                   help="also compress the attention with this method (masa, basis-sharing-attention), run first")
    p.add_argument("--attention-ratio", type=float, help="fraction of the attention parameters it removes (default: "
                                                         "the method's default ratio, 0.2, of the attention)")
    p.add_argument("--group-size", type=int, help="adjacent blocks per group (sharing one basis)")
    p.add_argument("--pattern", help="FiPS: V's sparsity pattern: auto (default), unstructured, 2:4, 1:4, none "
                                     "(dense V, fastest at run time; docs/runtime.md)")
    p.add_argument("--sparsity", type=float, help="FiPS: fraction of V entries pruned (unstructured pattern; default: "
                   "the sparsity that puts the rank at the model width, 0.4-0.8)")
    p.add_argument("--schedule", help="FiPS: gradual (default) or static pruning")
    p.add_argument("--prune-score",
                   help="FiPS: rank V entries by the output change they cause (activation, default) or by |V| (magnitude)")
    p.add_argument("--init", help="FiPS init: SVD of the data-whitened weights (whitened, default) or of the weights (svd)")
    p.add_argument("--objective", help="FiPS: what the tuning matches (auto, mlp, residual, block)")
    p.add_argument("--steps", type=int, help="FiPS: optimiser steps per group")
    p.add_argument("--lr", type=float, help="FiPS: learning rate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any option of the (last) stage's method, e.g. --set update=true, --set rank=64 "
                        "(the value is read as YAML); repeatable")
    p.add_argument("--nsamples", type=int, help="calibration windows (text) or images")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window")
    p.add_argument("--dtype", help="storage dtype: float32 (default), bfloat16, float16")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N")
    p.add_argument("--seed", type=int)


def _stage_options(args) -> dict:
    """The main stage's fields given on the command line (flags and --set)."""
    fields = {k: getattr(args, k) for k in STAGE_FLAGS if getattr(args, k, None) is not None}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise RecipeError(f"--set takes KEY=VALUE, got {item!r}")
        fields[key.replace("-", "_")] = yaml.safe_load(value)
    return fields


def build_recipe(args):
    """The recipe the flags describe: --recipe or --preset, then the flags on top. A flag that
    is not an option of the stage's method is an error (it would do nothing)."""
    from layershare.methods import config_class
    from layershare.recipe import PRESETS, Recipe

    if args.recipe and args.preset:
        raise RecipeError("give --recipe or --preset, not both")
    base = Recipe.from_yaml(args.recipe) if args.recipe else PRESETS[args.preset or "default"]()
    d = base.to_dict()
    quant_stage = d["stages"].pop() if d["stages"][-1]["method"] == "quant" and len(d["stages"]) > 1 else None
    if getattr(args, "method", None) == "none":  # quantization alone: the flags of --bits describe the only stage
        return _quant_only(args, d, RUN_FLAGS, Recipe)
    main = dict(d["stages"][-1])
    if args.method and args.method != main["method"]:
        main = {"method": args.method, **{k: main[k] for k in ("ratio", "ratio_of") if k in main}}
    given = _stage_options(args)
    options = config_class(main["method"]).field_names()
    flag_of = {k: "--" + k.replace("_", "-") for k in STAGE_FLAGS}
    wrong = [flag_of.get(k, f"--set {k}") for k in given if k not in options]
    if wrong:
        raise RecipeError(f"{', '.join(wrong)}: not an option of method {main['method']!r} "
                          f"(its options: {', '.join(options)})")
    main.update(given)
    stages = d["stages"][:-1] + [main]
    if args.attention_method or args.attention_ratio is not None:
        att = dict(stages[0]) if len(stages) > 1 else {"method": args.attention_method or "masa"}
        if args.attention_method and args.attention_method != att["method"]:
            att = {"method": args.attention_method}
        if args.attention_ratio is not None:
            att.update(ratio=args.attention_ratio, ratio_of="attention")
        elif "ratio" not in att and config_class(att["method"]).part == "attention":
            att["ratio_of"] = "attention"  # its default ratio is of the attention, as --attention-ratio's would be
        stages = [att, main]
    quant = _quant_stage(args, quant_stage)
    if getattr(args, "quant", None) == "qat":
        if main["method"] != "fips":
            raise RecipeError(f"--quant qat trains through fake quantization inside FiPS's tuning; method "
                              f"{main['method']!r} has no tuning loop (use --quant rtn or gptq)")
        main.update(qat_bits=quant["bits"], qat_group_size=quant["group_size"], qat_symmetric=quant["symmetric"])
    if quant is not None:
        stages = stages + [quant]
    d["stages"] = stages
    for k in RUN_FLAGS:
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    return Recipe.from_dict(d)


def _quant_stage(args, base: dict | None) -> dict | None:
    """The quantization stage --bits adds after the method (--quant: how the codes are chosen,
    sequential GPTQ by default; qat: the method tunes through fake quantization, then round to
    nearest)."""
    if getattr(args, "bits", None) is None:
        if getattr(args, "quant", None) is not None or getattr(args, "quant_group", None) is not None:
            raise RecipeError("--quant and --quant-group need --bits")
        return base
    stage = {"method": "quant", **(base or {}), "bits": args.bits}
    if args.quant_group is not None:
        stage["group_size"] = args.quant_group
    if args.quant is not None:
        stage["algorithm"] = "rtn" if args.quant == "qat" else args.quant
    if args.quant == "qat":
        stage.setdefault("basis_bits", None)  # U stored on the grid FiPS trained it through (qat_bits)
    from layershare.methods import QuantConfig

    return QuantConfig.from_dict(stage).to_dict()  # validated now, before any work


def _quant_only(args, d: dict, run_flags, recipe_cls):
    given = _stage_options(args)  # --set KEY=VALUE: the quantization stage's own options (damp, act_order, ...)
    flags = sorted("--" + k.replace("_", "-") for k in STAGE_FLAGS if k in given)
    if flags or args.attention_method or args.attention_ratio is not None:
        raise RecipeError(f"--method none quantizes the dense model: {', '.join(flags) or 'attention flags'} "
                          f"do not apply")
    if args.bits is None:
        raise RecipeError("--method none does nothing without --bits (quantization alone)")
    if args.quant == "qat":
        raise RecipeError("--quant qat trains inside FiPS's tuning: it needs --method fips")
    d["stages"] = [_quant_stage(args, given)]
    for k in run_flags:
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    return recipe_cls.from_dict(d)


def _full_command(args) -> str:
    """The command that runs the same job with the full recipe and the whole evaluation text."""
    import shlex

    parts = ["layershare", "compress", args.model, "--calib", args.calib, "--output", args.output + "-full"]
    skip = {"preset", "eval_windows", "nsamples", "seqlen", "steps", "command", "func", "model", "calib", "output",
            "overwrite"}
    defaults = vars(build_parser().parse_args(["compress", args.model, "--calib", args.calib, "--output", args.output]))
    for k, v in vars(args).items():
        if k in skip or v == defaults[k]:
            continue
        flag = "--" + k.replace("_", "-")
        values = v if isinstance(v, list) else [v]
        parts += [flag] if v is True else [x for item in values for x in (flag, str(item))]
    return " ".join(shlex.quote(p) for p in parts)


def check_apart(model: str, output: str) -> None:
    """The output may not be the input model, lie inside it or hold it (--overwrite would destroy it)."""
    src = Path(model)
    if not src.exists():
        return
    src, out = src.resolve(), Path(output).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ValueError(f"--output {output!r} {'is' if out == src else 'overlaps'} the input model {model!r}: "
                         f"choose a directory apart from it")


def cmd_compress(args) -> int:
    import time

    import torch

    import layershare
    from layershare.adapters import get_adapter
    from layershare.api import preflight
    from layershare.checkpoint.outputs import check_output_dir

    from layershare.checkpoint.save import shard_size

    t_start = time.time()
    shard_size(args.max_shard_size)  # every option that can be checked is, before any model loads
    recipe = build_recipe(args)
    recipe.check_device()
    if args.onload or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return cmd_compress_onloaded(args, recipe, t_start)
    check_output_dir(args.output, args.overwrite)
    check_apart(args.model, args.output)
    _check_lengths(args, recipe)
    _check_sources(("--calib", args.calib), ("--eval-text", args.eval_text), ("--eval-images", args.eval_images))
    t0 = time.time()
    model, prep = layershare.load_model(args.model)
    print(f"loaded {args.model} in {time.time() - t0:.1f} s", flush=True)
    _check_seqlen("--eval-seqlen", args.eval_seqlen, getattr(model, "config", None), args.model)
    task = get_adapter(model).task
    if args.task and args.task != task:
        raise ValueError(f"--task {args.task}: {args.model} is a {task} model")
    if args.eval_text and task != "causal-lm" or args.eval_images and task != "image-classification":
        raise ValueError(f"{args.model} is a {task} model: use "
                         f"{'--eval-images' if task == 'image-classification' else '--eval-text'}")
    if task == "causal-lm":  # read (and refuse bad text) before any model pass, not after the dense evaluation
        from layershare.data.text import read_text

        for source in (args.calib, args.eval_text):
            if source:
                read_text(source)
    # a bad budget, a missed ratio or too little disk space fail before the dense evaluation
    stages, _ = preflight(model, recipe, args.output, args.overwrite, args.allow_ratio_miss)
    for st in stages:
        print(f"  stage {st.index + 1}: {st.method.name} on {st.method.part}, {len(st.groups)} group(s), "
              f"{st.plan.model_ratio:.2%} of the model's parameters removed", flush=True)
    vision = task == "image-classification"
    dense_eval = _evaluate(model, prep, args.eval_text, args.eval_images, args.eval_seqlen, args.eval_windows,
                           "dense")
    kw = {"processor": prep} if vision else {"tokenizer": prep}
    result = layershare.compress(model, recipe, data=args.calib, output_dir=args.output,
                                 overwrite=args.overwrite, source=args.model,
                                 allow_ratio_miss=args.allow_ratio_miss, max_shard_size=args.max_shard_size, **kw)
    del model, result.model
    s = result.sizes
    removed = ", ".join(f"{st.method} {st.plan.model_ratio:.2%}" for st in result.report.stages)
    print(f"\n{recipe.method} on {args.model}: {removed} of the model's parameters removed")
    print(f"  compression time    {result.report.seconds:,.1f} s")
    print(f"  parameters          dense {s.dense_params:,}  ->  stored {s.param_equivalents:,.0f} "
          f"(values {s.stored_values:,} + bitmask {s.index_bytes:,} bytes)  =  {s.ratio:.2%} fewer")
    for miss in json.loads((result.output_dir / "layershare.json").read_text()).get("ratio_missed", []):
        print(f"  WARNING: RATIO MISSED: {miss} (accepted by --allow-ratio-miss; kept in layershare.json)")
    disk = sum(p.stat().st_size for p in result.output_dir.glob("*.safetensors"))
    change = f"{1 - disk / s.dense_bytes:.2%} smaller" if disk <= s.dense_bytes else \
        f"{disk / s.dense_bytes - 1:.2%} LARGER than dense (the ratio is too small to pay for the format)"
    print(f"  weights on disk     dense {_human(s.dense_bytes)} ({recipe.dtype})  ->  {_human(disk)}  =  {change}")
    print(f"  saved to {result.output_dir}; reloading it from disk ...", flush=True)
    loaded = layershare.load(result.output_dir, runtime=args.runtime)
    if dense_eval is not None:
        comp_eval = _evaluate(loaded, prep, args.eval_text, args.eval_images, args.eval_seqlen, args.eval_windows,
                              "compressed")
        _record_eval(result.output_dir, args.eval_text or args.eval_images, dense_eval, comp_eval)
    if task == "causal-lm" and args.prompt:
        ids = prep(args.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                  do_sample=False, pad_token_id=prep.eos_token_id)
        print(f"  the reloaded model continues {args.prompt!r}:\n    {prep.decode(out[0], skip_special_tokens=True)!r}")
    print(f"  done in {time.time() - t_start:,.0f} s")
    if args.preset == "quick" or args.eval_windows:
        print("\nThis was the quick recipe" if args.preset == "quick" else "\nThe evaluation used a slice of the text",
              "(see above). The full recipe and the whole-text evaluation:\n  " + _full_command(args))
    return 0


def _check_lengths(args, recipe) -> None:
    """--seqlen and --eval-seqlen against the context in a local model's config.json (before it
    loads; an alias or a .gguf file is checked once loaded)."""
    config = _config_of(args.model)
    if config is not None and not config.get("layershare"):
        _check_seqlen("--seqlen", recipe.seqlen, config, args.model)
        _check_seqlen("--eval-seqlen", args.eval_seqlen, config, args.model)


def cmd_compress_onloaded(args, recipe, t_start: float) -> int:
    """compress --onload (and every torchrun process): onload.compress_checkpoint."""
    import time

    from transformers import AutoTokenizer

    from layershare.compression.onload import OnloadError, compress_checkpoint, world

    refused = [flag for flag, given in (("--eval-text", args.eval_text), ("--eval-images", args.eval_images),
                                        ("--max-shard-size", args.max_shard_size)) if given]
    if refused:
        raise OnloadError(f"{', '.join(refused)}: not with --onload, which writes one shard per group and never "
                          f"holds the dense model; evaluate the output afterwards (layershare eval OUT --text ...)")
    if not Path(args.model).is_dir():
        raise OnloadError(f"--onload reads a local transformers directory; {args.model!r} is not one (an alias or "
                          f".gguf file: load it and save_pretrained it first)")
    from layershare.checkpoint.outputs import check_output_dir

    check_output_dir(args.output, args.overwrite)
    check_apart(args.model, args.output)
    _check_lengths(args, recipe)
    _check_sources(("--calib", args.calib))
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    rank, world_size, _ = world()
    result = compress_checkpoint(args.model, recipe, data=args.calib, tokenizer=tokenizer, output_dir=args.output,
                                 overwrite=args.overwrite, source=args.model, allow_ratio_miss=args.allow_ratio_miss)
    if rank != 0:
        return 0
    s = result.sizes
    print(f"\n{recipe.method} on {args.model} (onloaded, {world_size} process(es)): {s.ratio:.2%} of the model's "
          f"parameters removed")
    print(f"  compression time    {result.report.seconds:,.1f} s (this process)")
    print(f"  parameters          dense {s.dense_params:,}  ->  stored {s.param_equivalents:,.0f}")
    for miss in json.loads((result.output_dir / "layershare.json").read_text()).get("ratio_missed", []):
        print(f"  WARNING: RATIO MISSED: {miss} (accepted by --allow-ratio-miss; kept in layershare.json)")
    disk = sum(p.stat().st_size for p in result.output_dir.glob("*.safetensors"))
    print(f"  weights on disk     {_human(disk)} in {len(list(result.output_dir.glob('*.safetensors')))} shards")
    print(f"  saved to {result.output_dir}  (evaluate: layershare eval {result.output_dir} --text ...)")
    print(f"  done in {time.time() - t_start:,.0f} s")
    return 0


def _evaluate(model, prep, text, images, seqlen, windows=None, which=""):
    import math

    import layershare
    from layershare.evaluate.nonfinite import NonFiniteResult, watch

    with watch(model, f"the {which or 'evaluated'} model's logits are not finite"):
        if text:
            if which:
                print(f"  perplexity of the {which} model on {text} ...", flush=True)
            result = layershare.evaluate_perplexity(model, prep, text, seqlen=seqlen, max_windows=windows)
            if not math.isfinite(result.ppl):
                raise NonFiniteResult(f"the {which or 'evaluated'} model's perplexity on {text} is {result.ppl}")
            return result
        if images:
            return layershare.evaluate_accuracy(model, prep, images)
    return None


def _record_eval(out: Path, source: str, dense, comp) -> None:
    """Print dense vs compressed and keep them in layershare.json (written atomically)."""
    if hasattr(comp, "ppl"):
        print(f"  perplexity on {source}: dense {dense.ppl:.3f} -> compressed {comp.ppl:.3f}")
        entry = {"text": source, "dense_ppl": dense.ppl, "ppl": comp.ppl, "protocol": comp.protocol}
    else:
        print(f"  top-1 on {source}: dense {dense.top1:.2%} -> compressed {comp.top1:.2%} "
              f"(top-5 {dense.top5:.2%} -> {comp.top5:.2%})")
        entry = {"images": source, "dense_top1": dense.top1, "top1": comp.top1, "dense_top5": dense.top5,
                 "top5": comp.top5, "protocol": comp.protocol}
    print(f"    protocol: {comp.protocol}")
    meta_file = out / "layershare.json"
    meta = json.loads(meta_file.read_text())
    meta["eval"] = entry
    tmp = meta_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str, sort_keys=True))
    tmp.replace(meta_file)
    from layershare.checkpoint.model_card import write_model_card

    write_model_card(out)


def cmd_eval(args) -> int:
    import layershare
    from layershare.checkpoint.read import is_compressed_dir

    if args.limit is not None and not args.tasks:
        raise ValueError("--limit applies to --tasks only")
    for flag, value, applies in (("--max-windows", args.max_windows, args.text), ("--seqlen", args.seqlen, args.text),
                                 ("--max-images", args.max_images, args.images)):
        if value is not None and not applies:
            raise ValueError(f"{flag} applies to {'--text' if flag != '--max-images' else '--images'} only")
    _check_sources(("--text", args.text), ("--images", args.images))
    _check_seqlen("--seqlen", args.seqlen, _config_of(args.model), args.model)
    path = Path(args.model)
    if is_compressed_dir(path):
        model = layershare.load(path, runtime=args.runtime, verify=not args.no_verify)
        prep = layershare.load_preprocessing(path)
    else:
        model, prep = layershare.load_model(args.model)
    _check_seqlen("--seqlen", args.seqlen, getattr(model, "config", None), args.model)
    from layershare.evaluate.nonfinite import watch

    with watch(model, f"{args.model}: the logits are not finite"):
        return _run_eval(args, model, prep)


def _run_eval(args, model, prep) -> int:
    import math

    import layershare
    from layershare.evaluate.nonfinite import NonFiniteResult

    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results = layershare.evaluate_tasks(model, prep, tasks, limit=args.limit)
        print(f"{args.model}: zero-shot, lm-evaluation-harness"
              + (f" (the first {args.limit} examples of each task)" if args.limit else ""))
        print(f"  {'task':<20} {'metric':<9} {'accuracy ± stderr':<18} {'n':>6}")
        for r in results:
            print(f"  {r.task:<20} {r.metric:<9} {f'{r.value:.2%} ± {r.stderr:.2%}':<18} {r.n:>6}")
        return 0
    if args.images:
        acc = layershare.evaluate_accuracy(model, prep, args.images, max_images=args.max_images)
        print(f"{args.model}: top-1 {acc.top1:.2%}, top-5 {acc.top5:.2%} on {args.images}")
        print(f"  protocol: {acc.protocol}")
        return 0
    ppl = layershare.evaluate_perplexity(model, prep, args.text, seqlen=args.seqlen, max_windows=args.max_windows)
    if not math.isfinite(ppl.ppl):  # finite logits, an overflowing mean loss
        raise NonFiniteResult(f"{args.model}: perplexity {ppl.ppl} on {args.text} (mean loss {ppl.nll:.4g} nats)")
    print(f"{args.model}: perplexity {ppl.ppl:.3f} on {args.text}")
    print(f"  protocol: {ppl.protocol}")
    return 0


def cmd_finetune(args) -> int:
    import torch

    import layershare
    from layershare.checkpoint.outputs import check_output_dir
    from layershare.checkpoint.read import read_meta
    from layershare.checkpoint.source import recorded_teacher, weight_files

    config, meta = read_meta(args.dir, verify=not args.no_verify)
    check_output_dir(args.output, args.overwrite)
    check_apart(args.dir, args.output)
    _check_sources(("--data", args.data), ("--eval-text", args.eval_text), ("--eval-images", args.eval_images))
    _check_seqlen("--seqlen", args.seqlen, config, args.dir)
    _check_seqlen("--eval-seqlen", args.eval_seqlen, config, args.dir)
    # the teacher: the one named, or the recorded one if its weights are those it was compressed from
    if args.teacher and weight_files(args.teacher) is None:
        raise FileNotFoundError(f"--teacher {args.teacher!r}: not an alias, a local directory or a .gguf file")
    teacher_name = args.teacher or recorded_teacher(meta, args.dir)
    check_apart(teacher_name, args.output)
    teacher_config = _config_of(teacher_name)
    if teacher_config is not None:
        vocab = config.get("vocab_size"), teacher_config.get("vocab_size")
        if None not in vocab and vocab[0] != vocab[1]:
            raise ValueError(f"the teacher {teacher_name} has a vocabulary of {vocab[1]:,} tokens, {args.dir} one of "
                             f"{vocab[0]:,}: distil from the dense model it was compressed from")
    q = config["layershare"].get("quant")
    if q:
        print(f"{args.dir} is quantized ({q['bits']}-bit): quantization-aware fine-tuning, its {len(q['tensors'])} "
              f"quantized tensors trained through fake quantization and stored again at {q['bits']} bits", flush=True)
    print(f"loading {args.dir} and the teacher {teacher_name} ...", flush=True)
    # trained in float32 whatever the storage dtype (saved at that dtype again)
    model = layershare.load(args.dir, runtime="compact", verify=not args.no_verify, dtype=torch.float32)
    prep = layershare.load_preprocessing(args.dir)
    teacher, _ = layershare.load_model(teacher_name)
    stats = layershare.finetune(model, teacher, args.data, prep, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, temperature=args.temperature, label_weight=args.label_weight,
                                max_samples=args.max_samples, seqlen=args.seqlen, seed=args.seed,
                                output_dir=args.output, overwrite=args.overwrite, meta=meta, device=args.device)
    print(f"fine-tuned {stats.steps} steps in {stats.seconds:,.1f} s: distillation loss "
          f"{stats.loss_before:.4f} -> {stats.loss_after:.4f}; saved to {args.output}")
    if args.eval_text or args.eval_images:
        dense_eval = _evaluate(teacher, prep, args.eval_text, args.eval_images, args.eval_seqlen)
        comp_eval = _evaluate(model, prep, args.eval_text, args.eval_images, args.eval_seqlen)
        _record_eval(Path(args.output), args.eval_text or args.eval_images, dense_eval, comp_eval)
    return 0


def _stages_of(meta: dict) -> list[dict]:
    """The stages of layershare.json; directories saved before 2026-11-27 kept the attention
    stage under "attention" and the main stage's groups and report at the top level."""
    if "stages" in meta:
        return meta["stages"]
    stages = [meta["attention"]] if "attention" in meta else []
    main = {k: meta[k] for k in ("groups", "window") if k in meta}
    ratio = meta.get("sizes", {}).get("ratio", 0.0) - sum(s.get("ratio", 0.0) for s in stages)
    return stages + [{"method": meta.get("method"), "ratio": ratio, **main}]


def cmd_info(args) -> int:
    from layershare.checkpoint.read import read_meta
    from layershare.checkpoint.verify import recorded_files

    config, meta = read_meta(args.dir, verify=not args.no_verify)
    entry = config["layershare"]
    s = meta.get("sizes", {})
    method = meta.get("method") or entry.get("method") or "a method layershare.json does not record"
    print(f"{args.dir}: {config.get('model_type')} compressed with {method}")
    if s:
        print(f"  parameters  dense {s['dense_params']:,} -> stored {s['param_equivalents']:,.0f} "
              f"({s['ratio']:.2%} fewer; bitmask {s['index_bytes']:,} bytes counted)")
    for miss in meta.get("ratio_missed", []):
        print(f"  WARNING: RATIO MISSED: {miss} (accepted with --allow-ratio-miss)")
    hashed = any(f.get("sha256") for f in recorded_files(meta).values())
    files = sorted(Path(args.dir).glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    bits = f", {total * 8 / s['dense_params']:.2f} bits per dense parameter" if s else ""
    covered = "the weights and config.json" if meta.get("config_sha256") else "the weights and the layershare entry"
    print(f"  weights {total:,} bytes in {len(files)} file(s){bits}; dtype {entry['dtype']}; "
          + (f"schema, shapes and the SHA-256 of {covered} checked" if not args.no_verify else
             "schema and shapes checked, hashes not (--no-verify" + ("" if hashed else "; none recorded") + ")"))
    print(f"  shared bases/atoms {len(entry['bases'])}, compressed linears {len(entry['layers'])}, "
          f"tied modules {len(entry.get('tied', {}))}")
    if entry.get("quant"):
        q = entry["quant"]
        print(f"  quantized: {len(q['tensors'])} tensors, {q['bits']}-bit codes, groups of {q['group_size']}, "
              f"{'symmetric' if q['symmetric'] else 'with zero points'}, 16-bit scales (all counted above)")
    for i, st in enumerate(_stages_of(meta) if meta else []):  # (without layershare.json: nothing recorded)
        print(f"  stage {i + 1}: {st['method']}, {st['ratio']:.2%} of the model's parameters removed")
        if "window" in st:
            print(f"    merged MLPs of blocks {st['window']} (one MLP, tied)")
        for g in st.get("groups", []):
            print(f"    blocks {g['blocks']}: rank {g['rank']}, nnz {g['nnz']:,}, "
                  f"rel. error {g['rel_err_before']:.4f} -> {g['rel_err_after']:.4f}"
                  + (f", {g['steps']} steps" if g.get("steps") else "") + f" ({g['seconds']:.0f} s)")
    if "finetune" in meta:
        f = meta["finetune"]
        print(f"  fine-tuned on {f['data']}: {f['steps']} steps x {f['batch_size']}, distillation loss "
              f"{f['loss_before']:.4f} -> {f['loss_after']:.4f} ({f['seconds']:.0f} s)")
    if "eval" in meta:
        e = meta["eval"]
        if "text" in e:
            print(f"  perplexity on {e['text']}: dense {e['dense_ppl']:.3f} -> {e['ppl']:.3f} ({e['protocol']})")
        else:
            print(f"  top-1 on {e['images']}: dense {e['dense_top1']:.2%} -> {e['top1']:.2%} ({e['protocol']})")
    return 0


RUNTIME_HELP = ("run-time form of the loaded compressed model: auto (sparse kernels, else factored, where smaller "
                "and faster, else merged), compact (smallest: as stored), factored, csr, merged, sparse (native "
                "kernels on the stored sparse V; docs/runtime.md)")
NO_VERIFY_HELP = "trust the directory without checking the SHA-256 recorded at save (the schema and shapes are still checked)"
RUNTIMES = ("auto", "compact", "factored", "csr", "merged", "sparse")  # runtime.RUNTIMES (not imported: the CLI starts fast)


def _version() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from layershare import __version__

    def of(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return (f"layershare {__version__} (torch {of('torch')}, transformers {of('transformers')}, "
            f"Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layershare", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("model", help="alias (smollm2-135m, gemma3-270m), a local HF directory or a .gguf file")
    c.add_argument("--calib", required=True, help="calibration text (file, folder, saved dataset, hf:NAME, austen:BOOK) or, for an image classifier, an image folder with class sub-folders")
    c.add_argument("--output", required=True, help="output directory (refused if it exists, unless --overwrite)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--bits", type=int, choices=(2, 3, 4, 8),
                   help="add weight-only quantization after the method (--method none: quantize the dense model alone)")
    c.add_argument("--quant", choices=("rtn", "gptq", "qat"),
                   help="how the codes are chosen (default gptq: sequential GPTQ, by measurement: docs/quant_llm.md; "
                        "rtn: round to nearest; qat: FiPS tunes through fake quantization)")
    c.add_argument("--quant-group", type=int, help="weights per quantization scale (default 128)")
    c.add_argument("--max-shard-size", help="split the weights into shards of at most this size (e.g. 2GB; "
                                            "transformers' model.safetensors.index.json layout)")
    c.add_argument("--onload", action="store_true",
                   help="never load the whole model: read each group's blocks from the checkpoint's safetensors "
                        "when its turn comes (models larger than memory); resumable (rerun the same command after "
                        "a crash); implied under torchrun, which splits the groups among its processes "
                        "(docs/scale.md)")
    c.add_argument("--allow-ratio-miss", action="store_true",
                   help="accept a plan or result more than 1 point of the model's parameters off --ratio "
                        "(a warning, kept in layershare.json) instead of an error")
    c.add_argument("--task", choices=["causal-lm", "image-classification"],
                   help="check that the model is of this kind (it is detected from the model)")
    c.add_argument("--eval-text", help="also report dense and compressed perplexity on this text")
    c.add_argument("--eval-images", help="also report dense and compressed top-1/top-5 on this image folder")
    c.add_argument("--eval-seqlen", type=_at_least(2), help="evaluation window (default: model context, at most 2048)")
    c.add_argument("--eval-windows", type=_at_least(1),
                   help="evaluate on the first N windows of --eval-text only (a fixed slice; printed with the number)")
    c.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="causal LMs: the saved model is reloaded and continues this prompt ('' to skip)")
    c.add_argument("--max-new-tokens", type=_at_least(1), default=24)
    c.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    _add_recipe_args(c)
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity, top-1 or zero-shot task accuracy of a compressed directory "
                                    "or a dense model")
    e.add_argument("model")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="perplexity on this text (causal LMs)")
    what.add_argument("--images", help="top-1/top-5 on this image folder (image classifiers)")
    what.add_argument("--tasks", help="zero-shot accuracy through lm-evaluation-harness on these comma-separated tasks "
                                      "(causal LMs): austen_lastword, austen_nextsent (local, README) or any lm-eval "
                                      "task, e.g. piqa (its dataset must be reachable)")
    e.add_argument("--limit", type=_at_least(1), help="only the first N examples of each task (--tasks)")
    e.add_argument("--seqlen", type=_at_least(2), help="tokens per window (default: the model's context, at most "
                                                       "2048; longer than the context is refused)")
    e.add_argument("--max-images", type=_at_least(1), help="a stratified subset of the images")
    e.add_argument("--max-windows", type=_at_least(1), help="only the first N windows of the text (a slice; printed)")
    e.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    e.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    e.set_defaults(func=cmd_eval)

    f = sub.add_parser("finetune", help="distil the dense model into a compressed directory (end to end)")
    f.add_argument("dir", help="a compressed directory")
    f.add_argument("--data", required=True, help="training text (LMs) or image folder with class sub-folders")
    f.add_argument("--output", required=True, help="output directory (refused if it exists, unless --overwrite)")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--teacher", help="the dense model (default: the one the directory was compressed from, if the "
                                     "SHA-256 of its weights is still the one recorded then)")
    f.add_argument("--steps", type=_at_least(1), default=200)
    f.add_argument("--batch-size", type=_at_least(1), default=32)
    f.add_argument("--lr", type=_positive, default=1e-4)
    f.add_argument("--temperature", type=_positive, default=1.0)
    f.add_argument("--label-weight", type=_non_negative, default=0.0,
                   help="weight of the label cross-entropy (images)")
    f.add_argument("--max-samples", type=_at_least(1), default=10_000,
                   help="images, or text windows of --seqlen tokens")
    f.add_argument("--seqlen", type=_at_least(2), default=512)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="cpu", help="where to train (cpu, cuda, cuda:1, ...)")
    f.add_argument("--eval-text", help="report dense and fine-tuned perplexity on this text")
    f.add_argument("--eval-images", help="report dense and fine-tuned top-1 on this image folder")
    f.add_argument("--eval-seqlen", type=_at_least(2))
    f.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    f.set_defaults(func=cmd_finetune)

    i = sub.add_parser("info", help="what a compressed directory holds")
    i.add_argument("dir")
    i.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    i.set_defaults(func=cmd_info)
    return parser


def _terminate(signum, frame):  # SIGTERM ends a run the way Ctrl-C does: nothing half-written is left
    raise KeyboardInterrupt(f"signal {signum}")


def _format_warning(message, category, filename, lineno, line=None, _default=None):
    """layershare's own warnings on one line; others as Python prints them."""
    if category.__module__.startswith("layershare"):
        return f"layershare: warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 2 an input or option refused (before the work, or when read); 1 the
    work ran and its result failed a check (NaN or infinite logits, a diverged fine-tuning, a
    result off its ratio), or an unexpected error; 130 interrupted. Every failure is one line on
    stderr (`--debug`: the traceback)."""
    import functools
    import signal
    import warnings

    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading_main() else None
    formatwarning = warnings.formatwarning
    warnings.formatwarning = functools.partial(_format_warning, _default=formatwarning)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("layershare: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure: one line (--debug: the traceback)
        if args.debug:
            raise
        expected = isinstance(e, (ValueError, OSError, RuntimeError))
        message = "; ".join([str(e) or type(e).__name__, *getattr(e, "__notes__", [])])
        if not expected:
            message = (f"unexpected {type(e).__name__}: {message} (rerun with --debug for the traceback, and "
                       f"please report it)")
        print("layershare: error: " + " ".join(message.split()), file=sys.stderr)
        return getattr(e, "exit_code", 2 if expected else 1)
    finally:
        warnings.formatwarning = formatwarning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
