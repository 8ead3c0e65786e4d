"""transformers' from_pretrained on layershare directories (hf_quantizer.py): the same model as
layershare.load, save_pretrained round trips, a refusal without layershare, sharded weights and
the model card (issue 17)."""
import json

import pytest
import torch
from conftest import VOCAB, make_model, small_recipe
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

import layershare
from layershare.checkpoint.hf_quantizer import LayershareConfig, register, unregister
from layershare.checkpoint.verify import CheckpointError

PEERS = {"fips": 0.2, "svd": 0.2, "svd-llm": 0.2, "basis-sharing": 0.2, "basis-sharing-attention": 0.2,
         "ffn-merge": 0.16, "masa": 0.2}
CASES = [("llama", m) for m in PEERS] + [("gemma3", "fips"), ("gpt2", "fips"), ("vit", "fips"), ("vit", "svd-llm")]


_DONE: dict = {}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(arch, method) -> (directory, an input): each compressed once for the module."""
    def get(arch, method):
        if (arch, method) not in _DONE:
            tokens = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
            out = tmp_path_factory.mktemp("hf") / f"{arch}-{method}"
            _DONE[arch, method] = out, _compress(arch, method, out, tokens)
        return _DONE[arch, method]
    return get


def _compress(arch, method, out, tokens, **save):
    if arch == "vit":
        from test_vit import make_vit, vit_recipe

        pixels = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        layershare.compress(make_vit("vit"), vit_recipe(method, ratio=0.2), data=pixels, output_dir=out, **save)
        return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    layershare.compress(make_model(arch), small_recipe(method, ratio=PEERS[method]), data=tokens, output_dir=out,
                        **save)
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _auto(arch):
    return AutoModelForImageClassification if arch == "vit" else AutoModelForCausalLM


@pytest.mark.parametrize("arch,method", CASES)
def test_from_pretrained_is_the_compressed_model(arch, method, compressed):
    d, x = compressed(arch, method)
    mine = layershare.load(d)
    theirs = _auto(arch).from_pretrained(d)
    assert torch.equal(_logits(mine, x), _logits(theirs, x))
    assert theirs.config.quantization_config.quant_method == "layershare"


@pytest.mark.parametrize("arch,method", [("llama", "fips"), ("llama", "ffn-merge"), ("vit", "fips")])
def test_save_pretrained_round_trip_is_as_small(arch, method, compressed, tmp_path):
    d, x = compressed(arch, method)
    model = _auto(arch).from_pretrained(d, quantization_config=LayershareConfig(runtime="compact"))
    model.save_pretrained(tmp_path / "again")
    back = _auto(arch).from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(back, x), _logits(layershare.load(d), x))
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert abs(size(tmp_path / "again") - size(d)) <= 0.01 * size(d)
    # the default run-time form merges layers for speed: it cannot write the factors back
    mine = layershare.load(d, runtime="factored")  # layershare.load's model saves the same way
    mine.save_pretrained(tmp_path / "mine")
    assert torch.equal(_logits(_auto(arch).from_pretrained(tmp_path / "mine"), x), _logits(back, x))
    merged = _auto(arch).from_pretrained(d)
    if getattr(merged, "layershare_merged", 0):
        with pytest.raises(CheckpointError, match="runtime='compact'"):
            merged.save_pretrained(tmp_path / "no")


def test_without_layershare_transformers_refuses(compressed):
    dirs = [compressed("llama", "fips")[0], compressed("llama", "ffn-merge")[0]]  # ffn-merge: guard on a tied MLP
    unregister()
    try:
        for d in dirs:
            with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
                AutoModelForCausalLM.from_pretrained(d)
    finally:
        register()
    assert AutoModelForCausalLM.from_pretrained(dirs[0]) is not None


def test_sharded_output_loads_both_ways(tokens, compressed, tmp_path):
    from layershare.checkpoint.verify import INDEX

    x = _compress("llama", "fips", tmp_path / "s", tokens, max_shard_size=60_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "s" / "model.safetensors").exists()
    index = json.loads((tmp_path / "s" / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    one = _logits(layershare.load(compressed("llama", "fips")[0]), x)
    assert torch.equal(_logits(layershare.load(tmp_path / "s"), x), one)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "s"), x), one)
    data = bytearray((tmp_path / "s" / shards[1]).read_bytes())  # a flipped byte in one shard
    data[-3] ^= 0xFF
    (tmp_path / "s" / shards[1]).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shards[1]} does not match the SHA-256"):
        layershare.load(tmp_path / "s")
    (tmp_path / "s" / shards[0]).unlink()
    with pytest.raises(CheckpointError, match=f"weights file {shards[0]} is missing"):
        layershare.load(tmp_path / "s")


def test_the_model_card_says_what_is_stored_and_how_to_load_it(compressed):
    d = compressed("llama", "fips")[0]
    card = (d / "README.md").read_text()
    meta = json.loads((d / "layershare.json").read_text())
    bits = meta["weights_bytes"] * 8 / meta["sizes"]["dense_params"]
    assert card.startswith("---\n") and "layershare" in card.split("---")[1]
    assert f"{bits:.2f} bits per parameter" in card and "`fips`: ratio=0.2" in card
    assert "AutoModelForCausalLM.from_pretrained(" in card and "Not measured" in card
