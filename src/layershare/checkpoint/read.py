"""Read a compressed directory (see save.py for its layout): verified first (verify.py), then
a skeleton built on the meta device, the file's tensors assigned into it, and the layers put in
their run-time form (runtime/forms.py). Imports nothing of the compressor."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from layershare.adapters.base import set_path
from layershare.checkpoint.verify import (
    AUTO_CLASSES,
    TIMM_KWARGS,
    META,
    CheckpointError,
    UnverifiedWarning,
    check_entry,
    check_hashes,
    check_header,
    check_sizes,
    raw_header,
    read_headers,
    unverifiable,
    weight_files,
)
from layershare.modules.atoms import AtomLinear, MatrixAtoms
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.modules.store import BASES_ATTR, shared_modules


def is_compressed_dir(path: str | Path) -> bool:
    """Whether `path` is a directory layershare wrote (its config.json has a 'layershare' entry,
    or it holds layershare.json), whatever else it lacks."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / META).exists():
        return True
    try:
        return "layershare" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read into memory of its own (no memory map). A mapped
    file keeps every page it ever read resident while any of its tensors lives, so the compact
    tensors a run-time conversion replaces would stay counted; read like this, they are freed."""
    n, header = raw_header(path)
    header.pop("__metadata__", None)
    out = {}
    with open(path, "rb") as f:
        for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = v["data_offsets"]
            buf = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + n + start)
            if f.readinto(memoryview(buf.numpy())) != end - start:
                raise ValueError(f"{k!r} ends past the end of the file")
            out[k] = buf.view(ST_DTYPES[v["dtype"]]).reshape(v["shape"])
    return out


def read_meta(path: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """(config.json, layershare.json) of a compressed directory, checked (verify.py): complete,
    the entry's schema, the weights files' sizes and headers against the entry and, with
    `verify`, the recorded hashes (of the weights and of config.json). Reads no tensor. Without
    layershare.json (or one recording no hashes) nothing can be checked: refused, unless
    `verify=False`, which warns once (UnverifiedWarning) and returns {} as the meta."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory")
    cfg_file, meta_file = path / "config.json", path / META
    if not cfg_file.exists():
        raise CheckpointError(f"{str(path)!r} is not a layershare checkpoint: config.json is missing")
    try:
        config = json.loads(cfg_file.read_text())
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r}: corrupt metadata ({e})") from e
    if "layershare" not in config:
        raise CheckpointError(f"{str(path)!r} is not a layershare checkpoint: config.json has no 'layershare' entry")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(path)!r}: {META} must hold a mapping")
    where = repr(str(path))
    missing = unverifiable(meta if meta_file.exists() else None)
    if missing and verify:
        raise CheckpointError(f"{where}: {missing}, so nothing can check that its weights and config.json are the "
                              f"ones saved; load with verify=False (--no-verify) to trust it anyway")
    if missing:
        import warnings

        warnings.warn(f"UNVERIFIED: {where}: {missing}; its weights and config.json are trusted without any hash "
                      f"check (verify=False / --no-verify)", UnverifiedWarning, stacklevel=2)
    files = weight_files(path, where)
    check_sizes(path, files, meta, where)
    check_entry(config["layershare"], where)
    check_header(config["layershare"], read_headers(path, files, where), BASES_ATTR, where)
    if verify:
        check_hashes(path, config["layershare"], meta, where, config=config)
    return config, meta


def _module_at(model: nn.Module, path: str, where: str) -> nn.Module:
    """The submodule at `path`, through registered submodules only (never other attributes)."""
    mod = model
    for part in path.split("."):
        child = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if child is None:
            raise CheckpointError(f"{where}: config.json names {path!r}, which is not a module of the model")
        mod = child
    return mod


