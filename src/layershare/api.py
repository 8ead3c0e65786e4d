"""The public surface: load a model, compress it, save/load the result, measure it.

    import layershare
    model, tok = layershare.load_model("smollm2-135m")
    result = layershare.compress(model, layershare.Recipe(ratio=0.2), data="austen:emma",
                                 tokenizer=tok, output_dir="out/smol-fips20")
    model = layershare.load("out/smol-fips20")
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import get_adapter
from .budget import Plan, count_params
from .data import DataError, calibration_batches, read_text, tokenize
from .evaluate.perplexity import Perplexity, perplexity
from .io import check_output_dir, load_compressed, save_compressed
from .methods import METHODS, Method, get_method
from .pipeline import CompressionReport, compress_model, plan_model
from .recipe import Recipe, RecipeError
from .sizes import Sizes, measure


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an alias ("smollm2-135m", "gemma3-270m"), a local HF directory,
    or a .gguf file. Nothing is downloaded: HF_HUB_OFFLINE is set for the call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import MODEL_ALIASES

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict = {}
    if name in MODEL_ALIASES:
        folder, gguf = MODEL_ALIASES[name]()
        path, kwargs = str(folder), {"gguf_file": gguf}
    elif name.endswith(".gguf"):
        p = Path(name)
        path, kwargs = str(p.parent), {"gguf_file": p.name}
    else:
        path = name
        if not Path(path).exists():
            raise FileNotFoundError(f"model {name!r}: not an alias ({', '.join(MODEL_ALIASES)}), "
                                    f"a local directory or a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval(), tokenizer


@dataclass
class CompressionResult:
    model: nn.Module
    report: CompressionReport
    sizes: Sizes
    output_dir: Path | None

    @property
    def plan(self) -> Plan:
        return self.report.plan


def _calibration(data, tokenizer, recipe: Recipe, batch_size: int) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        ids = data.flatten()
        source = "calibration tokens"
    else:
        if tokenizer is None:
            raise DataError("calibration text needs a tokenizer (pass tokenizer=...)")
        source = f"calibration text {str(data)!r}"
        ids = tokenize(tokenizer, read_text(data))
    return calibration_batches(ids, recipe.nsamples, recipe.seqlen, batch_size, recipe.seed, source)


def plan_stages(model: nn.Module, recipe: Recipe) -> list[tuple[Recipe, Method, list[list[int]], Plan]]:
    """(recipe, method, groups, plan) of every stage, checked before any long work: the
    attention stage (`recipe.attention`) first, then the main method."""
    adapter = get_adapter(model)
    stages = []
    sub = recipe.attention_recipe()
    if sub is not None:
        att = get_method(sub.method)
        if att.scope != "attention":
            raise RecipeError(f"recipe.attention names {sub.method!r}, which compresses the {att.scope}; "
                              f"methods on attention: {', '.join(m for m, c in METHODS.items() if c.scope == 'attention')}")
        stages.append((sub, att, *plan_model(model, adapter, att, sub)))
    method = get_method(recipe.method)
    if sub is not None and method.scope == "attention":
        raise RecipeError("recipe.attention is for an MLP method plus a method on attention; "
                          f"{recipe.method!r} already compresses the attention")
    stages.append((recipe, method, *plan_model(model, adapter, method, recipe)))
    return stages


def compress(model: nn.Module, recipe: Recipe | None = None, data=None, tokenizer=None,
             output_dir: str | Path | None = None, overwrite: bool = False, batch_size: int = 8,
             **overrides) -> CompressionResult:
    """Compress `model` in place with `recipe` (fields may be overridden by keyword).

    data: a text source (see data.read_text) or a 1-D tensor of token ids.
    Everything that can be checked is checked before the long work starts: the
    architecture, the budget, the calibration length and the output directory.
    """
    recipe = Recipe.from_dict({**(recipe or Recipe()).to_dict(), **overrides})
    adapter = get_adapter(model)
    stages = plan_stages(model, recipe)
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    if data is None:
        raise DataError("compress needs calibration data (data=...)")
    batches = _calibration(data, tokenizer, recipe, batch_size)
    seed_everything(recipe.seed)
    dense_params = count_params(model)
    t0 = time.time()
    for stage_recipe, method, groups, plan in stages:
        report = compress_model(model, adapter, method, stage_recipe, batches, groups, plan)
        if stage_recipe is not recipe:  # the attention stage: its report travels with the main one
            first = {"attention": {"method": stage_recipe.method, "ratio": plan.model_ratio,
                                   "seconds": report.seconds, **report.extra}}
    if recipe.attention is not None:
        report.extra.update(first)
    report.seconds = time.time() - t0
    sizes = measure(model, dense_params, recipe.bytes_per_param)
    out = None
    if output_dir is not None:
        meta = {"method": recipe.method, "recipe": recipe.to_dict(), "sizes": sizes.as_dict(),
                "seconds": report.seconds, "dense_params": dense_params,
                "groups": [{"blocks": g.blocks, "rank": g.rank, "nnz": g.nnz,
                            "rel_err_before": g.stats.rel_err_before, "rel_err_after": g.stats.rel_err_after,
                            "seconds": g.seconds} for g in report.groups], **report.extra}
        out = save_compressed(model, output_dir, tokenizer=tokenizer, overwrite=overwrite,
                              dtype=recipe.dtype, meta=meta)
    return CompressionResult(model=model, report=report, sizes=sizes, output_dir=out)


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """A compressed model saved by `compress(..., output_dir=...)`, ready to run."""
    return load_compressed(path, device=device)


def evaluate_perplexity(model: nn.Module, tokenizer, text, seqlen: int | None = None,
                        max_windows: int | None = None) -> Perplexity:
    """Perplexity over the whole text (a source for data.read_text, or a 1-D tensor of token ids);
    see evaluate/perplexity.py for the protocol."""
    ids = text.flatten() if isinstance(text, torch.Tensor) else tokenize(tokenizer, read_text(text))
    return perplexity(model, ids, seqlen=seqlen, max_windows=max_windows)
