"""Inputs checked where they enter, output directories safe against concurrent and interrupted runs,
one clean error line per expected failure (issue 16; checkpoints: test_checkpoint.py)."""
import os
import signal

import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.checkpoint.outputs import OutputExistsError, output_lock, signals_deferred
from layershare.cli import main
from layershare.data.text import DataError, read_text


def test_two_runs_cannot_write_one_output(tokens, tmp_path):
    with output_lock(tmp_path / "c"):
        pid = os.fork()
        if pid == 0:  # another process: refused while the lock is held
            try:
                layershare.compress(make_model("llama"), small_recipe(), data=tokens, output_dir=tmp_path / "c")
                os._exit(1)
            except OutputExistsError as e:
                os._exit(0 if "another layershare run is writing" in str(e) else 2)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    assert not (tmp_path / "c").exists()
    layershare.compress(make_model("llama"), small_recipe(), data=tokens, output_dir=tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the lock file is gone too


def test_leftovers_of_interrupted_runs_are_cleaned(tmp_path):
    (tmp_path / ".c.partial-dead").mkdir()
    (tmp_path / ".c.old-1234").mkdir()
    (tmp_path / ".c.old-1234" / "model.safetensors").write_text("the old copy")
    with output_lock(tmp_path / "c"):  # an overwrite cut between its renames: the old copy comes back
        pass
    assert (tmp_path / "c" / "model.safetensors").read_text() == "the old copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    (tmp_path / ".c.old-5678").mkdir()  # with the output in place, a stale old copy is removed
    with output_lock(tmp_path / "c"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_signals_wait_for_the_overwrite_swap():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("term"))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []  # held while both renames run
        assert seen == ["term"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_text_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"\x7fELF\x00\x00\x01")
    with pytest.raises(DataError, match="is not UTF-8 text \\(byte 3"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match="looks binary"):
        read_text(tmp_path / "blob.txt")
    (tmp_path / "ok.txt").write_text("café", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "café"


def test_seqlen_above_the_context_is_refused_before_work(tokens, tmp_path):
    model = make_model("gpt2")  # 256 positions
    with pytest.raises(ValueError, match="seqlen 512 is longer than the model's context \\(256 tokens\\)"):
        layershare.compress(model, small_recipe(seqlen=512), data=tokens, output_dir=tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_output_apart_from_the_input_and_one_error_line(tmp_path, capsys):
    model_dir = tmp_path / "dense"
    make_model("llama").save_pretrained(model_dir)
    (tmp_path / "calib.txt").write_text("text " * 100)
    capsys.readouterr()  # (save_pretrained's progress bar)
    for out in (model_dir, model_dir / "sub", tmp_path):
        code = main(["compress", str(model_dir), "--calib", str(tmp_path / "calib.txt"), "--output", str(out),
                     "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "the input model" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert (model_dir / "config.json").exists()  # untouched
    with pytest.raises(ValueError, match="the input model"):  # --debug: the exception itself
        main(["--debug", "compress", str(model_dir), "--calib", str(tmp_path / "calib.txt"), "--output",
              str(model_dir), "--overwrite"])


def test_a_missing_model_is_one_line(capsys):
    assert main(["eval", "/nonexistent/model", "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layershare: error: ") and len(err.splitlines()) == 1
    assert torch.get_num_threads() >= 1


def test_a_ratio_missed_by_the_plan_is_refused_before_work_or_allowed_loudly(tokens, tmp_path, capsys):
    from layershare.compression.targets import RatioMissError, RatioMissWarning

    recipe = small_recipe(ratio=0.2, pattern="2:4")  # ranks multiples of 4 on the tiny model: 21.28%
    with pytest.raises(RatioMissError, match=r"the plan removes 21\.28% .* target of 20\.00% \(\+1\.28 points.*"
                                             r"--allow-ratio-miss"):
        layershare.compress(make_model("llama"), recipe, data=None, output_dir=tmp_path / "c")  # before the data
    assert not any(tmp_path.iterdir())
    with pytest.warns(RatioMissWarning, match="RATIO MISSED: the plan removes 21.28%"):
        layershare.compress(make_model("llama"), recipe, data=tokens, output_dir=tmp_path / "c",
                            allow_ratio_miss=True)
    import json

    missed = json.loads((tmp_path / "c" / "layershare.json").read_text())["ratio_missed"]
    assert len(missed) == 2 and missed[0].startswith("the plan removes 21.28%")
    assert missed[1].startswith("the compressed model has 21.")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.count("WARNING: RATIO MISSED") == 2
    # within the tolerance: no entry at all
    layershare.compress(make_model("llama"), small_recipe(ratio=0.2), data=tokens, output_dir=tmp_path / "u")
    assert "ratio_missed" not in json.loads((tmp_path / "u" / "layershare.json").read_text())


def test_a_result_that_misses_its_ratio_is_not_saved(tokens, tmp_path, monkeypatch):
    """The plan is on target, the measured result is not (a model that stores fewer values than
    planned, simulated: a sparse V keeps its planned pattern, so FiPS itself no longer undershoots):
    refused before anything is saved."""
    import dataclasses

    import layershare.api as api
    from layershare.compression.targets import RatioMissError

    measure = api.measure
    monkeypatch.setattr(api, "measure", lambda *a, **k: dataclasses.replace(
        measure(*a, **k), stored_values=measure(*a, **k).stored_values // 2))
    with pytest.raises(RatioMissError, match=r"the compressed model has \d+\.\d+% .* target of 20\.00%"):
        layershare.compress(make_model("llama"), small_recipe(ratio=0.2), data=tokens, output_dir=tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_too_little_free_space_is_refused_before_work(tokens, tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    from layershare.checkpoint.outputs import OutputSpaceError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(OutputSpaceError, match=r"needs about \d+ MiB and .* has 1 MiB free"):
        layershare.compress(make_model("llama"), small_recipe(), data=None, output_dir=tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_sigterm_mid_run_exits_130_and_leaves_nothing(model_dir, tmp_path):
    """The real CLI in its own process, terminated while it tunes: exit 130, one line, no output,
    no lock or partial folder left."""
    import subprocess
    import sys
    import time

    (tmp_path / "calib.txt").write_text("It is a truth universally acknowledged. " * 400)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "layershare", "compress", str(model_dir), "--calib", str(tmp_path / "calib.txt"),
           "--output", str(out), "--nsamples", "4", "--seqlen", "32", "--steps", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / ".out.lock").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # into the tuning steps
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "tiny-llama"]
