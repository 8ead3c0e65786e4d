"""Onloading: compress a model larger than memory, group by group, from its checkpoint.

The model is built on the meta device (accelerate's init_empty_weights); a group's blocks are
read from the checkpoint's safetensors shards when their turn comes, compressed, staged on disk
(staging.py) and put back on the meta device; the embeddings and the head are read for the
calibration capture and again when the output is assembled. Peak memory is one group's weights,
its activations and the calibration hidden states, not the model.

The same machinery resumes (finished groups are read back from the staging area, not redone)
and distributes: under torchrun each rank compresses a contiguous range of groups, computing
their dense inputs itself (forward only); rank 0 assembles the output directory (one shard per
group, transformers' index). Ranks exchange nothing but barriers (gloo, on CPU and GPU alike):
the staged files are the hand-over, so several machines need a shared file system.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from layershare.checkpoint.verify import INDEX, file_sha256, raw_header, read_header
from layershare.compression.capture import Captured, capture_inputs, return_freed_memory
from layershare.compression.drivers.base import GroupReport, Residency
from layershare.compression.finite import NonFiniteError, non_finite_tensors
from layershare.compression.reconstruct import ReconStats
from layershare.compression.staging import Staging
from layershare.modules.store import BASES_ATTR


class OnloadError(ValueError):
    """A model or recipe that cannot be compressed group by group from its checkpoint."""


# -- the checkpoint ---------------------------------------------------------------------------


class CheckpointSource:
    """A local transformers directory's safetensors weights (one file, or shards with an index),
    read tensor by tensor."""

    def __init__(self, path: str | Path, model: nn.Module | None = None):
        self.path = Path(path)
        index, single = self.path / INDEX, self.path / "model.safetensors"
        if index.exists():
            stored = dict(json.loads(index.read_text())["weight_map"])
        elif single.exists():
            stored = {k: single.name for k in read_header(single)}
        else:
            raise OnloadError(f"--onload reads a local transformers directory's safetensors weights; {str(path)!r} "
                              f"has neither model.safetensors nor {INDEX} (a .gguf file or an alias: load it and "
                              f"save_pretrained it first)")
        if model is not None:
            from transformers.conversion_mapping import get_model_conversion_mapping

            transforms = get_model_conversion_mapping(model)
            self.key = {_model_name(k, transforms): k for k in stored}
        else:
            self.key = {k: k for k in stored}
        self.where = {name: stored[k] for name, k in self.key.items()}  # the model's name -> file

    def files(self) -> dict[str, int]:
        return {name: (self.path / name).stat().st_size for name in sorted(set(self.where.values()))}

    def read(self, names: list[str], dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.path / file), "pt") as f:
                for k in keys:
                    t = f.get_tensor(self.key[k])
                    out[k] = (t.to(dtype) if t.is_floating_point() else t).to(device)
        return out


def _model_name(key: str, transforms: list) -> str:
    """A checkpoint's tensor name as the model names it, through transformers' renamings (GPT-NeoX
    saves its head as embed_out); a checkpoint needing more than renaming (fused or split tensors)
    is refused."""
    from transformers.conversion_mapping import WeightRenaming

    for t in transforms:
        renamed, matched = t.rename_source_key(key)
        if matched is None:
            continue
        if not isinstance(t, WeightRenaming):
            raise OnloadError(f"the checkpoint's {key!r} is converted by transformers when loaded "
                              f"({type(t).__name__}), not only renamed: --onload cannot read it; compress this "
                              f"model in memory (without --onload)")
        key = renamed
    return key


def skeleton(path: str | Path) -> nn.Module:
    """The model of a transformers directory on the meta device (buffers computed, not read)."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "layershare"):
        raise OnloadError(f"{str(path)!r} is a layershare compressed directory, not a dense model")
    archs = [a for a in (config.architectures or []) if hasattr(transformers, a)]
    with init_empty_weights():
        model = (getattr(transformers, archs[0])(config) if archs
                 else transformers.AutoModelForCausalLM.from_config(config))
    if hasattr(model, "tie_weights"):  # a tied head is one tensor with the embeddings, as the checkpoint has it
        model.tie_weights()
    return model.eval()


