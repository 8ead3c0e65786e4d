"""Gated MLPs (gate/up/down): Llama, Mistral, Qwen2/3, Gemma, Gemma-2, Gemma-3.

Gemma-2/3 wrap the MLP in pre/post feed-forward norms, outside `mlp`. The "mlp" objective
matches the raw MLP output as for Llama; "residual" matches it after the post norm
(`mlp_post`, what reaches the residual stream; see objectives.py).
"""
from layershare.adapters.base import IN, OUT, Adapter

GATED = Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"),
    blocks_paths=("model.layers", "model.language_model.layers", "language_model.model.layers"),
    mlp="mlp",
    linears={"mlp.gate_proj": IN, "mlp.up_proj": IN, "mlp.down_proj": OUT},
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp_post="post_feedforward_layernorm",
)
