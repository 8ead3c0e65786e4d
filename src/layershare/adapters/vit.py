"""Vision Transformers: Hugging Face ViT/DeiT and timm's VisionTransformer.

Hugging Face ViT and DeiT changed layout in transformers 5: blocks at `vit.layers` with an
`mlp` module (fc1 -> GELU -> fc2) and q/k/v/o projections; before, blocks at
`vit.encoder.layer` with `intermediate.dense` and `output.dense`, the residual added inside
`output`. One adapter per layout; `matches` picks the one whose linears exist.

timm's VisionTransformer (and the distilled DeiT) keep `blocks[i].mlp.fc1/fc2` and a fused
`attn.qkv`; the model is called positionally and has no transformers config, so it is
recognised by its class.

The default objective is the FiPS code's ViT objective: every compressed block is fed the
dense previous block's output and trained to match the dense block's output.
"""
from torch import nn

from layershare.adapters.base import IN, OUT, Adapter

_VISION = dict(task="image-classification", input_name="pixel_values", objective="block")

VIT = Adapter(
    name="vit",
    model_types=("vit", "deit"),
    blocks_paths=("vit.layers", "deit.layers", "layers"),
    mlp="mlp",
    linears={"mlp.fc1": IN, "mlp.fc2": OUT},
    attention=("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
    **_VISION,
)

VIT_LEGACY = Adapter(
    name="vit (transformers 4 layout)",
    model_types=("vit", "deit"),
    blocks_paths=("vit.encoder.layer", "deit.encoder.layer", "encoder.layer"),
    mlp=None,
    linears={"intermediate.dense": IN, "output.dense": OUT},
    act="intermediate.intermediate_act_fn",
    attention=("attention.attention.query", "attention.attention.key", "attention.attention.value",
               "attention.output.dense"),
    **_VISION,
)


class _TimmAdapter(Adapter):
    def matches(self, model: nn.Module, strict: bool = True) -> bool:
        cls = type(model)
        return (cls.__module__.startswith("timm.") and cls.__name__ in self.model_types
                and (not strict or self.has_layout(model)))


TIMM_VIT = _TimmAdapter(
    name="timm-vit",
    model_types=("VisionTransformer", "VisionTransformerDistilled"),
    blocks_paths=("blocks",),
    mlp="mlp",
    linears={"mlp.fc1": IN, "mlp.fc2": OUT},
    attention=("attn.qkv", "attn.proj"),
    task="image-classification",
    input_name=None,
    objective="block",
)
