"""Save a compressed model.

A compressed model is a directory:
  config.json         the model's transformers config plus a `layershare` entry (method,
                      groups, shared bases, the shape of every compressed linear, and
                      which modules are tied to which)
  model.safetensors   dense weights of everything not compressed, each shared basis once,
                      and per compressed linear its nonzero V values + a bitmask
  tokenizer files     when a tokenizer was given
  layershare.json     recipe, measured sizes, compression report, and the weight file's
                      byte size (a truncated copy is refused on load)
  recipe.yaml         the recipe, as `--recipe` reads it
It is written into a hidden sibling folder and renamed into place only when complete, so
an interrupted save never leaves a directory that looks valid.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from layershare.checkpoint.outputs import check_output_dir, output_lock, signals_deferred
from layershare.checkpoint.verify import (
    FORMAT_VERSION,
    INDEX,
    META,
    RECIPE,
    CheckpointError,
    config_sha256,
    entry_sha256,
    file_sha256,
    quantization_config,
)
from layershare.modules.atoms import AtomLinear, MatrixAtoms
from layershare.modules.shared_basis import SharedBasisLinear
from layershare.modules.store import BASES_ATTR


def layer_map(model: nn.Module) -> dict:
    bases = getattr(model, BASES_ATTR, {})
    ids = {id(b): k for k, b in bases.items()}
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, SharedBasisLinear):
            layers[name] = {"basis": ids[id(m.basis)], "role": m.role, "v_shape": list(m.v_shape),
                            "bias": m.bias is not None, "sparse": m.sparse}
        elif isinstance(m, AtomLinear):
            layers[name] = {"kind": "atoms", "basis": ids[id(m.atoms)], "bias": m.bias is not None}
    shapes = {k: ({"atoms": list(b.shape)} if isinstance(b, MatrixAtoms) else list(b.U.shape))
              for k, b in bases.items()}
    return {"bases": shapes, "layers": layers, "tied": tied_modules(model)}


def tied_modules(model: nn.Module) -> dict[str, str]:
    """Modules reachable under several names (ffn-merge's shared MLPs): alias -> first name.
    Their weights are saved once; the loader ties them again."""
    first: dict[int, str] = {}
    tied = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not name or next(m.parameters(recurse=False), None) is None:
            continue
        if id(m) in first:
            tied[name] = first[id(m)]
        else:
            first[id(m)] = name
    return tied


def state_dict_unique(model: nn.Module, dtype: torch.dtype, keep=None) -> dict[str, torch.Tensor]:
    """State dict without aliases (tied embeddings once), floats cast to the storage dtype (but
    the packed form of quantized tensors, kept as it is), the float form of quantized tensors
    left out (quant/model.py). `keep(name)`: only those names (onload.py writes a model part by
    part; the rest of it may be on the meta device)."""
    quantized = set((getattr(model, "layershare_quant", None) or {}).get("tensors", {}))
    seen: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        if v.layout != torch.strided or keep is not None and not keep(k):
            continue
        key = (v.data_ptr(), v.numel(), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        if k in quantized:
            continue
        cast = v.is_floating_point() and not k.endswith("_qscales")
        out[k] = (v.to(dtype) if cast else v).detach().contiguous().cpu()
    return out




def model_task(model: nn.Module) -> str:
    from layershare.adapters import get_adapter

    return get_adapter(model).task


def timm_spec(model: nn.Module) -> dict:
    """How to rebuild a timm VisionTransformer: its registered architecture and the constructor
    arguments that set its shapes (the architecture's defaults supply the rest)."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise CheckpointError("this timm model has no pretrained_cfg['architecture'] (build it with "
                              "timm.create_model) and cannot be rebuilt on load")
    pe, b0 = model.patch_embed, model.blocks[0]
    kwargs = dict(img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
                  num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
                  num_heads=b0.attn.num_heads, mlp_ratio=b0.mlp.fc1.out_features / model.embed_dim,
                  qkv_bias=b0.attn.qkv.bias is not None, class_token=model.has_class_token,
                  global_pool=model.global_pool, reg_tokens=model.num_reg_tokens,
                  no_embed_class=model.no_embed_class)
    return {"architecture": arch, "kwargs": kwargs}


def _save_config(model: nn.Module, entry: dict, folder: Path) -> None:
    """config.json: the model's config with the entry, the quantization_config that routes
    from_pretrained here, and the storage dtype as its `dtype` (what from_pretrained loads by
    default; layershare.load too)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):  # timm: no transformers config
        (folder / "config.json").write_text(json.dumps({"library": "timm", "timm": timm_spec(model),
                                                        "layershare": entry}, indent=2))
        return
    saved = {k: config.__dict__[k] for k in ("layershare", "quantization_config") if k in config.__dict__}
    saved_dtype = getattr(config, "dtype", None)
    config.layershare, config.quantization_config = entry, quantization_config(entry)
    config.dtype = entry["dtype"]
    try:
        config.save_pretrained(folder)
    finally:
        for k in ("layershare", "quantization_config"):
            config.__dict__.pop(k, None)
        config.__dict__.update(saved)
        config.dtype = saved_dtype


def check_not_merged(model: nn.Module, action: str) -> None:
    """Refuse a model whose compressed layers were merged into dense ones, whose quantized tensors
    were kept packed for the low-bit kernels (int4 linears, V values and shared bases as codes), or
    whose plain weights or shared bases were narrowed to 16 bits, at load time (none keeps the modules the file's
    layout describes)."""
    merged, packed = getattr(model, "layershare_merged", 0), getattr(model, "layershare_packed", 0)
    narrowed = getattr(model, "layershare_narrowed", 0)
    if merged or packed or narrowed:
        what = (f"{merged} of its compressed layers were merged into dense ones" if merged else
                f"{packed} of its quantized tensors were kept packed for the low-bit kernels" if packed else
                f"{narrowed} of its linears, embeddings and shared bases were narrowed to their exact 16-bit "
                "weights")
        raise CheckpointError(f"cannot {action} this model: {what} when it was loaded (runtime='auto', 'sparse' "
                              f"or 'merged'); load it with layershare.load(DIR, runtime='compact') to {action} it")


def save_compressed(model: nn.Module, output_dir: str | Path, tokenizer=None, overwrite: bool = False,
                    dtype: str = "float32", meta: dict | None = None, recipe=None,
                    max_shard_size: int | str | None = None) -> Path:
    """Write the compressed directory: config.json (with the layershare entry and a
    quantization_config that routes transformers' from_pretrained to hf_quantizer.py), the
    weights (one model.safetensors, or shards of at most `max_shard_size` with the standard
    index), layershare.json (the report, sizes and hashes), the tokenizer, the recipe and a
    model card (README.md). Written beside the output and renamed into place when complete."""
    check_not_merged(model, "save")
    with output_lock(output_dir):
        return _save(model, check_output_dir(output_dir, overwrite), tokenizer, dtype, meta, recipe, max_shard_size)


def guard_key(model: nn.Module, entry: dict) -> str | None:
    """A dense weight's name for the guard tensor (empty): transformers without layershare, finding
    it where a full weight belongs, stops with a size mismatch instead of loading random MLPs."""
    if entry["layers"]:
        return sorted(entry["layers"])[0] + ".weight"
    quantized = [n for n in sorted(entry.get("quant", {}).get("tensors", {})) if n.endswith(".weight")]
    if quantized:  # quantization alone: the float slot of a quantized weight
        return quantized[0]
    for alias in sorted(entry.get("tied", {})):  # ffn-merge: MLPs tied to another, with no tensors of their own
        for name, _ in model.get_submodule(alias).named_parameters():
            if name.endswith("weight"):
                return f"{alias}.{name}"
    return None


def weights_to_save(model: nn.Module, entry: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors a compressed directory holds (layershare's writer and save_pretrained alike):
    the state dict without aliases at the storage dtype, quantized tensors as their packed codes
    (refused if the codes no longer match), and the entry's guard."""
    if entry.get("quant"):
        from layershare.quant.model import check_current

        check_current(model, entry["quant"])
    sd = state_dict_unique(model, dtype)
    if entry.get("guard"):
        sd[entry["guard"]] = torch.zeros(0, dtype=dtype)
    return sd


SIZE_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
              "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def shard_size(value: int | str | None) -> int | None:
    """max_shard_size (--max-shard-size) in bytes: a positive number of bytes, or a size with its
    unit ("2GB", "500MB", "2GiB"; a bare number in a string is refused: "1" is more likely a
    slip than a one-byte shard). None: one file. Checked before any work."""
    import re

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", value, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"max shard size {value!r}: give a size with its unit, e.g. 2GB, 500MB or 2GiB")
        n = int(float(m[1]) * SIZE_UNITS[m[2].upper()])
    else:
        raise ValueError(f"max shard size {value!r}: give a number of bytes or a size such as '2GB'")
    if n < 1:
        raise ValueError(f"max shard size {value!r}: must be at least one byte")
    return n


def write_weights(sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str | None) -> dict[str, dict]:
    """model.safetensors, or shards and model.safetensors.index.json (huggingface_hub's split,
    as save_pretrained writes them); {file: {"bytes", "sha256"}}."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=shard_size(max_shard_size) or 1 << 62)
    for name, keys in split.filename_to_tensors.items():
        # one metadata key: safetensors writes a map in hash order, so two keys would make runs differ
        save_file({k: sd[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
            for name in sorted(split.filename_to_tensors)}


def hashes(folder: Path, files: dict[str, dict]) -> dict:
    """What layershare.json records to verify a directory: every weights file's size and SHA-256,
    and the SHA-256 of config.json (verify.config_sha256) and of its layershare entry."""
    config = json.loads((folder / "config.json").read_text())
    return {"weights_bytes": sum(f["bytes"] for f in files.values()), "weights_files": files,
            "format_version": FORMAT_VERSION, "entry_sha256": entry_sha256(config["layershare"]),
            "config_sha256": config_sha256(config)}


def write_recipe(recipe, path: Path) -> None:
    """recipe.yaml, headed by the torch thread count it ran with: the same recipe with another
    count writes slightly different float values (rounding; docs/reliability.md)."""
    recipe.to_yaml(path)
    path.write_text(f"# ran with {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; another "
                    f"thread count rounds some float values differently (docs/reliability.md)\n" + path.read_text())


def _save(model: nn.Module, output_dir: Path, tokenizer, dtype: str, meta: dict | None, recipe,
          max_shard_size=None, write=None) -> Path:
    """`write(entry, folder, dtype) -> {file: {"bytes", "sha256"}}` writes the tensors (default:
    the model's, weights_to_save + write_weights; onload.py: the staged groups' shards)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tmp = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entry = {"format_version": FORMAT_VERSION, "dtype": dtype, "task": model_task(model),
                 "class": type(model).__name__, **layer_map(model),
                 **({"method": meta.get("method")} if meta else {}),
                 **({"quant": model.layershare_quant} if getattr(model, "layershare_quant", None) else {})}
        guard = guard_key(model, entry)
        if guard is not None:
            entry["guard"] = guard
        _save_config(model, entry, tmp)
        if write is None:
            files = write_weights(weights_to_save(model, entry, torch_dtype), tmp, max_shard_size)
        else:
            files = write(entry, tmp, torch_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            write_recipe(recipe, tmp / RECIPE)
        info = {**(meta or {}), **hashes(tmp, files), "threads": torch.get_num_threads()}
        (tmp / META).write_text(json.dumps(info, indent=2, default=str, sort_keys=True))
        from layershare.checkpoint.model_card import write_model_card

        write_model_card(tmp, entry, info)
        if output_dir.exists():  # either the old or the new directory is at output_dir, whatever signal comes
            old = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            with signals_deferred():
                os.rename(output_dir, old)
                os.rename(tmp, output_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


