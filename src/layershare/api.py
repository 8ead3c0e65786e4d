"""The public surface: load a model, compress it, save/load the result, measure it.

    import layershare
    model, tok = layershare.load_model("smollm2-135m")
    result = layershare.compress(model, layershare.FiPSConfig(ratio=0.2), data="austen:emma",
                                 tokenizer=tok, output_dir="out/smol-fips20")
    model = layershare.load("out/smol-fips20")
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layershare.adapters import get_adapter
from layershare.checkpoint.outputs import check_free_space, check_output_dir
from layershare.checkpoint.save import save_compressed
from layershare.checkpoint.sizes import Sizes, measure
from layershare.compression.budget import Plan, count_params
from layershare.compression.drivers import Callback
from layershare.compression.finite import check_dense
from layershare.compression.pipeline import (
    CompressionReport,
    Stage,
    plan_stages,
    run_stages,
)
from layershare.compression.targets import check_ratio, stage_target
from layershare.config import StageConfig
from layershare.data.models import is_image_model_dir, load_model, load_preprocessing  # noqa: F401 (public)
from layershare.data.text import DataError, calibration_batches, read_text, tokenize
from layershare.evaluate import evaluate_accuracy, evaluate_perplexity, evaluate_tasks  # noqa: F401 (public)
from layershare.recipe import Recipe, RecipeError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class CompressionResult:
    model: nn.Module
    report: CompressionReport
    sizes: Sizes
    output_dir: Path | None

    @property
    def plan(self) -> Plan:
        return self.report.plan


def _calibration(data, tokenizer, recipe: Recipe, batch_size: int, task: str = "causal-lm") -> list[torch.Tensor]:
    if task == "image-classification":
        return _image_calibration(data, tokenizer, recipe, batch_size)
    if isinstance(data, torch.Tensor):
        ids = data.flatten()
        source = "calibration tokens"
    else:
        if tokenizer is None:
            raise DataError("calibration text needs a tokenizer (pass tokenizer=...)")
        source = f"calibration text {str(data)!r}"
        ids = tokenize(tokenizer, read_text(data))
    return calibration_batches(ids, recipe.nsamples, recipe.seqlen, batch_size, recipe.seed, source)


def _image_calibration(data, processor, recipe: Recipe, batch_size: int) -> list[torch.Tensor]:
    """Pixel batches: `recipe.nsamples` images, stratified by class, from an image folder (or
    "fmnist:train"), preprocessed by the model's own preprocessing; or a tensor (N, C, H, W)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise DataError(f"calibration pixels must be (N, C, H, W), got shape {tuple(data.shape)}")
        if data.shape[0] < recipe.nsamples:
            raise DataError(f"calibration needs {recipe.nsamples} images (nsamples), got {data.shape[0]}")
        return list(data[:recipe.nsamples].split(batch_size))
    if processor is None:
        raise DataError("calibration images need the model's preprocessing (pass processor=...)")
    from layershare.data.images import calibration_images

    return calibration_images(data, processor, recipe.nsamples, recipe.seed, batch_size)


