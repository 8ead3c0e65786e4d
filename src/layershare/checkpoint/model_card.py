"""The README.md of a compressed directory: what the field's compressed checkpoints carry (the
base model, the recipe, what is stored, the measured quality with its protocol, and the lines
that load it). Written at save from the entry and layershare.json; rewritten when an evaluation
is recorded."""
from __future__ import annotations

import json
from pathlib import Path

import yaml


def _stage_line(stage: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in stage.items() if k not in ("method",) and v is not None)
    return f"- `{stage['method']}`: {opts}"


def render(entry: dict, info: dict) -> str:
    source = info.get("source") or "unknown"
    sizes = info.get("sizes", {})
    recipe = info.get("recipe", {})
    task = entry.get("task", "causal-lm")
    auto = "AutoModelForCausalLM" if task == "causal-lm" else "AutoModelForImageClassification"
    front = {"library_name": "transformers", "tags": ["layershare", "compressed", *(
        [info["method"]] if info.get("method") else [])]}
    if source != "unknown" and not Path(str(source)).exists():
        front["base_model"] = str(source)
    lines = ["---", yaml.safe_dump(front, sort_keys=True).strip(), "---", "",
             f"# {source}, compressed by layershare ({info.get('method') or 'unknown method'})", "",
             f"Base model: `{source}` ({entry.get('class')}). Made by "
             "[layershare](https://pypi.org/project/layershare/): parameters shared across layers.", ""]
    if recipe.get("stages"):
        lines += ["## Recipe", "", *[_stage_line(s) for s in recipe["stages"]],
                  f"- calibration: {recipe.get('nsamples')} windows of {recipe.get('seqlen')} tokens, seed "
                  f"{recipe.get('seed')}, storage dtype {recipe.get('dtype')}", ""]
    if sizes:
        dense, stored = sizes["dense_params"], sizes["param_equivalents"]
        total = info.get("weights_bytes")
        lines += ["## What is stored", "",
                  f"- parameters: dense {dense:,} -> stored {stored:,.0f} ({sizes['ratio']:.2%} fewer; "
                  f"{sizes['stored_values']:,} values + a bitmask of {sizes['index_bytes']:,} bytes)",
                  f"- shared bases {len(entry.get('bases', {}))}, compressed linears {len(entry.get('layers', {}))}"
                  f", tied modules {len(entry.get('tied', {}))}"]
        if total:
            lines += [f"- weights files: {total:,} bytes in {len(info.get('weights_files', {})) or 1} file(s) = "
                      f"{total * 8 / dense:.2f} bits per parameter of the dense model, everything counted "
                      f"(the dense model at {entry.get('dtype')}: {sizes['dense_bytes'] * 8 / dense:.0f})"]
        lines.append("")
    ev = info.get("eval")
    lines += ["## Measured quality", ""]
    if ev and "ppl" in ev:
        lines += [f"Perplexity on {ev['text']}: dense {ev['dense_ppl']:.3f} -> compressed {ev['ppl']:.3f}.", "",
                  f"Protocol: {ev['protocol']}", ""]
    elif ev:
        lines += [f"Top-1 on {ev['images']}: dense {ev['dense_top1']:.2%} -> compressed {ev['top1']:.2%}.", "",
                  f"Protocol: {ev['protocol']}", ""]
    else:
        lines += ["Not measured when it was saved (`layershare compress --eval-text ...` records it here).", ""]
    lines += ["## Load it", "", "```python", "import layershare  # registers the format with transformers",
              f"from transformers import {auto}", "", f"model = {auto}.from_pretrained(\"PATH\")", "```", "",
              "or `layershare.load(\"PATH\", runtime=\"auto\")`. Without layershare installed, transformers refuses "
              "the directory (a size mismatch on a guard tensor) instead of loading random weights.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, entry: dict | None = None, info: dict | None = None) -> None:
    folder = Path(folder)
    if entry is None:
        entry = json.loads((folder / "config.json").read_text())["layershare"]
    if info is None:
        info = json.loads((folder / "layershare.json").read_text())
    (folder / "README.md").write_text(render(entry, info))