def _check_replaced(model: nn.Module, name: str, spec: dict, entry: dict, where: str) -> None:
    """The dense linear a compressed layer replaces exists and has the shapes the entry gives it."""
    from layershare.modules.weights import in_out_features, is_conv1d

    target = _module_at(model, name, where)
    if isinstance(target, (SharedBasisLinear, AtomLinear)):
        raise CheckpointError(f"{where}: config.json lists {name!r} twice")
    if not (isinstance(target, nn.Linear) or is_conv1d(target)):
        raise CheckpointError(f"{where}: config.json names {name!r}, a {type(target).__name__}, as a compressed "
                              f"linear")
    base = entry["bases"][spec["basis"]]
    if spec.get("kind") == "atoms":
        _, out, inp = base["atoms"]
    else:
        d, h = base[0], spec["v_shape"][1]
        inp, out = (d, h) if spec["role"] == "in" else (h, d)
    if tuple(in_out_features(target)) != (inp, out):
        raise CheckpointError(f"{where}: {name!r} maps {in_out_features(target)[0]} -> {in_out_features(target)[1]} "
                              f"in the model but {inp} -> {out} in config.json")


class TiedPlaceholder(nn.Module):
    """Where a tied module goes while transformers' loader runs: no tensors of its own (the
    loader then expects none), replaced by its source afterwards (tie_modules)."""


def build_skeleton(model: nn.Module, entry: dict, shapes: dict[str, tuple[int, ...]], where: str,
                   tie: bool = True) -> nn.Module:
    """Put the entry's compressed structure into `model` (an uncompressed skeleton) on the meta
    device: the shared bases, every compressed layer (a sparse V's values sized from `shapes`,
    the weights' tensor shapes) and the tied modules (with `tie=False`, placeholders until
    tie_modules). The tensors are assigned afterwards, by load_compressed or by transformers'
    loader (hf_quantizer.py)."""
    bases = shared_modules(model)  # a store already there (a resumed compression's) is added to
    for k, shape in entry["bases"].items():
        bases[k] = (MatrixAtoms(torch.empty(*shape["atoms"], device="meta")) if isinstance(shape, dict)
                    else SharedBasis(torch.empty(*shape, device="meta")))
    for name, spec in entry["layers"].items():
        _check_replaced(model, name, spec, entry, where)
        if spec.get("kind") == "atoms":
            set_path(model, name, AtomLinear.empty(bases[spec["basis"]], spec["bias"]))
            continue
        layer = SharedBasisLinear.empty(bases[spec["basis"]], tuple(spec["v_shape"]), spec["role"], spec["bias"],
                                        sparse=spec.get("sparse", True))
        if layer.sparse and f"{name}.V_values" in shapes:
            layer.V_values = torch.empty(tuple(shapes[f"{name}.V_values"]), device="meta")
        if layer.sparse and f"{name}.V_mask" in shapes:
            layer.V_mask = torch.empty(tuple(shapes[f"{name}.V_mask"]), device="meta", dtype=torch.uint8)
        set_path(model, name, layer)
    if entry.get("quant"):
        from layershare.quant.model import prepare_skeleton

        prepare_skeleton(model, entry["quant"])
    for alias, source in entry.get("tied", {}).items():
        a, b = _module_at(model, alias, where), _module_at(model, source, where)
        if any(k.startswith(alias + ".") for k in shapes if k != entry.get("guard")):
            raise CheckpointError(f"{where}: config.json ties {alias!r} to {source!r}, but {alias!r} has tensors of "
                                  f"its own in the weights")
        if type(a) is not type(b) or [p.shape for p in a.parameters()] != [p.shape for p in b.parameters()]:
            raise CheckpointError(f"{where}: config.json ties {alias!r} to {source!r}, which differ in type or shape")
        set_path(model, alias, b if tie else TiedPlaceholder())
    return model


def tie_modules(model: nn.Module, entry: dict) -> None:
    for alias, source in entry.get("tied", {}).items():
        set_path(model, alias, model.get_submodule(source))


def pack_quantized(model: nn.Module, qentry: dict, runtime: str, device) -> set[str]:
    """With runtime "auto" on the CPU, the quantized linears the int4 kernel runs, and the quantized
    V values the bitmask kernels run, stay packed (runtime/quantized.py); returns their tensors'
    names. The model then refuses to be saved, as a merged one does (load with another runtime to
    save or fine-tune it). Loaded for another device, they are dequantized (the kernels are the CPU's)."""
    if runtime != "auto" or torch.device(device).type != "cpu":
        return set()
    from layershare.runtime.quantized import pack_linears, pack_values

    packed = pack_linears(model, qentry) | pack_values(model, qentry)
    model.layershare_packed = len(packed)
    return packed


