"""Onloaded compression (onload.py, staging.py): group by group from the checkpoint's shards,
resumed after an interruption, split among torchrun's processes; each compared byte for byte
with the in-memory path or an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, make_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import layershare
from layershare.compression.drivers import Callback
from layershare.compression.onload import OnloadError, compress_checkpoint, span_of
from layershare.compression.staging import StagingMismatchError, staging_dir

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _recipe(method="fips", **kw):
    base = dict(nsamples=8, seqlen=32)
    if method == "fips":
        base.update(steps=2, batch_tokens=128, group_size=1)
    base.update(kw)
    return layershare.Recipe.of(method, **base)


def _dense(tmp_path, arch="llama", shard="150KB", vocab=128):
    path = tmp_path / f"dense-{arch}"
    make_model(arch, vocab=vocab).save_pretrained(path, max_shard_size=shard)
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_files(a: Path, b: Path) -> list[str]:
    """Files of `a` whose bytes differ in `b` (layershare.json holds timings: left out)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    return [n for n in names if n != "layershare.json" and (a / n).read_bytes() != (b / n).read_bytes()]


@pytest.mark.parametrize("arch,method", [("llama", "fips"), ("gpt_neox", "fips"), ("llama", "svd-llm")])
def test_onloaded_equals_in_memory(tmp_path, tokens, arch, method):
    """Same tensors, bit for bit, same config entry and sizes (GPT-NeoX: its checkpoint names the
    head embed_out; SVD-LLM with its update: the second, compressed stream of hidden states)."""
    dense = _dense(tmp_path, arch)
    recipe = _recipe(method, **({} if method == "fips" else {"ratio": 0.1, "update": True}))
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    mem = layershare.compress(model, recipe, data=tokens, output_dir=tmp_path / "mem", allow_ratio_miss=True)
    onl = compress_checkpoint(dense, recipe, data=tokens, output_dir=tmp_path / "onl", allow_ratio_miss=True)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "onl")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    entry = [json.loads((tmp_path / d / "config.json").read_text())["layershare"] for d in ("mem", "onl")]
    assert entry[0] == entry[1]
    assert mem.sizes == onl.sizes and onl.model is None
    shards = sorted(p.name for p in (tmp_path / "onl").glob("*.safetensors"))
    assert len(shards) == len(mem.report.groups) + 1  # one per group + the rest
    assert not staging_dir(tmp_path / "onl").exists()
    x = tokens[:20][None]
    assert torch.equal(layershare.load(tmp_path / "mem")(x).logits, layershare.load(tmp_path / "onl")(x).logits)


class _Interrupt(Callback):
    def __init__(self, after: int, kill: bool = False):
        self.after, self.kill = after, kill

    def on_group_end(self, stage, group, report):
        if group == self.after:
            if self.kill:
                os.kill(os.getpid(), 9)
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["fips", "svd-llm"])
def test_resume_after_interrupt_is_byte_identical(tmp_path, tokens, method):
    """FiPS, and SVD-LLM with its update (the compressed stream comes back from the staging area)."""
    dense = _dense(tmp_path)
    recipe = _recipe() if method == "fips" else _recipe(method, ratio=0.1, update=True)
    whole = compress_checkpoint(dense, recipe, data=tokens, output_dir=tmp_path / "whole", allow_ratio_miss=True)
    n = len(whole.report.stages[0].groups)
    assert n >= 2
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(dense, recipe, data=tokens, output_dir=tmp_path / "out", callbacks=[_Interrupt(n - 2)],
                            allow_ratio_miss=True)
    staged = sorted(p.name for p in staging_dir(tmp_path / "out").iterdir())
    assert [x for x in staged if x.endswith(".json") and x != "manifest.json"] == [
        f"s0-g{g:05d}.json" for g in range(n - 1)]
    assert not (tmp_path / "out").exists()
    started = []

    class Count(Callback):
        def on_group_start(self, stage, group, blocks):
            started.append(group)

    compress_checkpoint(dense, recipe, data=tokens, output_dir=tmp_path / "out", callbacks=[Count()],
                        allow_ratio_miss=True)
    assert started == [n - 1]  # the finished groups were not redone
    assert _same_files(tmp_path / "whole", tmp_path / "out") == []
    assert not staging_dir(tmp_path / "out").exists()


