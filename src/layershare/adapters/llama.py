"""Gated MLPs (gate/up/down): Llama, Mistral, Qwen2/3, Gemma, Gemma-2, Gemma-3.

Gemma-2/3 wrap the MLP in pre/post feed-forward norms. The post norm rescales every token's
MLP output to unit RMS before the residual add, so the reconstruction target there is the
normed output (`mlp_post`): matching the raw output would weight tokens by the size of their
MLP output, which the norm then removes.
"""
from .base import IN, OUT, Adapter

GATED = Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"),
    blocks_paths=("model.layers", "model.language_model.layers", "language_model.model.layers"),
    mlp="mlp",
    linears={"mlp.gate_proj": IN, "mlp.up_proj": IN, "mlp.down_proj": OUT},
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp_post="post_feedforward_layernorm",
)
