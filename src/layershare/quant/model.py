"""Quantization applied to a model's tensors, and its storage in a compressed directory.

Which tensors (`targets`): every weight the model then holds that multiplies an input: plain
linears (nn.Linear, GPT-2's Conv1D), FiPS's and the peers' shared bases U, each compressed
layer's V (its nonzero values when sparse; the bitmask is kept as it is), MASA's atoms; the
input embeddings and the LM head only with `embeddings=True`. Groups run along each weight's
input axis (for a weight stored input-first, such as Conv1D's and, in layers of role "in", U and
V, along the first axis; for a sparse V's values, along the values in their stored order).

In memory, a quantized tensor keeps its float form (exactly the dequantized values: the model
runs and tunes as before) and, beside it on the module that owns it, its packed codes, scales
and zero points as buffers `{name}_qcodes`, `{name}_qscales`, `{name}_qzeros` (grid.to_tensors).
The saved weights hold only the buffers; `quant_entry` records the spec and every quantized
tensor's shape in config.json's layershare entry; loading rebuilds the float tensors from the
buffers (`dequantize_model`), so every run-time form runs as for an unquantized model (no
low-bit kernel: resident memory is the float model's plus the packed buffers).
"""
from __future__ import annotations

import torch
from torch import nn

from layershare.modules.atoms import MatrixAtoms
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.quant.grid import (
    QTensor,
    QuantSpec,
    dequantize,
    from_tensors,
    quantize,
    to_tensors,
)

SUFFIXES = ("codes", "scales", "zeros")


def _conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's linear, weight stored (in, out)


def targets(model: nn.Module, embeddings: bool = False) -> dict[str, tuple[nn.Module, str, bool]]:
    """name -> (owner module, attribute, input-first): every tensor the quantization stage
    quantizes (see the module docstring)."""
    skip = set()
    if not embeddings:
        for get in ("get_input_embeddings", "get_output_embeddings"):
            m = getattr(model, get, lambda: None)()
            if m is not None:
                skip.add(id(m))
    from layershare.adapters.base import IN

    users = [m for m in model.modules() if isinstance(m, SharedBasisLinear)]
    has_in = {id(m.basis) for m in users if m.role == IN} | {id(m) for m in model.modules()
                                                            if isinstance(m, SharedBasis) and not any(
                                                                u.basis is m for u in users)}
    out = {}
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(m, SharedBasis):  # x @ U in layers of role "in", z @ U.t() in "out": one grid, along d
            out[prefix + "U"] = (m, "U", id(m) in has_in)  # when any layer of role "in" shares it
        elif isinstance(m, MatrixAtoms):
            out[prefix + "atoms"] = (m, "atoms", False)
        elif isinstance(m, SharedBasisLinear):
            attr = "V_values" if m.sparse and m.form == "compact" else "V"
            out[prefix + attr] = (m, attr, attr == "V" and m.role == IN)  # z @ V for "in", x @ V.t() for "out"
        elif isinstance(m, nn.Linear) or _conv1d(m):
            out[prefix + "weight"] = (m, "weight", _conv1d(m))
        elif embeddings and isinstance(m, nn.Embedding):
            out[prefix + "weight"] = (m, "weight", False)
    return out


def _oriented(t: torch.Tensor, input_first: bool) -> torch.Tensor:
    """The tensor with its input axis last (where the groups run)."""
    return t.t() if input_first else t


def set_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
    else:
        owner._buffers[attr] = value


def store(owner: nn.Module, attr: str, q: QTensor) -> None:
    """Keep `q` packed beside the float tensor: buffers {attr}_qcodes/_qscales/_qzeros."""
    for k, v in to_tensors(q, "q").items():
        owner.register_buffer(f"{attr}_q{k.split('.')[-1]}", v)


def quantize_tensor(owner: nn.Module, attr: str, input_first: bool, spec: QuantSpec,
                    q: QTensor | None = None) -> QTensor:
    """Quantize owner.attr in place (RTN, or the given codes, e.g. GPTQ's): the float tensor
    becomes its dequantized values, the packed form is stored beside it."""
    t = getattr(owner, attr)
    if q is None:
        q = quantize(_oriented(t.detach().float(), input_first), spec)
    w = _oriented(dequantize(q), input_first).to(t.dtype).contiguous()
    set_tensor(owner, attr, w)
    store(owner, attr, q)
    return q


def packed_buffers(owner: nn.Module, attr: str) -> dict[str, torch.Tensor]:
    """owner.attr's packed buffers under grid.from_tensors' names (prefix "q")."""
    return {f"q.{s}": owner._buffers[f"{attr}_q{s}"] for s in SUFFIXES if f"{attr}_q{s}" in owner._buffers}


