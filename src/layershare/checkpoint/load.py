"""`layershare.load`: a compressed directory as a model ready to run.

The lean path: this module imports the checkpoint reader, the run-time forms and transformers'
integration, nothing of the compressor (no methods, drivers or pipeline); a test checks the
modules a load imports."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from layershare.checkpoint.read import load_compressed


def load(path: str | Path, device: str = "cpu", model: nn.Module | None = None, runtime: str = "auto",
         verify: bool = True, dtype: torch.dtype | str | None = "auto") -> nn.Module:
    """A compressed model saved by `compress(..., output_dir=...)`, ready to run. `model`: an
    uncompressed skeleton of the same architecture, for a model that cannot be rebuilt from the
    directory (transformers and timm ViTs are). `runtime`: the run-time form: "auto" (the
    default: sparse V through the native kernel when it is built, quantized linears packed for the
    int4 kernel on the CPU), "sparse", "compact" (what is stored, V rebuilt per forward: slow),
    "factored", "csr" or "merged" (runtime/forms.py; docs/runtime.md). `dtype`: the floating-point type of the loaded tensors
    ("auto", the default: the storage dtype it was saved at; None: each tensor as stored). The
    directory is verified first (checkpoint/verify.py: schema, shapes, recorded hashes of the
    weights and config.json; `verify=False` skips the hashes); a failed check raises
    `layershare.checkpoint.verify.CheckpointError`."""
    out = load_compressed(path, device=device, dtype=dtype, model=model, runtime=runtime, verify=verify)
    import transformers

    if isinstance(out, transformers.PreTrainedModel):  # save_pretrained then writes the compressed tensors
        from layershare.checkpoint.hf_quantizer import attach

        attach(out, out.config.layershare, runtime, getattr(out, "layershare_meta", None))
    return out
