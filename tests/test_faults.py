"""Fault injection, each case as a user meets it (issue 31): the command line in its own process
(`python -m layershare`) or the Python API, on tiny models. Each case ends in the right result
or in one error line (exit 2: an input or option refused; exit 1: the work ran and its result
failed a check), with nothing left behind or overwritten. docs/reliability.md tables the cases."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SAMPLE_TEXT, make_model, small_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import layershare
from layershare.checkpoint.hf_quantizer import LayershareConfig
from layershare.checkpoint.verify import CheckpointError, UnverifiedWarning, file_sha256
from layershare.modules.shared_basis import SharedBasisLinear


# The command line runs in a process of its own per case, forked from one interpreter that has
# imported layershare (and so torch and transformers, ~3 s a process) and never runs a model
# itself: each case is `python -m layershare ARGS` (its exit status, stdout, stderr) without
# paying for the imports again.
SERVER = r"""
import json, os, sys, traceback
import layershare.cli
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(req["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["layershare", *req["args"]]
        try:
            code = layershare.cli.main(req["args"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture
def cli(server, tmp_path_factory):
    """`layershare ARGS` in a process of its own: (exit status, stdout, stderr)."""
    logs = tmp_path_factory.mktemp("cli")

    def run(*args, cwd=None) -> subprocess.CompletedProcess:
        out, err = logs / "stdout", logs / "stderr"
        server.stdin.write(json.dumps({"args": [str(a) for a in args], "cwd": str(cwd or os.getcwd()),
                                       "stdout": str(out), "stderr": str(err)}) + "\n")
        server.stdin.flush()
        code = json.loads(server.stdout.readline())
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())
    return run


def error_line(run: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The run failed with `code` and one error line (the last of stderr) holding every fragment."""
    assert run.returncode == code, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", run.stderr) if line.strip()]
    assert lines and lines[-1].startswith("layershare: error: "), run.stderr[-3000:]
    for f in fragments:
        assert f in lines[-1], lines[-1]
    return lines[-1]


def refused_before_loading(run: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 with a single line on stderr, and no model was loaded."""
    error_line(run, 2, *fragments)
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "loaded" not in run.stdout and "loading" not in run.stdout + run.stderr


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time (what 'nothing written' compares)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def record_weights(d: Path) -> None:
    """layershare.json told the size and SHA-256 of rewritten weights (an edit that recomputes them)."""
    meta = json.loads((d / "layershare.json").read_text())
    f = d / "model.safetensors"
    meta["weights_files"]["model.safetensors"] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    meta["weights_bytes"] = f.stat().st_size
    (d / "layershare.json").write_text(json.dumps(meta))


def edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer):
    """A tiny dense Llama at models/x (vocabulary 300, context 256), another one with a vocabulary
    of 128 at models/v128, a calibration text, and x compressed once (FiPS 20%) into c, from the
    relative path "models/x" as a user in that folder would give it."""
    root = tmp_path_factory.mktemp("faults")
    dense, other = root / "models" / "x", root / "models" / "v128"
    make_model("llama", vocab=300).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    make_model("llama", seed=1, vocab=128).save_pretrained(other)
    tokenizer.save_pretrained(other)
    calib = root / "calib.txt"
    calib.write_text(SAMPLE_TEXT * 20)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        model, tok = layershare.load_model("models/x")
        layershare.compress(model, small_recipe(ratio=0.2), data=str(calib), tokenizer=tok, output_dir=root / "c",
                            source="models/x")
    finally:
        os.chdir(cwd)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    return SimpleNamespace(root=root, dense=dense, other=other, calib=calib, comp=root / "c", ids=ids)


@pytest.fixture
def work(env, tmp_path):
    """A folder of this test's own, with a copy of the compressed directory at d."""
    copy(env.comp, tmp_path / "d")
    return tmp_path


# -- 1. the teacher finetune distils from -----------------------------------------------------------


def test_the_recorded_teacher_is_an_absolute_path_and_used_from_anywhere(env, work, cli):
    meta = json.loads((env.comp / "layershare.json").read_text())
    assert meta["source"] == str(env.dense) and len(meta["source_sha256"]) == 64
    elsewhere = work / "elsewhere"  # where "models/x" is another model
    copy(env.other, elsewhere / "models" / "x")
    run = cli("finetune", env.comp, "--data", env.calib, "--output", work / "ft", "--steps", "1", "--batch-size", "2",
              "--seqlen", "32", "--max-samples", "2", cwd=elsewhere)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"the teacher {env.dense} " in run.stdout
    assert json.loads((work / "ft" / "layershare.json").read_text())["source"] == str(env.dense)


def test_a_teacher_missing_or_changed_since_compression_is_refused(env, work, cli):
    teacher = copy(env.dense, work / "teacher")
    meta = json.loads((work / "d" / "layershare.json").read_text())
    (work / "d" / "layershare.json").write_text(json.dumps({**meta, "source": str(teacher)}))  # it moved here
    shutil.copyfile(env.other / "model.safetensors", teacher / "model.safetensors")  # other weights, same path
    before = listing(work)
    run = cli("finetune", work / "d", "--data", env.calib, "--output", work / "ft", "--seqlen", "32")
    refused_before_loading(run, f"'{teacher}' is not the dense model", meta["source_sha256"][:16], "--teacher")
    shutil.rmtree(teacher)
    run = cli("finetune", work / "d", "--data", env.calib, "--output", work / "ft", "--seqlen", "32")
    refused_before_loading(run, f"'{teacher}', is missing", "--teacher")
    assert listing(work) == {k: v for k, v in before.items() if not k.startswith("teacher")}
    from layershare.checkpoint.source import recorded_teacher

    with pytest.raises(ValueError, match="without a hash of its weights"):  # a directory saved before the hash
        recorded_teacher({"source": "models/x"}, "old")


# -- 2. options checked before the work ---------------------------------------------------------------


def test_a_bad_shard_size_is_refused_before_any_work(env, work, cli):
    from layershare.checkpoint.save import shard_size

    for size in ("1", "2XB", "0GB"):
        run = cli("compress", env.dense, "--calib", env.calib, "--output", work / "o", "--max-shard-size", size)
        refused_before_loading(run, f"max shard size '{size}'")
    assert not (work / "o").exists()
    assert (shard_size("2GiB"), shard_size("500MB"), shard_size(60_000)) == (2 << 30, 500_000_000, 60_000)
    model = make_model("llama")
    with pytest.raises(ValueError, match="max shard size '2 GiBs'"):
        layershare.compress(model, small_recipe(), data=None, output_dir=work / "o", max_shard_size="2 GiBs")
    assert not any(isinstance(m, SharedBasisLinear) for m in model.modules()) and not (work / "o").exists()


def test_window_and_length_options_are_checked_before_loading(env, work, cli):
    before = listing(work)
    for args, message in (
            (["eval", work / "d", "--text", env.calib, "--max-windows", "0"], "--max-windows: must be at least 1"),
            (["eval", work / "d", "--text", env.calib, "--max-windows", "-1"], "--max-windows: must be at least 1"),
            (["compress", env.dense, "--calib", env.calib, "--output", work / "o", "--eval-text", env.calib,
              "--eval-windows", "0"], "--eval-windows: must be at least 1"),
            (["eval", work / "d", "--text", env.calib, "--seqlen", "257"], "--seqlen 257 is longer than the context"),
            (["finetune", work / "d", "--data", env.calib, "--output", work / "o", "--seqlen", "300"],
             "(256 tokens)"),
            (["finetune", work / "d", "--data", env.calib, "--output", work / "o", "--lr", "0"],
             "--lr: must be a positive number")):
        refused_before_loading(cli(*args), message)
    assert listing(work) == before


# -- 3. a directory without layershare.json ----------------------------------------------------------


def test_a_directory_without_layershare_json_is_refused_unless_unverified(env, work, cli):
    d = work / "d"
    (d / "layershare.json").unlink()
    with pytest.raises(CheckpointError, match="layershare.json is missing.*verify=False"):
        layershare.load(d)
    with pytest.raises(CheckpointError, match="layershare.json is missing"):
        AutoModelForCausalLM.from_pretrained(d)
    refused_before_loading(cli("eval", d, "--text", env.calib), "layershare.json is missing", "--no-verify")
    with pytest.warns(UnverifiedWarning, match="UNVERIFIED"):
        model = layershare.load(d, verify=False)
    assert torch.equal(logits(model, env.ids), logits(layershare.load(env.comp), env.ids))
    run = cli("eval", d, "--text", env.calib, "--seqlen", "64", "--max-windows", "1", "--no-verify")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("UNVERIFIED") == 1 and "perplexity" in run.stdout
    # a directory whose layershare.json the user wrote by hand, recording nothing
    (d / "layershare.json").write_text("{}")
    with pytest.raises(CheckpointError, match="records no SHA-256"):
        layershare.load(d)


def test_save_pretrained_copies_are_verified_like_the_original(env, work, cli):
    model = AutoModelForCausalLM.from_pretrained(env.comp, quantization_config=LayershareConfig(runtime="compact"))
    model.save_pretrained(work / "copy")
    meta = json.loads((work / "copy" / "layershare.json").read_text())
    assert meta["saved_by"] == "save_pretrained" and meta["method"] == "fips" and "config_sha256" in meta
    assert torch.equal(logits(layershare.load(work / "copy"), env.ids), logits(layershare.load(env.comp), env.ids))
    info = cli("info", work / "copy")
    assert info.returncode == 0 and "compressed with fips" in info.stdout and "20.00% fewer" in info.stdout
    data = bytearray((work / "copy" / "model.safetensors").read_bytes())
    data[-5] ^= 0x40  # a flipped bit in the copy's weights
    (work / "copy" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        layershare.load(work / "copy")


# -- 4. edits outside the layershare entry -------------------------------------------------------------


@pytest.mark.parametrize("edit", [
    lambda c: c.update(rms_norm_eps=1e-2),
    lambda c: c["rope_parameters"].update(rope_theta=500.0),
    lambda c: c.update(hidden_size=128),
])
def test_config_edits_that_change_the_computation_are_refused(env, work, edit):
    d = work / "d"
    edit_config(d, edit)
    with pytest.raises(CheckpointError, match="config.json does not match the hash"):
        layershare.load(d)
    with pytest.raises(CheckpointError, match="config.json does not match the hash"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_edits_that_cannot_change_it_load_and_info_checks_the_rest(env, work, cli):
    d = work / "d"
    edit_config(d, lambda c: c.update(transformers_version="0.0.1", _name_or_path="elsewhere"))
    assert torch.equal(logits(layershare.load(d), env.ids), logits(layershare.load(env.comp), env.ids))
    edit_config(d, lambda c: c.update(hidden_size=128))
    error_line(cli("info", d), 2, "config.json does not match the hash")
    # the load-time choices are the caller's: a file saying "verify": false switches nothing off
    e = copy(env.comp, work / "e")
    edit_config(e, lambda c: c["quantization_config"].update(verify=False, runtime="compact"))
    data = bytearray((e / "model.safetensors").read_bytes())
    data[-5] ^= 0x40
    (e / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        AutoModelForCausalLM.from_pretrained(e)


def test_an_extra_tensor_is_refused_on_every_load_path(env, work):
    d = work / "d"
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 4)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    record_weights(d)  # hashes recomputed: only the structure can tell
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra"):
        layershare.load(d)
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra"):
        AutoModelForCausalLM.from_pretrained(d)


# -- 5. NaN and other failures: one line, the right status ---------------------------------------------


def test_non_finite_logits_fail_eval_naming_the_first_layer(env, work, cli):
    d = work / "d"
    sd = load_file(str(d / "model.safetensors"))
    basis = sorted(k for k in sd if k.endswith(".U"))[0]
    sd[basis][0, 0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    error_line(cli("eval", d, "--text", env.calib, "--seqlen", "64"), 2, "does not match the SHA-256")
    run = cli("eval", d, "--text", env.calib, "--seqlen", "64", "--no-verify", "--runtime", "compact")
    error_line(run, 1, "the logits are not finite", "model.layers.0.mlp.gate_proj (SharedBasisLinear)", basis)
    assert "perplexity nan" not in run.stdout


def test_a_teacher_of_another_vocabulary_is_refused_for_a_quantized_directory(env, work, cli):
    q = work / "q"
    from layershare.methods import QuantConfig

    model, tok = layershare.load_model(str(env.dense))
    layershare.compress(model, layershare.Recipe(stages=[QuantConfig(bits=4)], nsamples=8, seqlen=32),
                        data=str(env.calib), tokenizer=tok, output_dir=q, source=str(env.dense))
    run = cli("finetune", q, "--data", env.calib, "--output", work / "o", "--teacher", env.other, "--seqlen", "32")
    refused_before_loading(run, "vocabulary of 128 tokens", "one of 300")
    student = layershare.load(q, runtime="compact")
    teacher, _ = layershare.load_model(str(env.other))
    from layershare.compression.distill import FinetuneError

    with pytest.raises(FinetuneError, match="teacher's vocabulary has 128 entries, the student's 300"):
        layershare.finetune(student, teacher, str(env.calib), tok, steps=1, batch_size=2, seqlen=32,
                            output_dir=work / "o")
    assert not (work / "o").exists()


def test_a_diverging_finetune_fails_and_saves_nothing(env, work):
    from layershare.compression.distill import FinetuneDiverged

    student = layershare.load(work / "d", runtime="compact")
    teacher, tok = layershare.load_model(str(env.dense))
    with pytest.raises(FinetuneDiverged, match="fine-tuning diverged.*nothing was saved") as e:
        layershare.finetune(student, teacher, str(env.calib), tok, steps=3, batch_size=2, seqlen=32, lr=1e12,
                            max_samples=4, output_dir=work / "o")
    assert e.value.exit_code == 1 and not (work / "o").exists()


# -- 6. options that do what they say ------------------------------------------------------------------


def test_a_16_bit_storage_dtype_is_what_both_loaders_give(env, work):
    model, tok = layershare.load_model(str(env.dense))
    layershare.compress(model, small_recipe(dtype="float16"), data=str(env.calib), tokenizer=tok,
                        output_dir=work / "h")
    assert json.loads((work / "h" / "config.json").read_text())["dtype"] == "float16"
    for loaded, want in ((layershare.load(work / "h"), torch.float16),
                         (AutoModelForCausalLM.from_pretrained(work / "h"), torch.float16),
                         (layershare.load(work / "h", dtype=torch.float32), torch.float32),
                         (AutoModelForCausalLM.from_pretrained(work / "h", dtype=torch.float32), torch.float32)):
        assert {p.dtype for p in loaded.parameters() if p.is_floating_point()} == {want}
        assert torch.isfinite(logits(loaded, env.ids)).all()


def test_a_ratio_too_small_to_pay_for_the_format_is_refused_or_warned(env, work, cli):
    run = cli("compress", env.dense, "--calib", env.calib, "--output", work / "o", "--ratio", "1e-9",
              "--nsamples", "4", "--seqlen", "32")
    error_line(run, 2, "ratio 1e-09) removes no parameter", "larger than the dense model")
    assert not (work / "o").exists()
    from layershare.api import LargerThanDenseWarning

    model, tok = layershare.load_model(str(env.dense))
    with pytest.warns(LargerThanDenseWarning, match=r"take [\d,]+ bytes, \d+\.\d+% more than the dense model's"):
        layershare.compress(model, small_recipe(ratio=0.001), data=str(env.calib), tokenizer=tok,
                            output_dir=work / "tiny")


def test_an_attention_method_without_a_ratio_says_which_ratios_it_used(env):
    from layershare.cli import build_parser, build_recipe
    from layershare.compression.targets import RatioMissError

    args = build_parser().parse_args(["compress", "m", "--calib", "c", "--output", "o", "--attention-method", "masa",
                                      "--nsamples", "8", "--seqlen", "32"])
    recipe = build_recipe(args)
    assert (recipe.stages[0].ratio, recipe.stages[0].ratio_of) == (0.2, "attention")  # as --attention-ratio's help
    # the tiny model's attention rounds off its target: the message says what each stage asked for
    with pytest.raises(RatioMissError, match=r"target of 25\.20% \(masa 5\.20%: ratio 0\.2 of the attention; "
                                             r"fips 20\.00%: ratio 0\.2 of the model\)"):
        layershare.compress(make_model("llama"), recipe, data=None)


def test_failed_runs_leave_no_staging_area_or_partial_output(env, work, tokens):
    from layershare.compression.drivers import Callback
    from layershare.compression.onload import compress_checkpoint

    class Fail(Callback):
        def on_group_start(self, stage, group, blocks):
            raise RuntimeError("injected")

    for onload in (False, True):
        out = work / f"o{onload}"
        with pytest.raises(RuntimeError, match="injected"):
            if onload:
                compress_checkpoint(env.dense, small_recipe(), data=tokens, output_dir=out, callbacks=[Fail()])
            else:
                layershare.compress(make_model("llama"), small_recipe(), data=tokens, output_dir=out,
                                    callbacks=[Fail()])
        assert sorted(p.name for p in work.iterdir()) == ["d"]


def test_version(env, cli):
    run = cli("--version")
    assert run.returncode == 0 and run.stdout.startswith(f"layershare {layershare.__version__} (torch ")


# -- 7. the thread count ----------------------------------------------------------------------------------


def test_the_thread_count_is_recorded(env):
    text = (env.comp / "recipe.yaml").read_text()
    assert text.startswith(f"# ran with {torch.get_num_threads()} torch thread(s)")
    assert json.loads((env.comp / "layershare.json").read_text())["threads"] == torch.get_num_threads()
    assert layershare.Recipe.from_yaml(env.comp / "recipe.yaml").main.ratio == 0.2
