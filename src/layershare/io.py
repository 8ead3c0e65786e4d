"""Save and load compressed models.

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

import fcntl
import json
import os
import shutil
import signal
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters.base import set_path
from .checkpoint import (FORMAT_VERSION, INDEX, WEIGHTS, CheckpointError, check_entry, check_hashes, check_header,
                         check_sizes, entry_sha256, file_sha256, raw_header, read_headers, weight_files)
from .modules.atoms import AtomLinear, MatrixAtoms
from .modules.shared_basis import SharedBasis, SharedBasisLinear
from .store import BASES_ATTR, shared_modules

META = "layershare.json"
RECIPE = "recipe.yaml"


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless told to overwrite; called before
    long work. Missing parent directories are fine (created when saving), as long as the
    nearest existing one is a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {str(path)!r} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {str(path)!r} exists and is not empty; pass overwrite=True "
                                f"(--overwrite) to replace it")
    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        raise OutputExistsError(f"cannot create {str(path)!r}: {str(ancestor)!r} is not a directory")
    return path


def nearest_existing(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor (where it will be created)."""
    ancestor = Path(path).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    return ancestor


class OutputSpaceError(OSError):
    """Not enough free space where the output is to be written."""


def check_free_space(path: str | Path, need: int) -> None:
    """Refuse, before the work, an output whose file system has less than `need` bytes free
    (the planned size; an --overwrite swap keeps the old copy until the new one is complete)."""
    ancestor = nearest_existing(path)
    free = shutil.disk_usage(ancestor).free
    if free < need:
        raise OutputSpaceError(f"not enough free space for {str(path)!r}: the compressed model needs about "
                               f"{need / 2**20:,.0f} MiB and {str(ancestor)!r} has {free / 2**20:,.0f} MiB free")


_HELD: dict[Path, int] = {}  # output directory -> pid of the process holding its lock (re-entrant there)


@contextmanager
def output_lock(output_dir: str | Path):
    """One run at a time per output directory: an flock on `.NAME.lock` beside it (removed at the
    end), held from the checks before the work to the end of the save. Inside it, what
    interrupted runs left is cleaned: `.NAME.partial-*` folders are removed, and an `.NAME.old-*`
    (a swap cut between its two renames) is put back at NAME if NAME is missing, else removed."""
    path = Path(output_dir).absolute()
    if _HELD.get(path) == os.getpid():  # (a forked child inherits the dict, not the right)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputExistsError(f"another layershare run is writing to {str(output_dir)!r}; wait for it to end "
                                f"or choose another output") from None
    _HELD[path] = os.getpid()
    try:
        for left in sorted(path.parent.glob(f".{path.name}.old-*")):
            if not path.exists():
                os.rename(left, path)
            else:
                shutil.rmtree(left, ignore_errors=True)
        for left in path.parent.glob(f".{path.name}.partial-*"):
            shutil.rmtree(left, ignore_errors=True)
        yield
    finally:
        del _HELD[path]
        try:  # removed while held, so it is never left behind
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)  # releases the lock


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block ends (the two renames of an overwrite)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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


TIMM_KWARGS = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "qkv_bias", "class_token", "global_pool", "reg_tokens", "no_embed_class"}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "image-classification": "AutoModelForImageClassification"}


def model_task(model: nn.Module) -> str:
    from .adapters import get_adapter

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
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):  # timm: no transformers config
        (folder / "config.json").write_text(json.dumps({"library": "timm", "timm": timm_spec(model),
                                                        "layershare": entry}, indent=2))
        return
    from .hf_quantizer import quantization_config

    saved = {k: config.__dict__[k] for k in ("layershare", "quantization_config") if k in config.__dict__}
    config.layershare, config.quantization_config = entry, quantization_config(entry)
    try:
        config.save_pretrained(folder)
    finally:
        for k in ("layershare", "quantization_config"):
            config.__dict__.pop(k, None)
        config.__dict__.update(saved)


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


def check_not_merged(model: nn.Module, action: str) -> None:
    """Refuse a model whose compressed layers were merged into dense ones at load time."""
    n = getattr(model, "layershare_merged", 0)
    if n:
        raise CheckpointError(f"cannot {action} this model: {n} of its compressed layers were merged into dense "
                              f"ones when it was loaded (runtime='auto' or 'merged'); load it with "
                              f"layershare.load(DIR, runtime='compact') to {action} it")


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
        from .quant.model import check_current

        check_current(model, entry["quant"])
    sd = state_dict_unique(model, dtype)
    if entry.get("guard"):
        sd[entry["guard"]] = torch.zeros(0, dtype=dtype)
    return sd


def write_weights(sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str | None) -> dict[str, dict]:
    """model.safetensors, or shards and model.safetensors.index.json (huggingface_hub's split,
    as save_pretrained writes them); {file: {"bytes", "sha256"}}."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size or 1 << 62)
    for name, keys in split.filename_to_tensors.items():
        # one metadata key: safetensors writes a map in hash order, so two keys would make runs differ
        save_file({k: sd[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
            for name in sorted(split.filename_to_tensors)}


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
            recipe.to_yaml(tmp / RECIPE)
        info = {**(meta or {}), "weights_bytes": sum(f["bytes"] for f in files.values()), "weights_files": files,
                "format_version": FORMAT_VERSION,
                "entry_sha256": entry_sha256(json.loads((tmp / "config.json").read_text())["layershare"])}
        (tmp / META).write_text(json.dumps(info, indent=2, default=str, sort_keys=True))
        from .model_card import write_model_card

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
    """(config.json, layershare.json) of a compressed directory, checked (checkpoint.py): complete,
    the entry's schema, the weights files' sizes and headers against the entry and, with
    `verify`, the recorded hashes. Reads no tensor. A directory written by transformers'
    save_pretrained (hf_quantizer.py) has no layershare.json: its meta is {} and nothing is
    recorded to check but the structure."""
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
    files = weight_files(path, where)
    check_sizes(path, files, meta, where)
    check_entry(config["layershare"], where)
    check_header(config["layershare"], read_headers(path, files, where), BASES_ATTR, where)
    if verify:
        check_hashes(path, config["layershare"], meta, where)
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
    from .modules.weights import in_out_features, is_conv1d

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
        from .quant.model import prepare_skeleton

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


def load_compressed(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = torch.float32,
                    model: nn.Module | None = None, runtime: str = "auto", verify: bool = True):
    """A runnable model from a compressed directory, without the original weights: a transformers
    model rebuilt from its config, a timm model rebuilt from its architecture, or `model` (an
    uncompressed skeleton of the same architecture, for models neither can rebuild) filled in.
    The skeleton is built on the meta device and the file's tensors are assigned into it as they
    are (no dense temporaries); `runtime` then picks the run-time form (runtime.py)."""
    from .runtime import RUNTIMES, to_runtime

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    where = repr(str(path))
    raw, _ = read_meta(path, verify=verify)
    entry = raw["layershare"]
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
        from .quant.model import dequantize_model

        dequantize_model(model, entry["quant"], dtype or torch.float32)
        model.layershare_quant = entry["quant"]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                  if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{str(path)!r}: tensors missing from the weights: {still_meta[:5]}")
    model = to_runtime(model.to(device).eval(), runtime)
    if isinstance(model, transformers.PreTrainedModel):  # save_pretrained writes the compressed tensors
        from .hf_quantizer import attach

        attach(model, entry, runtime)
    return model
