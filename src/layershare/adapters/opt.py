"""OPT: fc1/fc2 live directly in the decoder layer, with `activation_fn` between them."""
from layershare.adapters.base import IN, OUT, Adapter

OPT = Adapter(
    name="opt",
    model_types=("opt",),
    blocks_paths=("model.decoder.layers", "decoder.layers"),
    mlp=None,
    act="activation_fn",
    linears={"fc1": IN, "fc2": OUT},
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
)