def _holders(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Every tensor's name (the first, for tied ones) -> the modules holding it, the attribute,
    and whether it is a parameter."""
    first: dict[int, str] = {}
    out: dict[str, list] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for kind, table in ((True, m._parameters), (False, m._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                name = first.setdefault(id(t), f"{mname}.{attr}" if mname else attr)
                out.setdefault(name, []).append((m, attr, kind))
    return out


def _tensor(holders: list[tuple[nn.Module, str, bool]]) -> torch.Tensor:
    m, attr, is_param = holders[0]
    return (m._parameters if is_param else m._buffers)[attr]


def _assign(holders: list[tuple[nn.Module, str, bool]], tensor: torch.Tensor) -> None:
    new = nn.Parameter(tensor, requires_grad=False) if holders[0][2] else tensor
    for m, attr, is_param in holders:
        (m._parameters if is_param else m._buffers)[attr] = new


def to_meta(model: nn.Module, keep) -> None:
    """Every tensor whose name passes `keep` back to the meta device (ties kept)."""
    for name, holders in _holders(model).items():
        t = _tensor(holders)
        if keep(name) and t.device.type != "meta":
            _assign(holders, torch.empty_like(t, device="meta"))


# -- the residency the sequential driver runs with -----------------------------------------------


def span_of(n_groups: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of the groups (the first ranks take one more when uneven)."""
    base, extra = divmod(n_groups, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class Onloaded(Residency):
    def __init__(self, source: CheckpointSource, staging: Staging, adapter, model: nn.Module, dtype: torch.dtype,
                 rank: int = 0, world: int = 1):
        self.source, self.staging, self.adapter = source, staging, adapter
        self.dtype, self.rank, self.world = dtype, rank, world
        self.model, self.prefix = model, adapter.blocks_path(model) + "."
        self.device = "cpu"
        self._span = range(0)

    # which names belong where
    def _in_blocks(self, name: str, blocks: list[int]) -> bool:
        return any(name.startswith(f"{self.prefix}{b}.") for b in blocks)

    def _outside(self, name: str) -> bool:
        return not name.startswith(self.prefix) and not name.startswith(BASES_ATTR + ".")

    def _read(self, model: nn.Module, keep) -> None:
        holders = _holders(model)
        want = [n for n, hs in holders.items() if keep(n) and _tensor(hs).device.type == "meta"]
        missing = [n for n in want if n not in self.source.where]
        if missing:
            raise OnloadError(f"{self.source.path}: the checkpoint has no tensor named {missing[0]!r} "
                              f"({len(missing)} missing): --onload reads tensors by the model's own names; compress "
                              f"this model in memory (without --onload)")
        for name, t in self.source.read(want, torch.float32, self.device).items():
            _assign(holders[name], t)

    def place(self, model: nn.Module, device: str) -> None:
        self.device = device
        for holders in _holders(model).values():
            t = _tensor(holders)
            if t.device.type != "meta":
                _assign(holders, t.to(device))

    def onload_rest(self, model: nn.Module) -> None:
        self._read(model, self._outside)

    def capture(self, model, blocks, batches, device, adapter) -> Captured:
        """Block 0's inputs and every block's arguments: the embeddings read for it, every block
        skipped (its arguments do not depend on its input), then the embeddings freed."""
        self.onload_rest(model)
        try:
            return capture_inputs(model, blocks, batches, device, adapter, skip_blocks=True)
        finally:
            to_meta(model, self._from_checkpoint(self._outside))

    def _from_checkpoint(self, keep):
        """Only what the checkpoint holds goes back to meta (buffers computed at build time stay)."""
        return lambda n: keep(n) and n in self.source.where

    def span(self, n_groups: int) -> range:
        return span_of(n_groups, self.rank, self.world)

    def onload(self, model: nn.Module, blocks: list[int]) -> None:
        self._read(model, lambda n: self._in_blocks(n, blocks))
        for b in blocks:
            bad = non_finite_tensors(self.adapter.blocks(model)[b], f"{self.prefix}{b}.")
            if bad:
                raise NonFiniteError(f"the model to compress has NaN or infinite weights in {', '.join(bad[:5])}; "
                                     f"the run stopped")

    def offload(self, model: nn.Module, blocks: list[int]) -> None:
        to_meta(model, self._from_checkpoint(lambda n: self._in_blocks(n, blocks)))

    def _mine(self, stage: int, group: int, blocks: list[int]):
        store = f"{BASES_ATTR}.s{stage}_g{group}_"
        return lambda n: self._in_blocks(n, blocks) or n.startswith(store)

    def done(self, model, stage, group, report, streams) -> None:
        from layershare.checkpoint.save import layer_map, state_dict_unique

        rss = peak_rss_and_reset()
        if rss is not None:
            report.info["peak_rss"] = rss
        mine = self._mine(stage, group, report.blocks)
        tensors = state_dict_unique(model, self.dtype, keep=mine)
        lm = layer_map(model)
        entry = {"bases": {k: v for k, v in lm["bases"].items() if mine(f"{BASES_ATTR}.{k}.")},
                 "layers": {k: v for k, v in lm["layers"].items() if mine(k + ".")}}
        hidden = {f"dense.{i}": h for i, h in enumerate(streams["dense"].hidden)}
        comp = streams["compressed"]
        if comp is not None and comp.hidden is not streams["dense"].hidden:
            hidden.update({f"compressed.{i}": h for i, h in enumerate(comp.hidden)})
        previous = group - 1 if group - 1 >= self._span.start else None
        self.staging.write_group(stage, group, tensors, entry, report_dict(report), hidden, previous)
        to_meta(model, lambda n: mine(n) and (n in tensors or n in self.source.where))

    def resume(self, stage, groups, streams):
        self._span = self.span(len(groups))
        if not self._span:  # more processes than groups: nothing to do here
            return self._span.start, self._span.start, []
        first, done = self._span.start, []
        while first < self._span.stop:  # the finished groups the range starts with (inputs from the staging)
            report = self.earlier(stage, first, groups, streams)
            if report is None:
                break
            done.append(report)
            first += 1
        return first, (0 if first == self._span.start else first), done

    def _hidden_after(self, stage: int, group: int, n_groups: int, streams: dict) -> None:
        """The streams at the input of group + 1, from the hidden states staged after `group`."""
        hidden = self.staging.hidden(stage, group)
        if hidden is None:
            raise OnloadError(f"{self.staging.dir}: group {group + 1} (of 1 to {n_groups}) is finished but the hidden "
                              f"states after it are missing; delete the staging area to start over")
        n = len(streams["dense"].hidden)
        dense = [hidden[f"dense.{i}"] for i in range(n)]
        comp = streams["compressed"]
        if comp is not None:
            comp.hidden = [hidden[f"compressed.{i}"] for i in range(n)] if "compressed.0" in hidden else dense
        streams["dense"].hidden = dense

    def earlier(self, stage, group, groups, streams):
        """A finished group is adopted, not redone (at the start of the range after a crash; after
        an unfinished one when the run before had another number of processes); the streams come
        from its staged hidden states when the next group is to be compressed here."""
        if not self.staging.finished(stage, group):
            return None
        report = adopt(self.staging, stage, group, self.model)
        nxt = group + 1
        if nxt < self._span.stop and not self.staging.finished(stage, nxt):
            self._hidden_after(stage, group, len(groups), streams)
        return report


def peak_rss_and_reset() -> int | None:
    """This process's peak resident memory (bytes) since the last call, then the peak is reset
    (Linux: VmHWM, /proc/self/clear_refs); None where that is not available."""
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak
    except (OSError, StopIteration, ValueError):
        return None


def report_dict(r: GroupReport) -> dict:
    s = r.stats
    return {"blocks": r.blocks, "rank": r.rank, "nnz": r.nnz, "seconds": r.seconds, "info": r.info,
            "stats": {"rel_err_before": s.rel_err_before, "rel_err_after": s.rel_err_after,
                      "steps": s.steps, "loss_curve": s.loss_curve, "kept_init": s.kept_init}}


def adopt(staging: Staging, stage: int, group: int, model: nn.Module) -> GroupReport:
    """A group finished earlier (or by another rank): its compressed structure built into the
    model on the meta device (from its staged entry and tensor shapes) and its report."""
    from layershare.checkpoint.read import build_skeleton

    entry, report, shapes = staging.read_group(stage, group)
    build_skeleton(model, {"bases": entry["bases"], "layers": entry["layers"]}, shapes,
                   repr(str(staging.weights(stage, group))))
    s = report["stats"]
    stats = ReconStats(s["rel_err_before"], s["rel_err_after"], s["steps"], s["loss_curve"], s["kept_init"])
    return GroupReport(report["blocks"], report["rank"], report["nnz"], stats, report["seconds"], report["info"])


# -- the output ---------------------------------------------------------------------------------


def write_output(model: nn.Module, residency: Onloaded, stage: int, n_groups: int):
    """The writer io._save calls: one shard per group (hard links to the staged files, which stay
    until the directory is in place), one for everything else (read again from the checkpoint)
    with the entry's guard, and transformers' index."""

    def write(entry: dict, folder: Path, dtype: torch.dtype) -> dict[str, dict]:
        from layershare.checkpoint.save import state_dict_unique

        n = n_groups + 1
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for g in range(n_groups):
            src, dst = residency.staging.weights(stage, g), folder / names[g]
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        residency.onload_rest(model)
        rest = state_dict_unique(model, dtype, keep=residency._outside)
        to_meta(model, residency._from_checkpoint(residency._outside))
        if entry.get("guard"):
            rest[entry["guard"]] = torch.zeros(0, dtype=dtype)
        save_file(rest, str(folder / names[-1]), metadata={"format": "pt"})
        del rest
        weight_map, total = {}, 0
        for name in names:
            for k, v in raw_header(folder / name)[1].items():
                if k != "__metadata__":
                    weight_map[k] = name
                    total += v["data_offsets"][1] - v["data_offsets"][0]
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2, sort_keys=True))
        return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                for name in names}

    return write


