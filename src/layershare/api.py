"""The public surface: load a model, compress it, save/load the result, measure it.

    import layershare
    model, tok = layershare.load_model("smollm2-135m")
    result = layershare.compress(model, layershare.FiPSConfig(ratio=0.2), data="austen:emma",
                                 tokenizer=tok, output_dir="out/smol-fips20")
    model = layershare.load("out/smol-fips20")
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .budget import Plan, count_params
from .config import StageConfig
from .data import DataError, calibration_batches, read_text, tokenize
from .drivers import Callback
from .evaluate.perplexity import Perplexity, perplexity
from .finite import check_dense
from .io import check_free_space, check_output_dir, load_compressed, save_compressed
from .pipeline import CompressionReport, Stage, plan_stages, run_stages
from .recipe import Recipe, RecipeError
from .sizes import Sizes, measure
from .targets import check_ratio


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_image_model_dir(path: str | Path) -> bool:
    """Whether a local Hugging Face directory holds an image classifier (by its config)."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    config = json.loads(cfg.read_text())
    return any("ForImageClassification" in a for a in config.get("architectures") or [])


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an alias ("smollm2-135m", "gemma3-270m"), a local HF directory,
    or a .gguf file; (model, image preprocessor) for an image classifier's directory or the
    alias "fmnist-vit" (the Fashion-MNIST ViT of benchmarks/train_fmnist_vit.py). Nothing is
    downloaded: HF_HUB_OFFLINE is set for the call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import MODEL_ALIASES, fmnist_vit_dir

    IMAGE_MODEL_ALIASES = {"fmnist-vit": fmnist_vit_dir}

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name in IMAGE_MODEL_ALIASES:
        name = str(IMAGE_MODEL_ALIASES[name]())
    if Path(name).is_dir() and is_image_model_dir(name):
        from transformers import AutoModelForImageClassification

        from .images import ImagePreprocessor

        model = AutoModelForImageClassification.from_pretrained(name, dtype=dtype, trust_remote_code=False)
        return model.eval(), ImagePreprocessor.from_pretrained(name)
    from .io import is_compressed_dir

    if is_compressed_dir(name):  # from_pretrained would fill its compressed MLPs with random weights
        raise ValueError(f"{name!r} is a layershare compressed directory, not a dense model: load it with "
                         f"layershare.load({name!r}) (`layershare eval` does); to compress further, add a stage "
                         f"to the recipe of the original model instead of compressing the result again")
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
    # a GGUF file is parsed once for the tokenizer and again for the model (SmolLM2: ~25 s in all)
    with tqdm(total=2, desc=f"loading {Path(name).name}", unit="step", dynamic_ncols=True) as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
        bar.update()
        bar.set_postfix_str("weights")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, **kwargs)
        bar.update()
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
    from .images import calibration_images

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
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
        kept = count_params(model) - sum(s.plan.removed for s in stages)
        check_free_space(output_dir, int(kept * recipe.bytes_per_param * 1.05) + (16 << 20))
    return stages, miss


