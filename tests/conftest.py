"""Tiny models built from configs (no downloads) and calibration tokens for them."""
from __future__ import annotations

import os

# Triton's kernels (runtime/kernels/triton_bitmask.py) run on the CPU under its interpreter; it must
# be chosen before anything imports triton (transformers may), so here, before the imports below.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from layershare.testing import ARCHS, VOCAB, make_model  # noqa: F401,E402 (the tests import them from here)


@pytest.fixture
def tokens():
    """Calibration tokens: a repetitive random stream, enough for 16 windows of 32."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (4096,), generator=g)


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24), generator=g)


def small_recipe(method: str = "fips", **kw):
    """A one-stage recipe on few short calibration windows; steps=0 and batch_tokens=128 where
    the method has them (FiPS)."""
    from layershare import Recipe
    from layershare.methods import config_class

    options = config_class(method).field_names()
    base = dict(nsamples=8, seqlen=32, **{k: v for k, v in dict(steps=0, batch_tokens=128).items() if k in options})
    base.update(kw)
    return Recipe.of(method, **base)


SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered as the rightful property of some one or other "
    "of their daughters. "
)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained here (no download), vocabulary < 300."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([SAMPLE_TEXT] * 4, vocab_size=290, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>", bos_token="<s>")
    tok.add_special_tokens({"eos_token": "</s>", "bos_token": "<s>"})
    assert len(tok) <= 300
    return tok


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny Llama saved as a local Hugging Face directory, with the tokenizer."""
    model = make_model("llama", vocab=300)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pytest_configure(config):
    """Under pytest-xdist (`-n`), one torch thread per worker: the workers share the cores."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