def as_recipe(recipe=None) -> Recipe:
    """A Recipe from a Recipe, one stage config, a list of them, a dict (either version) or a
    YAML file."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (StageConfig, list, tuple)):
        return Recipe(stages=list(recipe) if isinstance(recipe, (list, tuple)) else [recipe])
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return Recipe.from_yaml(recipe)
    raise RecipeError(f"a recipe is a Recipe, a stage config, a list of them, a dict or a YAML path; "
                      f"got {type(recipe).__name__}")


def plan(model: nn.Module, recipe=None) -> list[Stage]:
    """Every stage's method, groups and budget, checked before any long work (with the dense
    weights: finite)."""
    stages = plan_stages(model, get_adapter(model), as_recipe(recipe))
    check_dense(model)
    return stages


def preflight(model: nn.Module, recipe=None, output_dir=None, overwrite: bool = False,
              allow_ratio_miss: bool = False) -> tuple[list[Stage], str | None]:
    """Everything checkable before the long work, in one place (compress and the CLI call it):
    the plan (plan()), its ratio against the recipe's (targets.py) and, with an output
    directory, that directory and its free space against the planned size. Returns the stages
    and the plan's ratio miss (None, or its message when allowed)."""
    recipe = as_recipe(recipe)
    stages = plan(model, recipe)
    miss = check_ratio(stages, sum(s.plan.model_ratio for s in stages), "the plan removes", allow_ratio_miss)
    empty = [s for s in stages if (stage_target(s) or 0) > 0 and s.plan.removed <= 0]
    if empty:  # its modules would store as many values as the dense ones, plus their format's overhead
        s = empty[0]
        raise ValueError(f"stage {s.index + 1} ({s.method.name}, ratio {s.method.config.ratio:g}) removes no "
                         f"parameter of this model: the ratio is below the smallest step the method can take, and "
                         f"the output would be larger than the dense model; ask for a larger ratio")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
        kept = count_params(model) - sum(s.plan.removed for s in stages)
        check_free_space(output_dir, int(kept * recipe.bytes_per_param * 1.05) + (16 << 20))
    return stages, miss


def check_context(model: nn.Module, seqlen: int, task: str) -> None:
    """A window longer than the model's context is refused before any work (GPT-2 would fail
    mid-run on its position table; a rotary model would run on positions it never saw)."""
    config = getattr(model, "config", None)
    context = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                    if isinstance(getattr(config, k, None), int)), None)
    if task == "causal-lm" and context is not None and seqlen > context:
        raise ValueError(f"seqlen {seqlen} is longer than the model's context ({context} tokens); "
                         f"use --seqlen {context} or less")


def compress(model: nn.Module, recipe=None, data=None, tokenizer=None,
             output_dir: str | Path | None = None, overwrite: bool = False, batch_size: int = 8,
             processor=None, source: str | None = None, callbacks: list[Callback] | tuple = (),
             allow_ratio_miss: bool = False, max_shard_size: int | str | None = None) -> CompressionResult:
    """Compress `model` in place with `recipe` (see as_recipe; default FiPS at 20%).

    data: a text source (see data.read_text) or a 1-D tensor of token ids; for an image
    classifier, an image folder (class sub-folders; see images.py) with `processor` the
    model's preprocessing (images.ImagePreprocessor), or a pixel tensor (N, C, H, W).
    source: the dense model (an alias, a local directory or a .gguf file), recorded in the saved
    metadata as an absolute path with the SHA-256 of its weights (checkpoint/source.py): the
    teacher `layershare finetune` uses by default, once it has checked that hash.
    callbacks: drivers.Callback objects told of every stage and group.
    allow_ratio_miss: accept a plan or a result more than one point off the recipe's ratio
    (targets.py; a warning, kept in the saved report) instead of raising RatioMissError.
    max_shard_size: split the weights into shards of at most this size ("5GB", or bytes) with
    transformers' index file.
    Everything that can be checked is checked before the long work starts: the
    architecture, every stage's budget and its ratio, the calibration length, the output
    directory and its free space (preflight).
    """
    from contextlib import nullcontext

    from layershare.checkpoint.outputs import output_lock
    from layershare.checkpoint.save import shard_size

    max_shard_size = shard_size(max_shard_size)  # a bad size is refused now, not when saving
    if output_dir is not None:  # refused before the lock: a bad path gets its own message
        check_output_dir(output_dir, overwrite)
    with output_lock(output_dir) if output_dir is not None else nullcontext():
        return _compress(model, recipe, data, tokenizer, output_dir, overwrite, batch_size, processor, source,
                         callbacks, allow_ratio_miss, max_shard_size)