def test_resume_adopts_finished_groups_after_an_unfinished_one(tmp_path, tokens):
    """What a rerun with another process count meets: group 1 unfinished, groups 2.. finished (by
    the other rank). They are adopted, not redone, and the output is the uninterrupted run's."""
    dense = _dense(tmp_path)
    whole = compress_checkpoint(dense, _recipe(), data=tokens, output_dir=tmp_path / "whole")
    n = len(whole.report.stages[0].groups)
    assert n >= 4
    for out, after in (("other", n - 2), ("out", 0)):
        with pytest.raises(KeyboardInterrupt):
            compress_checkpoint(dense, _recipe(), data=tokens, output_dir=tmp_path / out,
                                callbacks=[_Interrupt(after)])
    other, mine = staging_dir(tmp_path / "other"), staging_dir(tmp_path / "out")
    for g in range(2, n - 1):  # the other rank's groups, with the hidden states after its last
        for f in other.glob(f"s0-g{g:05d}.*"):
            shutil.copy(f, mine / f.name)
    started = []

    class Count(Callback):
        def on_group_start(self, stage, group, blocks):
            started.append(group)

    compress_checkpoint(dense, _recipe(), data=tokens, output_dir=tmp_path / "out", callbacks=[Count()])
    assert started == [1, n - 1]
    assert _same_files(tmp_path / "whole", tmp_path / "out") == []


@pytest.mark.slow
def test_kill9_between_groups_then_resume_is_byte_identical(tmp_path, tokens):
    dense = _dense(tmp_path)
    torch.save(tokens, tmp_path / "tokens.pt")
    code = (f"import torch, layershare; from layershare.compression.onload import compress_checkpoint; "
            f"from test_onload import _recipe, _Interrupt; "
            f"compress_checkpoint({str(dense)!r}, _recipe(), data=torch.load({str(tmp_path / 'tokens.pt')!r}), "
            f"output_dir={str(tmp_path / 'out')!r}, callbacks=[_Interrupt(2, kill=True)])")
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{SRC}:{here}"}, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list(staging_dir(tmp_path / "out").glob("s0-g*.json"))) == 3
    compress_checkpoint(dense, _recipe(), data=tokens, output_dir=tmp_path / "out")
    compress_checkpoint(dense, _recipe(), data=tokens, output_dir=tmp_path / "whole")
    assert _same_files(tmp_path / "whole", tmp_path / "out") == []


