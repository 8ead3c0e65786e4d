"""Inputs checked where they enter, output directories safe against concurrent and interrupted runs,
one clean error line per expected failure (issue 16; checkpoints: test_checkpoint.py)."""
import os
import signal

import pytest
import torch

import layershare
from layershare.cli import main
from layershare.data import DataError, read_text
from layershare.io import OutputExistsError, output_lock, signals_deferred

from conftest import make_model, small_recipe


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
