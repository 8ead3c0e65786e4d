"""GPT-NeoX / Pythia: mlp.dense_h_to_4h and mlp.dense_4h_to_h."""
from layershare.adapters.base import IN, OUT, Adapter

GPT_NEOX = Adapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    blocks_paths=("gpt_neox.layers", "layers"),
    mlp="mlp",
    linears={"mlp.dense_h_to_4h": IN, "mlp.dense_4h_to_h": OUT},
    attention=("attention.query_key_value", "attention.dense"),
)
