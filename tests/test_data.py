import math

import pytest
import torch
from conftest import SAMPLE_TEXT, make_model, small_recipe

import layershare
from layershare.data.text import DataError, calibration_batches, read_text, tokenize
from layershare.evaluate.perplexity import perplexity


def test_too_little_calibration_text_says_needed_and_available(tokens):
    model = make_model("llama")
    with pytest.raises(DataError, match=r"need 8,192 tokens, but it has 4,096"):
        layershare.compress(model, small_recipe(nsamples=32, seqlen=256), data=tokens)


def test_calibration_windows_are_distinct_and_seeded():
    ids = torch.arange(1000)
    a = calibration_batches(ids, nsamples=8, seqlen=100, batch_size=3, seed=0)
    b = calibration_batches(ids, nsamples=8, seqlen=100, batch_size=3, seed=0)
    assert [x.shape[0] for x in a] == [3, 3, 2]
    starts = torch.cat(a)[:, 0]
    assert len(set(starts.tolist())) == 8 and all(s % 100 == 0 for s in starts.tolist())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second")
    assert read_text(tmp_path / "a.txt") == "first"
    assert read_text(tmp_path) == "first\n\nsecond"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_text(tmp_path / "ds") == "one\n\ntwo"
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.txt files"):
        read_text(tmp_path / "empty")


def test_perplexity_covers_the_whole_text(tokenizer):
    model = make_model("llama", vocab=300)
    ids = tokenize(tokenizer, SAMPLE_TEXT * 6)
    seqlen = 64
    p = perplexity(model, ids, seqlen=seqlen)
    n = ids.numel() // seqlen
    assert p.windows == n and n > 2
    assert p.dropped == ids.numel() - n * seqlen
    # reference: every window scored independently, NLL averaged over all predicted tokens
    nll = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen:(i + 1) * seqlen][None]
            nll.append(model(w, labels=w).loss.item())
    assert p.ppl == pytest.approx(math.exp(sum(nll) / n), rel=1e-5)
    assert f"{n} non-overlapping windows x {seqlen} tokens" in p.protocol
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, ids[:10], seqlen=seqlen)