def _compress(model, recipe, data, tokenizer, output_dir, overwrite, batch_size, processor, source,
              callbacks, allow_ratio_miss=False, max_shard_size=None) -> CompressionResult:
    recipe = as_recipe(recipe)
    recipe.check_device()
    adapter = get_adapter(model)
    check_context(model, recipe.seqlen, adapter.task)
    stages, miss = preflight(model, recipe, output_dir, overwrite, allow_ratio_miss)
    misses = [miss]
    if data is None:
        raise DataError("compress needs calibration data (data=...)")
    origin = {"source": None}
    if output_dir is not None and source is not None:  # the teacher finetune finds, and the hash that proves it
        from layershare.checkpoint.source import record

        origin = record(source)
    prep = tokenizer if processor is None else processor  # what is saved beside the model
    batches = _calibration(data, prep, recipe, batch_size, adapter.task)
    seed_everything(recipe.seed)
    dense_params = count_params(model)
    try:
        report = run_stages(model, adapter, stages, recipe, batches, callbacks)
        sizes = measure(model, dense_params, recipe.bytes_per_param)
        misses.append(check_ratio(stages, sizes.ratio, "the compressed model has", allow_ratio_miss))
    except ValueError as e:  # (the inputs were checked before the work:) the result failed a check
        e.exit_code = 1
        raise
    out = None
    if output_dir is not None:
        meta = {"method": recipe.method, **origin, "recipe": recipe.to_dict(), "sizes": sizes.as_dict(),
                "seconds": report.seconds, "dense_params": dense_params,
                "stages": [stage_meta(s) for s in report.stages]}
        if any(misses):
            meta["ratio_missed"] = [m for m in misses if m]
        out = save_compressed(model, output_dir, tokenizer=prep, overwrite=overwrite, dtype=recipe.dtype, meta=meta,
                              recipe=recipe, max_shard_size=max_shard_size)
        warn_if_larger(out, sizes.dense_bytes, recipe.dtype)
    return CompressionResult(model=model, report=report, sizes=sizes, output_dir=out)


class LargerThanDenseWarning(UserWarning):
    """The compressed weights take more bytes than the dense ones would."""


def warn_if_larger(out: Path, dense_bytes: int, dtype: str) -> str | None:
    """Warn (and return the message) when the saved weights are larger than the dense model's
    at the same dtype (a ratio too small to pay for the format's own overhead)."""
    import json
    import warnings

    disk = json.loads((out / "layershare.json").read_text())["weights_bytes"]
    if disk <= dense_bytes:
        return None
    msg = (f"LARGER THAN DENSE: the compressed weights take {disk:,} bytes, {disk / dense_bytes - 1:.2%} more than "
           f"the dense model's {dense_bytes:,} ({dtype}): the ratio is too small to pay for the compressed format's "
           f"overhead (bitmasks, shared bases, headers); ask for a larger ratio")
    warnings.warn(msg, LargerThanDenseWarning, stacklevel=3)
    return msg


def stage_meta(stage) -> dict:
    """What layershare.json keeps of a stage's report."""
    return {"method": stage.method, "ratio": stage.plan.model_ratio, "seconds": stage.seconds,
            "groups": [{"blocks": g.blocks, "rank": g.rank, "nnz": g.nnz,
                        "rel_err_before": g.stats.rel_err_before, "rel_err_after": g.stats.rel_err_after,
                        "kept_init": g.stats.kept_init, "steps": g.stats.steps, "seconds": g.seconds, **g.info}
                       for g in stage.groups],
            **stage.extra}


