import json

import pytest
import torch
from conftest import SAMPLE_TEXT

from layershare.cli import main


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
    assert f"{meta['sizes']['ratio']:.2%} fewer" in text  # the printed ratio is the measured one
    # the recorded perplexities are those of the reloaded directory and of the dense model
    import layershare

    tok = layershare.load_preprocessing(out)
    ppl_reloaded = layershare.evaluate_perplexity(layershare.load(out), tok, str(held), seqlen=64).ppl
    assert meta["eval"]["ppl"] == pytest.approx(ppl_reloaded, rel=1e-6)
    dense_model, _ = layershare.load_model(str(model_dir))
    assert meta["eval"]["dense_ppl"] == pytest.approx(
        layershare.evaluate_perplexity(dense_model, tok, str(held), seqlen=64).ppl, rel=1e-6)
    assert meta["eval"]["ppl"] != pytest.approx(meta["eval"]["dense_ppl"], rel=1e-6)  # it was compressed
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "compressed with fips" in info
    for g in meta["stages"][0]["groups"]:  # each group's tuning steps, as recorded (at most --steps)
        assert 1 <= g["steps"] <= 5 and f"{g['rel_err_after']:.4f}, {g['steps']} steps (" in info
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
    (tmp_path / "o" / "keep.txt").write_text("mine")
    rc = main(["compress", "no-such-model", "--calib", str(texts[0]), "--output", str(tmp_path / "o")])
    assert rc == 2 and "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_output_parents_are_created_and_the_reloaded_model_generates(model_dir, texts, tmp_path, capsys):
    """--output under folders that do not exist yet (a fresh clone has no out/): created; the saved
    directory is reloaded, evaluated on the first windows only (printed) and continues a prompt."""
    calib, held = texts
    out = tmp_path / "a" / "b" / "out"
    rc = main(["compress", str(model_dir), "--calib", str(calib), "--output", str(out), "--preset", "quick",
               "--nsamples", "4", "--seqlen", "64", "--steps", "2", "--eval-text", str(held), "--eval-seqlen", "64",
               "--eval-windows", "2", "--prompt", "It is a truth", "--max-new-tokens", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert (out / "model.safetensors").exists() and (out / "recipe.yaml").exists()
    assert "first 2 of" in text  # the slice is printed with the number
    assert "continues 'It is a truth'" in text
    assert "The full recipe and the whole-text evaluation" in text
    full = text.split("whole-text evaluation:\n  ")[1].splitlines()[0]
    assert "--preset" not in full and "--eval-windows" not in full and "--steps" not in full
    import layershare

    recipe = layershare.Recipe.from_yaml(out / "recipe.yaml")
    assert (recipe.nsamples, recipe.seqlen, recipe.main.steps) == (4, 64, 2)


def test_flags_and_set_reach_the_stage_and_foreign_flags_are_refused(model_dir, texts, tmp_path, capsys):
    from layershare.cli import build_parser, build_recipe

    parse = build_parser().parse_args
    base = ["compress", "m", "--calib", "c", "--output", "o"]
    r = build_recipe(parse(base + ["--method", "svd-llm", "--ratio", "0.3", "--set", "update=true",
                                   "--group-size", "1", "--nsamples", "7"]))
    assert r.to_dict()["stages"] == [{"method": "svd-llm", "ratio": 0.3, "ratio_of": "model", "group_size": 1,
                                      "groups": None, "propagate": "dense", "update": True, "rank": None}]
    assert r.nsamples == 7
    r = build_recipe(parse(base + ["--preset", "quick", "--steps", "3"]))
    assert (r.main.method, r.main.steps, r.nsamples) == ("fips", 3, 16)
    r = build_recipe(parse(base + ["--method", "masa", "--group-size", "3"]))  # masa's own group size now
    assert r.main.group_size == 3
    rc = main(base[:1] + [str(model_dir), "--calib", str(texts[0]), "--output", str(tmp_path / "o"),
                          "--method", "svd", "--sparsity", "0.3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--sparsity: not an option of method 'svd'" in err and "update" in err
    rc = main(base[:1] + [str(model_dir), "--calib", str(texts[0]), "--output", str(tmp_path / "o"),
                          "--set", "updaet=true"])
    assert rc == 2 and "--set updaet: not an option of method 'fips'" in capsys.readouterr().err
    rc = main(base[:1] + [str(model_dir), "--calib", str(texts[0]), "--output", str(tmp_path / "o"),
                          "--method", "fips", "--attention-method", "svd"])
    assert rc == 2 and "stage 2 (fips) compresses the MLPs, which stage 1 (svd) already" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


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
    assert [s["method"] for s in meta["stages"]] == ["masa", "fips"]
    assert meta["sizes"]["ratio"] == pytest.approx(sum(s["ratio"] for s in meta["stages"]), abs=1e-6)
    assert meta["stages"][1]["ratio"] == pytest.approx(0.1, abs=0.005)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"stage 1: masa, {meta['stages'][0]['ratio']:.2%}" in info and "stage 2: fips" in info


def test_cli_init_objective_and_prune_score_reach_the_recipe(model_dir, texts, tmp_path):
    calib, _ = texts
    out = tmp_path / "out"
    rc = main(["compress", str(model_dir), "--calib", str(calib), "--output", str(out), "--ratio", "0.1",
               "--nsamples", "4", "--seqlen", "64", "--steps", "0", "--init", "whitened", "--objective", "mlp",
               "--prune-score", "magnitude"])
    assert rc == 0
    stage = json.loads((out / "layershare.json").read_text())["recipe"]["stages"][-1]
    assert stage["init"] == "whitened" and stage["objective"] == "mlp"
    assert stage["prune_score"] == "magnitude"