# -- torchrun -------------------------------------------------------------------------------------


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed() -> None:
    import torch.distributed as dist

    if world()[1] > 1 and not dist.is_initialized():
        # a barrier is all the ranks exchange; a rank may wait hours for the slowest
        dist.init_process_group("gloo", timeout=timedelta(days=7))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- the whole run ----------------------------------------------------------------------------


def compress_checkpoint(model_dir: str | Path, recipe=None, data=None, tokenizer=None,
                        output_dir: str | Path | None = None, overwrite: bool = False, batch_size: int = 8,
                        source: str | None = None, callbacks=(), allow_ratio_miss: bool = False):
    """Compress the model of a local transformers directory without loading it: group by group
    from its safetensors, resumable, and split among torchrun's ranks (see the module's text).
    The recipe must be one group-by-group stage (fips, svd, svd-llm, basis-sharing,
    basis-sharing-attention). Returns api.CompressionResult with `model=None` (load the output
    directory); on ranks other than 0, also `sizes=None` and `output_dir=None`."""
    import dataclasses

    from layershare import __version__
    from layershare.adapters import get_adapter
    from layershare.api import (
        CompressionResult,
        _calibration,
        as_recipe,
        check_context,
        preflight,
        seed_everything,
        stage_meta,
    )
    from layershare.checkpoint.outputs import check_output_dir, output_lock
    from layershare.checkpoint.save import _save
    from layershare.checkpoint.sizes import measure
    from layershare.checkpoint.source import record
    from layershare.compression.budget import count_params
    from layershare.compression.pipeline import run_stages
    from layershare.compression.targets import check_ratio

    recipe = as_recipe(recipe)
    return_freed_memory()
    rank, world_size, local_rank = world()
    if world_size > 1 and recipe.device.startswith("cuda"):
        recipe = dataclasses.replace(recipe, device=f"cuda:{local_rank}")
    recipe.check_device()
    if output_dir is None:
        raise OnloadError("an onloaded compression writes its groups as it goes: give output_dir")
    if data is None:
        from layershare.data.text import DataError

        raise DataError("compress needs calibration data (data=...)")
    check_output_dir(output_dir, overwrite)
    model = skeleton(model_dir)
    src = CheckpointSource(model_dir, model)
    adapter = get_adapter(model)
    if adapter.task != "causal-lm":
        raise OnloadError(f"--onload compresses causal LMs; {model_dir!r} is a {adapter.task} model (compress it "
                          f"in memory)")
    check_context(model, recipe.seqlen, adapter.task)
    stages, miss = preflight(model, recipe, output_dir, overwrite, allow_ratio_miss)
    method = stages[0].method
    if len(stages) != 1 or method.needs().driver != "sequential":
        names = ", ".join(s.method.name for s in stages)
        raise OnloadError(f"--onload runs recipes of one group-by-group stage (fips, svd, svd-llm, basis-sharing, "
                          f"basis-sharing-attention); this recipe has: {names}")
    if method.needs().probe:
        raise OnloadError(f"{method.name}'s allocation 'error' probes every group on the whole model, which "
                          "--onload does not hold: use the uniform allocation, or pass per-group weights "
                          "(allocation: [w1, w2, ...])")
    sequential_dependence = method.needs().update_grams or getattr(method.config, "propagate", "dense") == "compressed"
    if world_size > 1 and sequential_dependence:
        raise OnloadError(f"{method.name} needs the model compressed so far as each group's input (a closed-form "
                          f"update, or propagate='compressed'): its groups cannot run on several processes at "
                          f"once; run it in one process (--onload still onloads and resumes)")
    init_distributed()
    batches = _calibration(data, tokenizer, recipe, batch_size)
    staging = Staging(output_dir)
    parts = dict(recipe=recipe.to_dict() | {"device": recipe.device.split(":")[0]}, config=json.loads((Path(model_dir) / "config.json").read_text()),
                 files=src.files(), calibration=batches, version=__version__)
    n_groups = len(stages[0].groups)
    from contextlib import nullcontext

    with output_lock(output_dir) if rank == 0 else nullcontext():
        if rank == 0:  # (another run's area is refused here, and left as it is)
            staging.open(print_=True, **parts)
        try:
            barrier()
            if rank != 0:
                staging.open(print_=False, **parts)
            seed_everything(recipe.seed)
            dense_params = count_params(model)
            residency = Onloaded(src, staging, adapter, model, getattr(torch, recipe.dtype), rank, world_size)
            report = run_stages(model, adapter, stages, recipe, batches, callbacks, residency=residency)
            barrier()  # every rank's groups are staged
            if rank != 0:
                barrier()  # rank 0 has written the output
                return CompressionResult(model=None, report=report, sizes=None, output_dir=None)
            stage_report = report.stages[0]
            mine = dict(zip(residency.span(n_groups), stage_report.groups))
            stage_report.groups = [mine[g] if g in mine else adopt(staging, 0, g, model) for g in range(n_groups)]
            sizes = measure(model, dense_params, recipe.bytes_per_param)
            misses = [miss, check_ratio(stages, sizes.ratio, "the compressed model has", allow_ratio_miss)]
            meta = {"method": recipe.method, **record(source or str(model_dir)), "recipe": recipe.to_dict(),
                    "sizes": sizes.as_dict(), "seconds": report.seconds, "dense_params": dense_params,
                    "stages": [stage_meta(s) for s in report.stages], "onload": {"processes": world_size}}
            if any(misses):
                meta["ratio_missed"] = [m for m in misses if m]
            out = _save(model, check_output_dir(output_dir, overwrite), tokenizer, recipe.dtype, meta, recipe,
                        write=write_output(model, residency, 0, n_groups))
            staging.remove()
        except BaseException as e:
            if rank == 0 and staging.exists():
                done = len(staging.finished_any())
                if done:  # what a rerun of the same command resumes from
                    e.add_note(f"{done} finished group(s) kept in {staging.dir}: rerun the same command to resume, "
                               f"or delete it")
                else:  # nothing to resume: no staging area survives a failed run
                    staging.remove()
            raise
    barrier()
    return CompressionResult(model=None, report=report, sizes=sizes, output_dir=out)
