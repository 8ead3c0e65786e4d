"""The staging area of an onloaded compression (onload.py): every finished group on disk, so
the same command after a crash continues from the first unfinished group, and torchrun's
ranks hand their groups to rank 0 through it.

`.NAME.staging/` beside the output directory (on the same file system, shared by every rank):
  manifest.json                  the run's fingerprint (recipe, model, calibration tokens, code
                                 version): a staging area of another run is refused, never mixed in
  s{S}-g{G}.safetensors          group G's tensors at the storage dtype (the blocks and the
                                 group's shared modules), as they go into the output
  s{S}-g{G}.hidden.safetensors   the hidden states entering group G+1 (dense stream, and the
                                 compressed one when the method needs it); only the newest kept
  s{S}-g{G}.json                 the group's part of the config entry and its report; written
                                 last, so its presence means the group is complete
Every file is written under a temporary name and renamed, so a kill -9 leaves either the old
state or the new one. The area is removed once the output directory is in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class StagingMismatchError(ValueError):
    """A staging area left by a different run (another recipe, model or calibration data)."""


def staging_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.parent / f".{out.name}.staging"


def fingerprint(**parts) -> str:
    """SHA-256 of what decides a compression's result (JSON values and tensors)."""
    h = hashlib.sha256()
    for k in sorted(parts):
        v = parts[k]
        h.update(k.encode())
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            for t in v:
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Staging:
    def __init__(self, output_dir: str | Path):
        self.dir = staging_dir(output_dir)

    def open(self, print_: bool, **parts) -> int:
        """Create the area, or check that the one there is this run's; returns how many groups
        it already holds."""
        fp = fingerprint(**parts)
        manifest = self.dir / MANIFEST
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text()).get("fingerprint")
            except (OSError, ValueError):
                old = None
            if old != fp:
                raise StagingMismatchError(
                    f"{self.dir} holds {len(self.finished_any())} finished group(s) of a different run (its recipe, "
                    f"model, calibration data or layershare version differ): rerun that command to finish it, or "
                    f"delete {self.dir} to start this one")
            n = len(self.finished_any())
            if n and print_:
                print(f"resuming: {n} group(s) already compressed in {self.dir}", flush=True)
            return n
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic(manifest, lambda p: p.write_text(json.dumps({"fingerprint": fp}, indent=2)))
        return 0

    def exists(self) -> bool:
        return (self.dir / MANIFEST).exists()

    def _name(self, stage: int, group: int, kind: str) -> Path:
        return self.dir / f"s{stage}-g{group:05d}{kind}"

    def finished_any(self) -> list[Path]:
        return sorted(self.dir.glob("s*-g*.json")) if self.dir.exists() else []

    def finished(self, stage: int, group: int) -> bool:
        return self._name(stage, group, ".json").exists()

    def weights(self, stage: int, group: int) -> Path:
        return self._name(stage, group, ".safetensors")

    def write_group(self, stage: int, group: int, tensors: dict[str, torch.Tensor], entry: dict, report: dict,
                    hidden: dict[str, torch.Tensor], previous: int | None) -> None:
        """The group's tensors, the hidden states after it, then (the commit) its entry and report;
        the hidden states after `previous` go."""
        _atomic(self.weights(stage, group),
                lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        _atomic(self._name(stage, group, ".hidden.safetensors"), lambda p: save_file(hidden, str(p)))
        _atomic(self._name(stage, group, ".json"),
                lambda p: p.write_text(json.dumps({"entry": entry, "report": report}, indent=2, sort_keys=True)))
        if previous is not None:
            self._name(stage, previous, ".hidden.safetensors").unlink(missing_ok=True)

    def read_group(self, stage: int, group: int) -> tuple[dict, dict, dict[str, tuple[int, ...]]]:
        """(entry part, report, tensor shapes) of a finished group."""
        from layershare.checkpoint.verify import read_header

        info = json.loads(self._name(stage, group, ".json").read_text())
        shapes = {k: shape for k, (_, shape) in read_header(self.weights(stage, group)).items()}
        return info["entry"], info["report"], shapes

    def hidden(self, stage: int, group: int) -> dict[str, torch.Tensor] | None:
        path = self._name(stage, group, ".hidden.safetensors")
        return load_file(str(path)) if path.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
