"""Tiny models built from configs (no downloads) and calibration tokens for them."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

VOCAB = 128


def _configs(VOCAB: int = VOCAB) -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4,
                                                         n_positions=256, n_inner=160)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=160,
                                                      num_hidden_layers=4, num_attention_heads=4,
                                                      word_embed_proj_dim=64, max_position_embeddings=256)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64,
                                                                   intermediate_size=160, num_hidden_layers=4,
                                                                   num_attention_heads=4,
                                                                   max_position_embeddings=256)),
    }


ARCHS = list(_configs())


def make_model(arch: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    model = _configs(vocab)[arch]()
    # random init leaves some norms/biases at trivial values; perturb so every path matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def tokens():
    """Calibration tokens: a repetitive random stream, enough for 16 windows of 32."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (4096,), generator=g)


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24), generator=g)


def small_recipe(**kw):
    from layershare import Recipe

    base = dict(nsamples=8, seqlen=32, steps=0, batch_tokens=128)
    base.update(kw)
    return Recipe(**base)


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