def without_tensors(qentry: dict, names: set[str]) -> dict:
    return {**qentry, "tensors": {k: v for k, v in qentry["tensors"].items() if k not in names}}


def load_compressed(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = "auto",
                    model: nn.Module | None = None, runtime: str = "auto", verify: bool = True):
    """A runnable model from a compressed directory, without the original weights: a transformers
    model rebuilt from its config, a timm model rebuilt from its architecture, or `model` (an
    uncompressed skeleton of the same architecture, for models neither can rebuild) filled in.
    The skeleton is built on the meta device and the file's tensors are assigned into it as they
    are (no dense temporaries); `runtime` then picks the run-time form (runtime.py). `dtype`:
    "auto" (the storage dtype the entry records), a torch dtype, or None (each tensor as stored).
    The model's `layershare_meta` is the directory's layershare.json."""
    from layershare.runtime.forms import RUNTIMES, to_runtime

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    where = repr(str(path))
    raw, meta = read_meta(path, verify=verify)
    entry = raw["layershare"]
    if dtype == "auto":
        dtype = getattr(torch, entry["dtype"])
    task = entry["task"]
    if model is not None:
        pass
    elif raw.get("library") == "timm":
        try:
            import timm
        except Exception as e:  # noqa: BLE001 - timm needs a working torchvision
            raise CheckpointError(f"{str(path)!r} holds a timm model, but timm cannot be imported ({e})") from e
        spec = raw.get("timm")
        if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
            raise CheckpointError(f"{where}: config.json 'timm' must hold an architecture and its kwargs")
        if spec.get("architecture") not in timm.list_models():
            raise CheckpointError(f"{where}: config.json timm.architecture {spec.get('architecture')!r} is not a model "
                                  f"timm registers")
        unknown = set(spec["kwargs"]) - TIMM_KWARGS
        if unknown:
            raise CheckpointError(f"{where}: config.json timm.kwargs: {sorted(unknown)} are not shape arguments "
                                  f"layershare writes ({', '.join(sorted(TIMM_KWARGS))})")
        with init_empty_weights():
            model = timm.create_model(spec["architecture"], pretrained=False, **spec["kwargs"])
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        if hasattr(config, "layershare"):
            del config.layershare
        # the saved class when transformers has it (an Auto class can be ambiguous: DeiT has two)
        cls = getattr(transformers, entry["class"], None)
        if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(f"{where}: config.json layershare.class: {entry['class']!r} is not a model class")
        with init_empty_weights():
            model = cls(config) if cls is not None else getattr(transformers, AUTO_CLASSES[task]).from_config(config)
    sd = {}
    for name in weight_files(path, where):
        try:
            sd.update(read_safetensors(path / name))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{str(path)!r}: cannot read {name} ({e})") from e
    if entry.get("guard"):
        sd.pop(entry["guard"], None)
    build_skeleton(model, entry, {k: v.shape for k, v in sd.items()}, where)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("_qscales") else v) for k, v in sd.items()}
    try:
        result = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches, bitmask / value count disagreements
        raise CheckpointError(f"{where}: {e}") from e
    if result.unexpected_keys:
        raise CheckpointError(f"{str(path)!r}: unexpected tensors {result.unexpected_keys[:5]}")
    del sd
    if entry.get("quant"):
        from layershare.quant.model import dequantize_model, drop_codes

        packed = pack_quantized(model, entry["quant"], runtime, device)
        dequantize_model(model, without_tensors(entry["quant"], packed), dtype or torch.float32)
        if packed:  # such a model is not saved again: the dequantized tensors' codes are not needed
            drop_codes(model, without_tensors(entry["quant"], packed))
        model.layershare_quant = entry["quant"]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                  if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{str(path)!r}: tensors missing from the weights: {still_meta[:5]}")
    if hasattr(model, "config"):  # a transformers model: its entry travels with its config (save_pretrained)
        model.config.layershare = entry
    model.layershare_meta = meta
    return to_runtime(model.to(device).eval(), runtime, getattr(torch, entry["dtype"], None))
