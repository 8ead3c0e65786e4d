"""GPT-2: Conv1D c_fc (d -> 4d) and c_proj (4d -> d); Conv1D stores weights as (in, out)."""
from layershare.adapters.base import IN, OUT, Adapter

GPT2 = Adapter(
    name="gpt2",
    model_types=("gpt2",),
    blocks_paths=("transformer.h", "h"),
    mlp="mlp",
    linears={"mlp.c_fc": IN, "mlp.c_proj": OUT},
    attention=("attn.c_attn", "attn.c_proj"),  # c_attn: Q, K and V fused
)