def _stored(owner: nn.Module, attr: str, t: dict, spec: QuantSpec) -> torch.Tensor:
    """The tensor owner.attr as its packed buffers hold it (float32, in its own orientation)."""
    shape = tuple(t["shape"])
    oriented = shape[::-1] if t["input_first"] else shape
    bufs = packed_buffers(owner, attr)
    return _oriented(dequantize(from_tensors(bufs, "q", spec, oriented)), t["input_first"])


def check_current(model: nn.Module, qentry: dict) -> None:
    """Refuse to save codes that no longer match their float tensors (changed after quantizing)."""
    for name, t in qentry["tensors"].items():
        owner, attr = _owner(model, name)
        current = getattr(owner, attr).detach()
        if not torch.equal(_stored(owner, attr, t, spec_of(qentry, name)).to(current.dtype), current):
            raise ValueError(f"{name} changed after it was quantized: its stored codes no longer match; "
                             "quantize again (the quantization stage must be the last)")


def quant_entry(spec: QuantSpec, tensors: dict[str, tuple[int, ...]], input_first: dict[str, bool],
                bits: dict[str, int] | None = None) -> dict:
    """What config.json's layershare entry records of the quantization; `bits`: the tensors
    stored at other bits than the stage's (e.g. the shared bases), recorded per tensor."""
    bits = {n: b for n, b in (bits or {}).items() if b != spec.bits}
    return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
            "tensors": {n: {"shape": list(s), "input_first": input_first[n], **({"bits": bits[n]} if n in bits else {})}
                        for n, s in sorted(tensors.items())}}


def spec_of(entry: dict, name: str | None = None) -> QuantSpec:
    """The grid of the quantization entry, or of its tensor `name` (its own bits if it has them)."""
    bits = entry["tensors"][name].get("bits", entry["bits"]) if name is not None else entry["bits"]
    return QuantSpec(bits, entry["group_size"], entry["symmetric"])


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def packed_shapes(qentry: dict) -> dict[str, tuple[int, ...]]:
    """The packed buffers' names and shapes, as the saved weights must hold them (arithmetic
    only: nothing of the declared size is allocated)."""
    import math

    out = {}
    for name, t in qentry["tensors"].items():
        spec = spec_of(qentry, name)
        shape = tuple(t["shape"])
        oriented = shape[::-1] if t["input_first"] else shape
        groups = oriented[:-1] + (spec.groups(oriented[-1]),)
        out[f"{name}_qcodes"] = ((spec.bits * math.prod(oriented) + 7) // 8,)
        out[f"{name}_qscales"] = groups
        if not spec.symmetric:
            out[f"{name}_qzeros"] = ((spec.bits * math.prod(groups) + 7) // 8,)
    return out


def prepare_skeleton(model: nn.Module, qentry: dict) -> None:
    """Before the weights are assigned: each quantized tensor's float slot is removed from its
    owner (the file does not hold it) and its packed buffers are registered on the meta device."""
    for name, shape in packed_shapes(qentry).items():
        base, _, suffix = name.rpartition("_q")
        owner, attr = _owner(model, base)
        if attr in owner._parameters:
            owner._parameters.pop(attr)
            owner._layershare_quant_params = getattr(owner, "_layershare_quant_params", set()) | {attr}
        else:
            owner._buffers.pop(attr, None)
        dtype = torch.float16 if suffix == "scales" else torch.uint8
        owner.register_buffer(f"{attr}_q{suffix}", torch.empty(shape, device="meta", dtype=dtype))


def dequantize_model(model: nn.Module, qentry: dict, dtype: torch.dtype = torch.float32) -> None:
    """After the weights are assigned: every quantized tensor rebuilt from its packed buffers."""
    for name, t in qentry["tensors"].items():
        owner, attr = _owner(model, name)
        w = _stored(owner, attr, t, spec_of(qentry, name)).to(dtype).contiguous()
        if attr in getattr(owner, "_layershare_quant_params", ()):
            owner._parameters[attr] = nn.Parameter(w, requires_grad=False)
        else:
            owner._buffers[attr] = w


def drop_codes(model: nn.Module, qentry: dict) -> None:
    """Free the packed buffers of tensors that `dequantize_model` rebuilt, for a model that cannot be
    saved again anyway (some of its quantized tensors were kept packed for the low-bit kernels):
    the float tensors are all it computes with."""
    for name in qentry["tensors"]:
        owner, attr = _owner(model, name)
        for s in SUFFIXES:
            owner._buffers.pop(f"{attr}_q{s}", None)
