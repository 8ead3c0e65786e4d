"""Verify a compressed directory before trusting it.

Checked before anything is allocated: the `layershare` entry of config.json against its schema
(every field named in the error), the safetensors header (read without loading a tensor)
against the shapes the entry declares, and the SHA-256 recorded in layershare.json at save: of
every weights file and of config.json (every field but CONFIG_UNHASHED; directories saved before
config_sha256 was recorded: of the layershare entry only). A directory without layershare.json is
refused: nothing would be checked. `verify=False` / `--no-verify` skips the hashes.
Checked while loading (io.load_compressed): every compressed layer's path names a linear of the
model with matching shapes, every tensor the model expects is in the file and no other.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal-lm", "image-classification")
CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForImageClassification", "ForImageClassificationWithTeacher")
TIMM_CLASSES = ("VisionTransformer",)
PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
KEY = re.compile(r"^[A-Za-z0-9_]+$")
MAX_DIM = 1 << 24  # no dimension of a real model comes near this
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # transformers' sharded layout
META = "layershare.json"  # recipe, sizes, report and the SHA-256 of every file
RECIPE = "recipe.yaml"
QUANT_METHOD = "layershare"  # config.json quantization_config.quant_method
TIMM_KWARGS = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "qkv_bias", "class_token", "global_pool", "reg_tokens", "no_embed_class"}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "image-classification": "AutoModelForImageClassification"}
SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")



def quantization_config(entry: dict) -> dict:
    """What config.json's quantization_config holds for a layershare directory (it routes
    transformers' from_pretrained to hf_quantizer.py)."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}


class CheckpointError(ValueError):
    pass


class UnverifiedWarning(UserWarning):
    """A directory loaded with verify=False that records no hashes to check."""


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def entry_sha256(entry: dict) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


# config.json fields that cannot change what the model computes: who wrote the file, where it was
# loaded from, and the load-time choices of quantization_config (LayershareConfig.from_dict ignores
# them in a file: only the caller's own LayershareConfig sets them)
CONFIG_UNHASHED = ("transformers_version", "_name_or_path")
QUANT_UNHASHED = ("runtime", "verify")