def check_context(model: nn.Module, seqlen: int, task: str) -> None:
    """A calibration window longer than the model's context is refused before any work (GPT-2
    would fail mid-run on its position table)."""
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
    source: the dense model's name, recorded in the saved metadata (the teacher `layershare
    finetune` uses by default). callbacks: drivers.Callback objects told of every stage and group.
    allow_ratio_miss: accept a plan or a result more than one point off the recipe's ratio
    (targets.py; a warning, kept in the saved report) instead of raising RatioMissError.
    max_shard_size: split the weights into shards of at most this size ("5GB", or bytes) with
    transformers' index file.
    Everything that can be checked is checked before the long work starts: the
    architecture, every stage's budget and its ratio, the calibration length, the output
    directory and its free space (preflight).
    """
    from contextlib import nullcontext

    from .io import output_lock

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
    prep = tokenizer if processor is None else processor  # what is saved beside the model
    batches = _calibration(data, prep, recipe, batch_size, adapter.task)
    seed_everything(recipe.seed)
    dense_params = count_params(model)
    report = run_stages(model, adapter, stages, recipe, batches, callbacks)
    sizes = measure(model, dense_params, recipe.bytes_per_param)
    misses.append(check_ratio(stages, sizes.ratio, "the compressed model has", allow_ratio_miss))
    out = None
    if output_dir is not None:
        meta = {"method": recipe.method, "source": source, "recipe": recipe.to_dict(), "sizes": sizes.as_dict(),
                "seconds": report.seconds, "dense_params": dense_params,
                "stages": [stage_meta(s) for s in report.stages]}
        if any(misses):
            meta["ratio_missed"] = [m for m in misses if m]
        out = save_compressed(model, output_dir, tokenizer=prep, overwrite=overwrite, dtype=recipe.dtype, meta=meta,
                              recipe=recipe, max_shard_size=max_shard_size)
    return CompressionResult(model=model, report=report, sizes=sizes, output_dir=out)


def stage_meta(stage) -> dict:
    """What layershare.json keeps of a stage's report."""
    return {"method": stage.method, "ratio": stage.plan.model_ratio, "seconds": stage.seconds,
            "groups": [{"blocks": g.blocks, "rank": g.rank, "nnz": g.nnz,
                        "rel_err_before": g.stats.rel_err_before, "rel_err_after": g.stats.rel_err_after,
                        "kept_init": g.stats.kept_init, "seconds": g.seconds, **g.info} for g in stage.groups],
            **stage.extra}


def load(path: str | Path, device: str = "cpu", model: nn.Module | None = None, runtime: str = "auto",
         verify: bool = True) -> nn.Module:
    """A compressed model saved by `compress(..., output_dir=...)`, ready to run. `model`: an
    uncompressed skeleton of the same architecture, for a model that cannot be rebuilt from the
    directory (transformers and timm ViTs are). `runtime`: the run-time form, "auto" (the
    default: factored where that is smaller and faster, else merged), "compact" (the smallest:
    what is stored), "factored", "csr" or "merged" (runtime.py; docs/runtime.md). The directory is
    verified first (checkpoint.py: schema, shapes, recorded hashes; `verify=False` skips the
    hashes); a failed check raises io.CheckpointError."""
    return load_compressed(path, device=device, model=model, runtime=runtime, verify=verify)


def evaluate_perplexity(model: nn.Module, tokenizer, text, seqlen: int | None = None,
                        max_windows: int | None = None) -> Perplexity:
    """Perplexity over the whole text (a source for data.read_text, or a 1-D tensor of token ids);
    see evaluate/perplexity.py for the protocol."""
    ids = text.flatten() if isinstance(text, torch.Tensor) else tokenize(tokenizer, read_text(text))
    return perplexity(model, ids, seqlen=seqlen, max_windows=max_windows)


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8):
    """Zero-shot accuracy through lm-evaluation-harness (`pip install layershare[eval]`): the local
    Austen suite (evaluate/tasks.py) or any lm-eval task name. Returns a list of
    evaluate.lm_eval.TaskResult, one per task; see evaluate/lm_eval.py."""
    from .evaluate.lm_eval import run_tasks

    return run_tasks(model, tokenizer, list(tasks), limit=limit, batch_size=batch_size)


def load_preprocessing(path: str | Path):
    """The tokenizer, or the image preprocessor, saved beside a compressed (or dense HF) model."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    if config.get("layershare", {}).get("task") == "image-classification" or is_image_model_dir(path):
        from .images import ImagePreprocessor

        return ImagePreprocessor.load(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def evaluate_accuracy(model: nn.Module, processor, images, batch_size: int = 256, max_images: int | None = None):
    """Top-1 / top-5 on an image folder (class sub-folders, or "fmnist:test"); see evaluate/vision.py."""
    from .evaluate.vision import accuracy

    return accuracy(model, images, processor, batch_size=batch_size, max_images=max_images)


def finetuning_data(model: nn.Module, data, preprocessing, max_samples: int, seqlen: int = 512,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels) to fine-tune on: for an image classifier, up to `max_samples` images of a
    folder (stratified) with their labels; for a causal LM, up to `max_samples` non-overlapping
    `seqlen`-token windows of a text (no labels: distillation only)."""
    if get_adapter(model).task == "image-classification":
        from .evaluate.vision import model_id2label
        from .images import evaluation_batches

        xs, ys = zip(*evaluation_batches(data, preprocessing, 256, id2label=model_id2label(model),
                                         max_images=max_samples, seed=seed))
        return torch.cat(xs), torch.cat(ys)
    ids = data.flatten() if isinstance(data, torch.Tensor) else tokenize(preprocessing, read_text(data))
    n = min(max_samples, ids.numel() // seqlen)
    if n < 1:
        raise DataError(f"fine-tuning text has {ids.numel():,} tokens, fewer than one window of {seqlen}")
    return torch.cat(calibration_batches(ids, n, seqlen, n, seed, "fine-tuning text")), None


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
    from . import distill
    from .io import check_not_merged

    check_not_merged(model, "fine-tune")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    inputs, labels = finetuning_data(model, data, preprocessing, max_samples, seqlen, seed)
    seed_everything(seed)
    quantized = bool(getattr(model, "layershare_quant", None))
    if quantized:  # quantization-aware: trained through fake quantization, its codes stored again (quant/qat.py)
        from .quant import qat

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