def finetuning_data(model: nn.Module, data, preprocessing, max_samples: int, seqlen: int = 512,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels) to fine-tune on: for an image classifier, up to `max_samples` images of a
    folder (stratified) with their labels; for a causal LM, up to `max_samples` non-overlapping
    `seqlen`-token windows of a text (no labels: distillation only)."""
    if get_adapter(model).task == "image-classification":
        from layershare.data.images import evaluation_batches
        from layershare.evaluate.vision import model_id2label

        xs, ys = zip(*evaluation_batches(data, preprocessing, 256, id2label=model_id2label(model),
                                         max_images=max_samples, seed=seed))
        return torch.cat(xs), torch.cat(ys)
    ids = data.flatten() if isinstance(data, torch.Tensor) else tokenize(preprocessing, read_text(data))
    n = min(max_samples, ids.numel() // seqlen)
    if n < 1:
        raise DataError(f"fine-tuning text has {ids.numel():,} tokens, fewer than one window of {seqlen}")
    return torch.cat(calibration_batches(ids, n, seqlen, n, seed, "fine-tuning text")), None


def output_width(model: nn.Module) -> int | None:
    """How many logits the model gives per position (its vocabulary, or its classes)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None)
    config = getattr(model, "config", None)
    return width or getattr(config, "vocab_size", None) or getattr(config, "num_labels", None)


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """A teacher of another kind or vocabulary is refused before any forward: distillation
    compares the two output distributions entry by entry."""
    from layershare.compression.distill import FinetuneError

    kinds = get_adapter(student).task, get_adapter(teacher).task
    if kinds[0] != kinds[1]:
        raise FinetuneError(f"the teacher is a {kinds[1]} model, the student a {kinds[0]} one")
    widths = output_width(student), output_width(teacher)
    if None not in widths and widths[0] != widths[1]:
        what = "vocabulary" if kinds[0] == "causal-lm" else "classes"
        raise FinetuneError(f"the teacher's {what} has {widths[1]:,} entries, the student's {widths[0]:,}: "
                            f"distil from the dense model the student was compressed from")


def finetune(model: nn.Module, teacher: nn.Module, data, preprocessing=None, steps: int = 200,
             batch_size: int = 32, lr: float = 1e-4, temperature: float = 1.0, label_weight: float = 0.0,
             max_samples: int = 10_000, seqlen: int = 512, seed: int = 0, output_dir: str | Path | None = None,
             overwrite: bool = False, meta: dict | None = None, device: str | None = None):
    """Distil the dense `teacher` into the compressed `model` (in place) on `data` (see
    finetuning_data), keeping every sparsity pattern, on `device` (default: where `model` is);
    save to `output_dir` if given. A quantized
    model is trained through fake quantization on its own grid and its codes are stored again
    (quantization-aware training, quant/qat.py).
    Returns distill.FinetuneStats."""
    from layershare.checkpoint.save import check_not_merged
    from layershare.compression import distill

    check_not_merged(model, "fine-tune")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    check_teacher(model, teacher)
    check_context(model, seqlen, get_adapter(model).task)
    inputs, labels = finetuning_data(model, data, preprocessing, max_samples, seqlen, seed)
    seed_everything(seed)
    quantized = bool(getattr(model, "layershare_quant", None))
    if quantized:  # quantization-aware: trained through fake quantization, its codes stored again (quant/qat.py)
        from layershare.quant import qat

        qat.enable(model)
    try:
        stats = distill.finetune(model, teacher, inputs, labels, steps=steps, batch_size=batch_size, lr=lr,
                                 temperature=temperature, label_weight=label_weight if labels is not None else 0.0,
                                 seed=seed, device=device or str(next(model.parameters()).device))
    finally:
        if quantized:
            qat.finish(model)
    if output_dir is not None:  # the source directory's entry, less what describes its own file and evaluation
        info = {k: v for k, v in (meta or {}).items() if k not in ("weights_bytes", "format_version", "eval")}
        info["finetune"] = {"data": str(data), "samples": int(inputs.shape[0]), "steps": stats.steps,
                            "batch_size": batch_size, "lr": lr, "temperature": temperature,
                            "label_weight": label_weight, "loss_before": stats.loss_before,
                            "loss_after": stats.loss_after, "seconds": stats.seconds,
                            "quantization_aware": quantized}
        recipe = Recipe.from_dict(info["recipe"]) if "recipe" in info else None  # (a version-1 one is converted)
        save_compressed(model, output_dir, tokenizer=preprocessing, overwrite=overwrite,
                        dtype=recipe.dtype if recipe else "float32", meta=info, recipe=recipe)
    return stats
