"""The dense model a directory was compressed from: the teacher `layershare finetune` distils
from unless given another. Recorded at compress time in layershare.json as `source` (an alias as
it is named; a directory or .gguf file as an absolute path, so that it means the same model from
any current directory) and `source_sha256`: the SHA-256 over the model's weight files (a
directory's *.safetensors, else its *.bin, each file's name and full SHA-256, in name order; a
.gguf file's full SHA-256). Checked before the teacher is loaded: a missing path or other weights
are refused, naming both."""
from __future__ import annotations

import hashlib
from pathlib import Path

from layershare.checkpoint.verify import file_sha256


def weight_files(name: str) -> tuple[str, list[Path]] | None:
    """(the name to record, the weight files) of a model as layershare.load_model reads it: an
    alias, a .gguf file or a local directory; None when it is none of them here."""
    from layershare.data.assets import MODEL_ALIASES, fmnist_vit_dir

    if name == "fmnist-vit":
        return name, _dir_weights(fmnist_vit_dir())
    if name in MODEL_ALIASES:
        folder, gguf = MODEL_ALIASES[name]()
        return name, [Path(folder) / gguf]
    path = Path(name)
    if name.endswith(".gguf") and path.is_file():
        return str(path.resolve()), [path.resolve()]
    if path.is_dir():
        return str(path.resolve()), _dir_weights(path.resolve())
    return None


def _dir_weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def weights_sha256(files: list[Path]) -> str | None:
    if not files:
        return None
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def record(name: str) -> dict:
    """{"source", "source_sha256"} for layershare.json (a name that is no model here: recorded as
    given, without a hash; such a directory needs --teacher to be fine-tuned)."""
    found = weight_files(str(name))
    if found is None:
        return {"source": str(name), "source_sha256": None}
    recorded, files = found
    return {"source": recorded, "source_sha256": weights_sha256(files)}


def recorded_teacher(meta: dict, where: str) -> str:
    """The dense model a directory records, checked to be the one it was compressed from: the
    same weights (SHA-256) at the recorded place. Raises ValueError, saying what to pass as
    --teacher, when it is not recorded, is missing or differs."""
    source, want = meta.get("source"), meta.get("source_sha256")
    if not source:
        raise ValueError(f"{where} does not record the dense model it was compressed from: pass --teacher MODEL")
    if not want:
        raise ValueError(f"{where} records its dense model as {source!r} without a hash of its weights, so "
                         f"nothing shows that {source!r} still holds that model: pass --teacher MODEL")
    found = weight_files(source)
    if found is None or not found[1]:
        raise ValueError(f"the dense model {where} was compressed from, {source!r}, is missing (or holds no "
                         f"weights): pass --teacher MODEL")
    got = weights_sha256(found[1])
    if got != want:
        raise ValueError(f"{source!r} is not the dense model {where} was compressed from: its weights' SHA-256 is "
                         f"{got[:16]}..., {want[:16]}... was recorded; pass --teacher {source} to distil from it "
                         f"anyway, or --teacher with the original model")
    return source
