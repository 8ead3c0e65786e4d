import json

import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.checkpoint.outputs import OutputExistsError
from layershare.checkpoint.verify import CheckpointError
from layershare.modules.shared_basis import SharedBasisLinear, unpack_all


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_save_load_gives_identical_logits_and_generates(arch, tokens, input_ids, tmp_path):
    model = make_model(arch)
    layershare.compress(model, small_recipe(ratio=0.2, steps=5, lr=1e-3), data=tokens, output_dir=tmp_path / "c")
    with torch.no_grad():
        before = model(input_ids).logits
    loaded = layershare.load(tmp_path / "c", runtime="compact")
    assert any(isinstance(m, SharedBasisLinear) and m.packed for m in loaded.modules())
    with torch.no_grad():
        after = loaded(input_ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    out = loaded.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    n_layers = sum(isinstance(m, SharedBasisLinear) for m in loaded.modules())
    assert unpack_all(loaded) == n_layers  # dense V (for fast evaluation) computes the same function
    assert not any(isinstance(m, SharedBasisLinear) and m.packed for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, before, atol=1e-5, rtol=1e-5)


def test_loaded_model_holds_only_compressed_tensors(tokens, tmp_path):
    model = make_model("llama")
    res = layershare.compress(model, small_recipe(ratio=0.3), data=tokens, output_dir=tmp_path / "c")
    loaded = layershare.load(tmp_path / "c", runtime="compact")
    stored = sum(p.numel() for p in loaded.parameters()) + sum(
        m.nnz() for m in loaded.modules() if isinstance(m, SharedBasisLinear))
    assert stored == res.sizes.stored_values


def test_existing_output_dir_is_refused_before_work(tokens, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    model = make_model("llama")
    with pytest.raises(OutputExistsError, match="overwrite"):
        layershare.compress(model, small_recipe(), data=tokens, output_dir=tmp_path / "c")
    assert not any(isinstance(m, SharedBasisLinear) for m in model.modules())  # nothing was done
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"
    layershare.compress(model, small_recipe(), data=tokens, output_dir=tmp_path / "c", overwrite=True)
    assert not (tmp_path / "c" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no leftovers beside it


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_device_is_refused_before_work(tokens, tmp_path):
    from layershare.config import RecipeError

    model = make_model("llama")
    with pytest.raises(RecipeError, match="no such CUDA device"):
        layershare.compress(model, small_recipe(device="cuda"), data=tokens, output_dir=tmp_path / "c")
    assert not any(isinstance(m, SharedBasisLinear) for m in model.modules())
    assert not (tmp_path / "c").exists()


def test_interrupted_save_leaves_no_output_dir(tokens, tmp_path, monkeypatch):
    import layershare.checkpoint.save as io

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        layershare.compress(make_model("llama"), small_recipe(), data=tokens, output_dir=tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_foreign_and_truncated_checkpoints_are_refused(tokens, tmp_path):
    dense = make_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not a layershare checkpoint"):
        layershare.load(tmp_path / "dense", runtime="compact")
    with pytest.raises(CheckpointError, match="not a directory"):
        layershare.load(tmp_path / "missing", runtime="compact")

    layershare.compress(make_model("llama"), small_recipe(), data=tokens, output_dir=tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        layershare.load(tmp_path / "c", runtime="compact")
    # same size but garbage: the safetensors reader's error is reported as a checkpoint error
    weights.write_bytes(b"\0" * len(data))
    with pytest.raises(CheckpointError):
        layershare.load(tmp_path / "c", runtime="compact")


def test_config_entry_describes_layout(tokens, tmp_path):
    layershare.compress(make_model("gpt2"), small_recipe(group_size=2), data=tokens, output_dir=tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    entry = cfg["layershare"]
    assert len(entry["bases"]) == 2 and len(entry["layers"]) == 8
    assert {v["role"] for v in entry["layers"].values()} == {"in", "out"}
