"""Tiny models built from configs (no download): for the tests, the benchmarks' device check
and anyone who wants to try a recipe in seconds. Every architecture family layershare
supports for causal LMs, 4 blocks of width 64."""
from __future__ import annotations

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
