import json

import pytest
import torch

from layershare.cli import main

from conftest import SAMPLE_TEXT


@pytest.fixture
def texts(tmp_path):
    calib, held = tmp_path / "calib.txt", tmp_path / "held.txt"
    calib.write_text(SAMPLE_TEXT * 20)
    held.write_text(SAMPLE_TEXT[::-1] * 8)
    return calib, held


def test_compress_info_eval(model_dir, texts, tmp_path, capsys):
    calib, held = texts
    out = tmp_path / "out"
    rc = main(["compress", str(model_dir), "--calib", str(calib), "--output", str(out), "--ratio", "0.2",
               "--nsamples", "4", "--seqlen", "64", "--steps", "5", "--eval-text", str(held),
               "--eval-seqlen", "64"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fewer" in text and "smaller" in text and "non-overlapping windows x 64 tokens" in text
    meta = json.loads((out / "layershare.json").read_text())
    assert meta["sizes"]["ratio"] == pytest.approx(0.2, abs=0.01)
    assert meta["eval"]["ppl"] > 1
    assert main(["info", str(out)]) == 0
    assert "compressed with fips" in capsys.readouterr().out
    assert main(["eval", str(out), "--text", str(held), "--seqlen", "64"]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity ")[1].split()[0])
    assert ppl == pytest.approx(meta["eval"]["ppl"], rel=1e-3)


@pytest.mark.parametrize("args,message", [
    (["--ratio", "0.9"], "feasible range"),
    (["--nsamples", "500"], "too short"),
    (["--method", "nope"], "unknown method"),
    (["--ratio", "1.5"], "ratio must be in"),
    (["--device", "gpu"], "device must be"),
    pytest.param(["--device", "cuda"], "no such CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_input_is_a_clear_error(model_dir, texts, tmp_path, capsys, args, message):
    calib, _ = texts
    rc = main(["compress", str(model_dir), "--calib", str(calib), "--output", str(tmp_path / "o"),
               "--seqlen", "64", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_refused_before_loading(texts, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    rc = main(["compress", "no-such-model", "--calib", str(texts[0]), "--output", str(tmp_path / "o")])
    assert rc == 2 and "exists" in capsys.readouterr().err


def test_load_error_for_a_foreign_directory(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 2
    assert "not a layershare checkpoint" in capsys.readouterr().err


def test_cli_fips_plus_masa_on_attention(model_dir, texts, tmp_path, capsys):
    calib, _ = texts
    out = tmp_path / "out"
    rc = main(["compress", str(model_dir), "--calib", str(calib), "--output", str(out), "--ratio", "0.1",
               "--nsamples", "4", "--seqlen", "64", "--steps", "2", "--attention-method", "masa",
               "--attention-ratio", "0.5"])
    assert rc == 0
    meta = json.loads((out / "layershare.json").read_text())
    assert meta["attention"]["method"] == "masa" and meta["sizes"]["ratio"] > 0.1 + 0.05
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "attention: masa" in capsys.readouterr().out


def test_cli_init_objective_and_prune_score_reach_the_recipe(model_dir, texts, tmp_path):
    calib, _ = texts
    out = tmp_path / "out"
    rc = main(["compress", str(model_dir), "--calib", str(calib), "--output", str(out), "--ratio", "0.1",
               "--nsamples", "4", "--seqlen", "64", "--steps", "0", "--init", "whitened", "--objective", "mlp",
               "--prune-score", "magnitude"])
    assert rc == 0
    recipe = json.loads((out / "layershare.json").read_text())["recipe"]
    assert recipe["init"] == "whitened" and recipe["objective"] == "mlp"
    assert recipe["prune_score"] == "magnitude"
