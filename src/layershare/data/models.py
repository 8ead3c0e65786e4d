"""The dense model to compress (an alias, a local Hugging Face directory or a .gguf file) and the
preprocessing saved beside a model (its tokenizer or image processor). Nothing is downloaded."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm


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

    from layershare.data.assets import MODEL_ALIASES, fmnist_vit_dir

    IMAGE_MODEL_ALIASES = {"fmnist-vit": fmnist_vit_dir}

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name in IMAGE_MODEL_ALIASES:
        name = str(IMAGE_MODEL_ALIASES[name]())
    if Path(name).is_dir() and is_image_model_dir(name):
        from transformers import AutoModelForImageClassification

        from layershare.data.images import ImagePreprocessor

        model = AutoModelForImageClassification.from_pretrained(name, dtype=dtype, trust_remote_code=False)
        return model.eval(), ImagePreprocessor.from_pretrained(name)
    from layershare.checkpoint.read import is_compressed_dir

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


def load_preprocessing(path: str | Path):
    """The tokenizer, or the image preprocessor, saved beside a compressed (or dense HF) model."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    if config.get("layershare", {}).get("task") == "image-classification" or is_image_model_dir(path):
        from layershare.data.images import ImagePreprocessor

        return ImagePreprocessor.load(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