@pytest.mark.slow
def test_torchrun_two_processes_byte_identical_to_one(tmp_path, tokenizer):
    """The real CLI under torchrun (gloo, 2 CPU processes of 1 thread) against 1 process of 1 thread."""
    dense = _dense(tmp_path, vocab=300)
    tokenizer.save_pretrained(dense)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 40)
    args = ["compress", str(dense), "--calib", str(tmp_path / "calib.txt"), "--nsamples", "8", "--seqlen", "32",
            "--steps", "2", "--group-size", "1", "--prompt", ""]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "layershare", *args, "--output",
                          str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "2 process(es)" in two.stdout
    one = subprocess.run([sys.executable, "-m", "layershare", *args, "--onload", "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert _same_files(tmp_path / "one", tmp_path / "two") == []
    meta = json.loads((tmp_path / "two" / "layershare.json").read_text())
    assert meta["onload"] == {"processes": 2} and len(meta["stages"][0]["groups"]) == 4


def _peak_rss(tmp_path, onload: bool) -> int:
    """Peak RSS above the process's RSS before the work, of one compression in a subprocess."""
    code = f"""
import json, torch
import layershare
from layershare.compression.onload import compress_checkpoint
tokens = torch.randint(0, 512, (4096,), generator=torch.Generator().manual_seed(0))
recipe = layershare.Recipe.of("svd", ratio=0.2, nsamples=8, seqlen=64)
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
torch.ones(64, 64) @ torch.ones(64, 64)
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # count the peak from here on (VmHWM), not the imports
def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
if {onload}:
    compress_checkpoint({str(tmp_path / 'dense')!r}, recipe, data=tokens, output_dir={str(tmp_path / 'onl')!r})
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r}, dtype=torch.float32)
    layershare.compress(model, recipe, data=tokens, output_dir={str(tmp_path / 'mem')!r})
print(json.dumps(peak() - base))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_a_fraction_of_the_model(tmp_path):
    """A 12-block Llama (~200 MB of float32 weights) compressed by SVD in memory and group by
    group, each in a subprocess: onloading saves at least 75% of the weights' bytes at the peak
    (it holds one group of 6, the embeddings only while capturing)."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense", max_shard_size="40MB")
    model_bytes = sum(f.stat().st_size for f in (tmp_path / "dense").glob("*.safetensors"))
    assert model_bytes > 190e6
    in_memory, onloaded = _peak_rss(tmp_path, False), _peak_rss(tmp_path, True)
    assert in_memory - onloaded > 0.75 * model_bytes, (in_memory, onloaded, model_bytes)
    assert _tensors(tmp_path / "mem").keys() == _tensors(tmp_path / "onl").keys()


def test_refusals_before_any_work(tmp_path, tokens, monkeypatch):
    dense = _dense(tmp_path)
    from layershare.methods import QuantConfig

    with pytest.raises(OnloadError, match="one group-by-group stage.*fips, quant"):
        compress_checkpoint(dense, layershare.Recipe(stages=[layershare.FiPSConfig(), QuantConfig(bits=4)],
                                                     nsamples=8, seqlen=32), data=tokens, output_dir=tmp_path / "o")
    with pytest.raises(OnloadError, match="this recipe has: masa"):
        compress_checkpoint(dense, _recipe("masa", ratio=0.1), data=tokens, output_dir=tmp_path / "o",
                            allow_ratio_miss=True)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "config.json").write_text((dense / "config.json").read_text())
    with pytest.raises(OnloadError, match="neither model.safetensors nor model.safetensors.index.json"):
        compress_checkpoint(tmp_path / "gguf", _recipe(), data=tokens, output_dir=tmp_path / "o")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OnloadError, match="svd-llm needs the model compressed so far.*cannot run on several"):
        compress_checkpoint(dense, _recipe("svd-llm", ratio=0.1, update=True), data=tokens,
                            output_dir=tmp_path / "o", allow_ratio_miss=True)
    assert not (tmp_path / "o").exists() and not staging_dir(tmp_path / "o").exists()


def test_a_staging_area_of_another_run_is_refused(tmp_path, tokens):
    dense = _dense(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(dense, _recipe(), data=tokens, output_dir=tmp_path / "out", callbacks=[_Interrupt(0)])
    with pytest.raises(StagingMismatchError, match=r"holds 1 finished group\(s\) of a different run"):
        compress_checkpoint(dense, _recipe(steps=3), data=tokens, output_dir=tmp_path / "out")
    assert len(list(staging_dir(tmp_path / "out").glob("s0-g*.json"))) == 1  # kept, not mixed in or deleted


def test_cli_onload_refuses_evaluation_flags(tmp_path, capsys):
    from layershare.cli import main

    dense = _dense(tmp_path)
    rc = main(["compress", str(dense), "--onload", "--calib", "x.txt", "--output", str(tmp_path / "o"),
               "--eval-text", "x.txt"])
    assert rc == 2
    assert "--eval-text: not with --onload" in capsys.readouterr().err


def test_span_of_covers_every_group_once():
    for n in range(1, 12):
        for world in range(1, 5):
            spans = [span_of(n, r, world) for r in range(world)]
            assert [g for s in spans for g in s] == list(range(n))
            assert max(len(s) for s in spans) - min(len(s) for s in spans) <= 1