def config_sha256(config: dict) -> str:
    """SHA-256 of config.json as parsed, less CONFIG_UNHASHED and QUANT_UNHASHED: the layershare
    entry and every field of the model's config (norm epsilons, rope settings, sizes, dtype)."""
    kept = {k: v for k, v in config.items() if k not in CONFIG_UNHASHED}
    if isinstance(kept.get("quantization_config"), dict):
        kept["quantization_config"] = {k: v for k, v in kept["quantization_config"].items()
                                       if k not in QUANT_UNHASHED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _fail(where: str, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: config.json layershare.{field}: {problem}")


def _dims(value, n: int, where: str, field: str) -> list[int]:
    ok = (isinstance(value, list) and len(value) == n
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_DIM for v in value))
    if not ok:
        raise _fail(where, field, f"must be a list of {n} positive integers (at most {MAX_DIM:,}), got {value!r}")
    return value


def _flag(value, where: str, field: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, field, f"must be true or false, got {value!r}")
    return value


def _bits(value, where: str, field: str) -> None:
    from layershare.quant.pack import BITS

    if value not in BITS or isinstance(value, bool):
        raise _fail(where, field, f"{value!r} is not one of {', '.join(map(str, BITS))}")


def check_entry(entry, where: str) -> None:
    """The entry's schema: types, ranges, known values, and references between its parts."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: config.json 'layershare' must be a mapping, got {type(entry).__name__}")
    version = entry.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(where, "format_version", f"{version!r} is not a format this version reads ({FORMAT_VERSION}); "
                                             "a newer layershare wrote it, or the file was edited")
    for field, allowed in (("dtype", DTYPES), ("task", TASKS)):
        if entry.get(field) not in allowed:
            raise _fail(where, field, f"{entry.get(field)!r} is not one of {', '.join(allowed)}")
    cls = entry.get("class")
    if not isinstance(cls, str) or not (cls.endswith(CLASS_SUFFIXES) or cls in TIMM_CLASSES) or not cls.isidentifier():
        raise _fail(where, "class", f"{cls!r} is not a model class layershare loads (a transformers *ForCausalLM, "
                                    f"*LMHeadModel or *ForImageClassification, or timm's VisionTransformer)")
    bases = entry.get("bases")
    if not isinstance(bases, dict):
        raise _fail(where, "bases", "must be a mapping")
    ranks = {}
    for k, shape in bases.items():
        if not KEY.match(k):
            raise _fail(where, f"bases[{k!r}]", "is not a valid name")
        if isinstance(shape, dict):
            if set(shape) != {"atoms"}:
                raise _fail(where, f"bases[{k!r}]", f"must be [d, r] or {{'atoms': [K, out, in]}}, got {shape!r}")
            ranks[k] = ("atoms", _dims(shape["atoms"], 3, where, f"bases[{k!r}].atoms"))
        else:
            ranks[k] = ("basis", _dims(shape, 2, where, f"bases[{k!r}]"))
    layers = entry.get("layers")
    if not isinstance(layers, dict):
        raise _fail(where, "layers", "must be a mapping")
    for name, spec in layers.items():
        f = f"layers[{name!r}]"
        if not PATH.match(name):
            raise _fail(where, f, "is not a module path")
        if not isinstance(spec, dict):
            raise _fail(where, f, "must be a mapping")
        kind = spec.get("kind", "basis")
        expected = {"kind", "basis", "bias"} if kind == "atoms" else {"basis", "role", "v_shape", "bias", "sparse"}
        if kind not in ("atoms", "basis") or set(spec) - expected or set(expected - {"kind"}) - set(spec):
            raise _fail(where, f, f"must hold exactly {sorted(expected)}, got {sorted(spec)}")
        if spec["basis"] not in ranks or ranks[spec["basis"]][0] != kind:
            raise _fail(where, f"{f}.basis", f"{spec['basis']!r} is not a shared {kind} of this checkpoint")
        _flag(spec["bias"], where, f"{f}.bias")
        if kind == "atoms":
            continue
        _flag(spec["sparse"], where, f"{f}.sparse")
        if spec["role"] not in ("in", "out"):
            raise _fail(where, f"{f}.role", f"must be 'in' or 'out', got {spec['role']!r}")
        r, _ = _dims(spec["v_shape"], 2, where, f"{f}.v_shape")
        if r != ranks[spec["basis"]][1][1]:
            raise _fail(where, f"{f}.v_shape", f"rank {r} differs from its basis's {ranks[spec['basis']][1][1]}")
    if entry.get("quant") is not None:
        _check_quant(entry["quant"], where)
    guard = entry.get("guard")
    if guard is not None and not (isinstance(guard, str) and PATH.match(guard) and guard.endswith(".weight")):
        raise _fail(where, "guard", f"must be the path of a dense weight, got {guard!r}")
    tied = entry.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) and PATH.match(k)
                                             and PATH.match(v) for k, v in tied.items()):
        raise _fail(where, "tied", "must map module paths to module paths")


def _check_quant(q, where: str) -> None:
    if not isinstance(q, dict) or set(q) != {"bits", "group_size", "symmetric", "tensors"}:
        raise _fail(where, "quant", "must hold exactly bits, group_size, symmetric and tensors")
    _bits(q["bits"], where, "quant.bits")
    if isinstance(q["group_size"], bool) or not isinstance(q["group_size"], int) or not 0 < q["group_size"] <= MAX_DIM:
        raise _fail(where, "quant.group_size", f"must be a positive integer, got {q['group_size']!r}")
    _flag(q["symmetric"], where, "quant.symmetric")
    if not isinstance(q["tensors"], dict):
        raise _fail(where, "quant.tensors", "must be a mapping")
    for name, t in q["tensors"].items():
        f = f"quant.tensors[{name!r}]"
        if not PATH.match(name) or not isinstance(t, dict) or not {"shape", "input_first"} <= set(t) <= {
                "shape", "input_first", "bits"}:
            raise _fail(where, f, "must be a tensor path mapped to its shape, input_first and optionally bits")
        if "bits" in t:
            _bits(t["bits"], where, f"{f}.bits")
        shape = t["shape"]
        if not (isinstance(shape, list) and len(shape) in (1, 2, 3)):
            raise _fail(where, f"{f}.shape", f"must be a list of 1 to 3 positive integers, got {shape!r}")
        _dims(shape, len(shape), where, f"{f}.shape")
        _flag(t["input_first"], where, f"{f}.input_first")


def expected_shapes(entry: dict, bases_attr: str) -> dict[str, tuple[int, ...] | None]:
    """The tensors the entry's compressed parts put in the weights file, with their shapes
    (None: a sparse V's values, whose count only the bitmask fixes), and the guard: an empty
    tensor at a dense weight's name, so that transformers without layershare refuses the
    directory (hf_quantizer.py)."""
    out: dict[str, tuple[int, ...] | None] = {}
    if entry.get("guard"):
        out[entry["guard"]] = (0,)
    quant = entry.get("quant")
    if quant:
        from layershare.quant.model import packed_shapes

        out.update(packed_shapes(quant))
    for k, shape in entry["bases"].items():
        if isinstance(shape, dict):
            out[f"{bases_attr}.{k}.atoms"] = tuple(shape["atoms"])
        else:
            out[f"{bases_attr}.{k}.U"] = tuple(shape)
    for name, spec in entry["layers"].items():
        base = entry["bases"][spec["basis"]]
        if spec.get("kind") == "atoms":
            K, o, _ = base["atoms"]
            out[f"{name}.coef"] = (K,)
            if spec["bias"]:
                out[f"{name}.bias"] = (o,)
            continue
        d = base[0]
        r, h = spec["v_shape"]
        if spec["sparse"]:
            out[f"{name}.V_values"] = None
            out[f"{name}.V_mask"] = ((r * h + 7) // 8,)
        else:
            out[f"{name}.V"] = (r, h)
        if spec["bias"]:
            out[f"{name}.bias"] = (h if spec["role"] == "in" else d,)
    for name in (quant or {}).get("tensors", {}):
        out.pop(name, None)  # stored as its packed buffers
    return out


def raw_header(path: str | Path) -> tuple[int, dict]:
    """(header length, the header's JSON mapping) of a safetensors file, checked for sanity: the
    one parser of the format's header (read_header, io.read_safetensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(path.stat().st_size - 8, 100 << 20):
                raise CheckpointError(f"{str(path)!r}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r}: unreadable safetensors header")
    for k, v in header.items():
        if k != "__metadata__" and (not isinstance(v, dict) or not isinstance(v.get("shape"), list)):
            raise CheckpointError(f"{str(path)!r}: malformed header entry for {k!r}")
    return n, header


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header, without reading a tensor."""
    _, header = raw_header(path)
    return {k: (v.get("dtype"), tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def weight_files(folder: Path, where: str) -> list[str]:
    """The weights files of a directory: model.safetensors, or the shards its index names."""
    index = folder / INDEX
    if not index.exists():
        return [WEIGHTS]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: unreadable {INDEX} ({e})") from e
    bad = [f for f in files if not isinstance(f, str) or not SHARD.match(f)]
    if bad or not files:
        raise CheckpointError(f"{where}: {INDEX} names {bad[:3] or 'no'} weights files (expected model-NNNNN-of-"
                              f"NNNNN.safetensors)")
    return files


def read_headers(folder: Path, files: list[str], where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The headers of all weights files as one mapping (a tensor in two files is refused); with an
    index, its map must name the file each tensor is in."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    owner: dict[str, str] = {}
    for name in files:
        if not (folder / name).exists():
            raise CheckpointError(f"{where}: weights file {name} is missing")
        for k, v in read_header(folder / name).items():
            if k in out:
                raise CheckpointError(f"{where}: {k!r} is in both {owner[k]} and {name}")
            out[k], owner[k] = v, name
    if files != [WEIGHTS]:
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        if weight_map != owner:
            raise CheckpointError(f"{where}: {INDEX} does not match the shards' contents")
    return out


def check_header(entry: dict, header: dict, bases_attr: str, where: str) -> None:
    """Every compressed tensor the entry declares is in the files with its shape."""
    for key, shape in expected_shapes(entry, bases_attr).items():
        if key not in header:
            raise CheckpointError(f"{where}: the weights lack {key!r}, which config.json declares")
        got = header[key][1]
        if shape is None:
            r, h = entry["layers"][key[: -len(".V_values")]]["v_shape"]
            if len(got) != 1 or got[0] > r * h:
                raise CheckpointError(f"{where}: {key!r} has shape {list(got)}; expected at most {r * h} values")
        elif got != shape:
            raise CheckpointError(f"{where}: {key!r} has shape {list(got)} in the weights but config.json "
                                  f"declares {list(shape)}")


def recorded_files(meta: dict) -> dict[str, dict]:
    """{file: {"bytes", "sha256"}} as layershare.json records them (directories saved before
    sharding: model.safetensors's "weights_bytes" and "weights_sha256")."""
    if isinstance(meta.get("weights_files"), dict):
        return meta["weights_files"]
    if "weights_bytes" in meta:
        return {WEIGHTS: {"bytes": meta["weights_bytes"], "sha256": meta.get("weights_sha256")}}
    return {}


def check_sizes(folder: Path, files: list[str], meta: dict, where: str) -> None:
    """The weights files are the ones saved, each of its recorded size (cheap: no hashing)."""
    recorded = recorded_files(meta)
    if not recorded:  # written by transformers' save_pretrained: nothing recorded
        return
    if sorted(recorded) != files:
        raise CheckpointError(f"{where}: the weights files are {files}, but {sorted(recorded)} were saved")
    for name in files:
        if not (folder / name).exists():
            raise CheckpointError(f"{where}: weights file {name} is missing")
        size = (folder / name).stat().st_size
        if recorded[name].get("bytes") != size:
            raise CheckpointError(f"{where}: {name} is {size:,} bytes but was saved as "
                                  f"{recorded[name].get('bytes')!r} bytes (truncated or replaced)")


def unverifiable(meta: dict | None) -> str | None:
    """Why a directory's hashes cannot be checked (no layershare.json, or one that records no
    weights file), or None."""
    if meta is None:
        return f"{META} is missing"
    if not any(rec.get("sha256") for rec in recorded_files(meta).values()):
        return f"{META} records no SHA-256 of the weights"
    return None


def check_hashes(folder: Path, entry: dict, meta: dict, where: str, config: dict | None = None) -> None:
    want_c = meta.get("config_sha256")
    if want_c is not None and config is not None and config_sha256(config) != want_c:
        raise CheckpointError(f"{where}: config.json does not match the hash recorded when it was saved (a field was "
                              f"edited; every field but {' and '.join(CONFIG_UNHASHED)} is hashed, as each may "
                              f"change the computation); load with verify=False (--no-verify) to trust it anyway")
    want_e = meta.get("entry_sha256")
    if want_e is not None and entry_sha256(entry) != want_e:
        raise CheckpointError(f"{where}: config.json's layershare entry does not match the hash recorded when it "
                              f"was saved (edited?); load with verify=False (--no-verify) to trust it anyway")
    for name, rec in sorted(recorded_files(meta).items()):
        if rec.get("sha256") is not None and file_sha256(folder / name) != rec["sha256"]:
            raise CheckpointError(f"{where}: {name} does not match the SHA-256 recorded when it was saved "
                                  f"(corrupted or edited); load with verify=False (--no-verify) to trust it anyway")
