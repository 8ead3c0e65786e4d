"""Run-time forms of a compressed model, chosen when it is loaded (`layershare.load(DIR, runtime=...)`).

  compact   what is stored on disk, held as is: shared bases once, each sparse V as its nonzeros
            plus a bitmask (rebuilt into a dense V on every forward), MASA's atoms and
            coefficients. The smallest resident model (within a few bytes of the file); the slowest.
  factored  every V dense (zeros in place), products by dense matmuls; up and gate share x @ U.
  csr       every sparse V as a CSR tensor (int32 indices: 8 bytes per nonzero).
  sparse    every sparse V as stored (nonzeros + bitmask) plus a small index built at load, its
            products run by the native kernels (runtime/kernels: layer form "kernel"); dense V
            layers factored. Needs the kernels built (`python -m layershare.runtime.kernels.build`);
            without them it runs a slow pure-PyTorch fallback, after a warning.
  merged    every compressed linear as a plain nn.Linear holding W = U V_i (or sum_k c_k D_k):
            the dense model's size and speed; only the file is smaller.
  auto      per shared group: sparse when its V are sparse, on the CPU, the kernels are built and the group
            holds fewer bytes that way than merged; else the factored form where its factors hold
            fewer values than the merged weights (then it also computes less: it is smaller and
            faster); else merged. On the CPU, plain linears and embeddings whose float32 weights are
            exactly 16-bit are then held at 16 bits (narrow.py). The default (docs/runtime.md has
            the measurements).
"""
from __future__ import annotations

import gc

import torch
from torch import nn

from layershare.adapters.base import IN, set_path
from layershare.modules.atoms import AtomLinear, MatrixAtoms
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.modules.store import BASES_ATTR
from layershare.runtime import kernels
from layershare.runtime.kernels.ops import BLOCK, INDEX_PER

RUNTIMES = ("auto", "compact", "factored", "csr", "merged", "sparse")


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SharedBasisLinear, AtomLinear))]


def merged_linear(layer: nn.Module) -> nn.Linear:
    """A plain nn.Linear computing what `layer` computes."""
    with torch.no_grad():
        if isinstance(layer, AtomLinear):
            W = layer.weight
        else:
            UV = layer.basis.U @ layer.dense_V().to(layer.basis.U.dtype)  # (d, h)
            W = UV.t() if layer.role == IN else UV  # nn.Linear's (out, in)
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device="meta", dtype=W.dtype)
        out.weight = nn.Parameter(W.contiguous(), requires_grad=False)
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return out


def _shared_of(layer: nn.Module) -> nn.Module:
    return layer.atoms if isinstance(layer, AtomLinear) else layer.basis


def factored_is_smaller(shared: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether the shared module and dense per-layer factors hold fewer values than the merged
    weights of `layers` (then the factored form also does fewer multiply-adds per token)."""
    if isinstance(shared, MatrixAtoms):  # W = sum_k c_k D_k is rebuilt per call: never cheaper to run
        return False
    d, r = shared.U.shape
    factored = d * r + sum(r * layer.v_shape[1] for layer in layers)
    merged = sum(d * layer.v_shape[1] for layer in layers)
    return factored < merged


def kernel_is_smaller(shared: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether the group held in the kernel form (U once, each V's nonzeros, bitmask and load-time
    index) takes fewer bytes than the merged weights of `layers` (decoding then also reads fewer
    bytes per token)."""
    if isinstance(shared, MatrixAtoms) or not all(isinstance(m, SharedBasisLinear) and m.sparse for m in layers):
        return False
    d, r = shared.U.shape
    item = shared.U.element_size()
    kernel = d * r * item
    for m in layers:
        h = m.v_shape[1]
        values = m.stored_values() if m.form in ("compact", "kernel") else None
        if values is None:
            value_bytes = m.nnz() * item
        elif isinstance(values, torch.Tensor):
            value_bytes = m.nnz() * values.element_size()
        else:  # codes (ops.QuantValues)
            value_bytes = values.nbytes()
        blocks = -(-h // BLOCK)
        index = r * -(-blocks // INDEX_PER) * 4  # an int32 per INDEX_PER blocks of 64 columns
        kernel += value_bytes + (r * h + 7) // 8 + index  # values, bitmask, index
    return kernel < sum(d * m.v_shape[1] * item for m in layers)


def _group_form(shared: nn.Module, layers: list[nn.Module], runtime: str) -> str:
    """The form the layers of one shared group take under `runtime` ("kernel": runtime/kernels)."""
    if runtime != "auto":
        return runtime
    on_cpu = all(t.device.type == "cpu" for t in [*shared.parameters(), *shared.buffers()])  # the kernels are the CPU's
    if on_cpu and kernel_is_smaller(shared, layers) and kernels.available():
        return "kernel"
    return "factored" if factored_is_smaller(shared, layers) else "merged"


def to_runtime(model: nn.Module, runtime: str = "auto", stored: torch.dtype | None = None) -> nn.Module:
    """Put every compressed layer of `model` in the run-time form `runtime` (see the module
    docstring), in place; shared modules no layer uses any more are dropped. `stored`: the
    checkpoint's storage dtype; a kernel-form layer loaded wider (a bfloat16 file in float32)
    holds its V values back at that width when they round-trip exactly (the kernels widen them
    to float32 as they read them: the same products, half the bytes). Returns `model`."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    merged = _convert(model, runtime, stored)  # in a function of its own: the replaced layers die with its frame
    _drop_unused_shared(model)
    if runtime == "auto":  # exactly-16-bit plain weights of a float32 CPU model held at 16 bits (narrow.py)
        from layershare.runtime.narrow import narrow_model

        model.layershare_narrowed = getattr(model, "layershare_narrowed", 0) + narrow_model(model)
    # merged layers are plain nn.Linear: such a model runs, but cannot be saved or tuned as compressed
    model.layershare_merged = getattr(model, "layershare_merged", 0) + merged
    release_heap()
    return model


def _convert(model: nn.Module, runtime: str, stored: torch.dtype | None = None) -> int:
    groups: dict[int, tuple[nn.Module, list[tuple[str, nn.Module]]]] = {}
    for name, layer in _layers(model):
        groups.setdefault(id(_shared_of(layer)), (_shared_of(layer), []))[1].append((name, layer))
    merged = 0
    for shared, members in groups.values():
        form = _group_form(shared, [m for _, m in members], runtime)
        for name, layer in members:
            if form == "merged":
                set_path(model, name, merged_linear(layer))
                merged += 1
            elif isinstance(layer, SharedBasisLinear):
                layer.to_form(("kernel" if layer.sparse else "factored") if form == "sparse" else form)
                if layer.form == "kernel":
                    narrow_values(layer, stored)
        if isinstance(shared, SharedBasis):  # a quantized U staged at load: held as codes under the kernels
            kernel = all(isinstance(m, SharedBasisLinear) and m.form == "kernel" for _, m in members)
            if kernel and shared.hold_codes():
                model.layershare_packed = getattr(model, "layershare_packed", 0) + 1
            elif kernel and shared.hold_narrow(stored):  # a 16-bit U loaded wider: back at 16 bits
                model.layershare_narrowed = getattr(model, "layershare_narrowed", 0) + 1
            shared.drop_staged()
    return merged


def narrow_values(layer: SharedBasisLinear, stored: torch.dtype | None) -> None:
    """A kernel-form layer's V values back at the narrower `stored` dtype, if they round-trip
    exactly (values read from a 16-bit file; not dequantized codes, which need not)."""
    values = layer.stored_values()
    if not isinstance(values, torch.Tensor) or stored is None or not stored.is_floating_point:
        return  # codes (ops.QuantValues) stay codes
    if stored.itemsize >= values.element_size():
        return
    narrow = values.to(stored)
    if torch.equal(narrow.to(values.dtype), values):
        layer._buffers["V_values"] = narrow


def release_heap() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc's malloc_trim), so the resident
    memory after a conversion is what the model holds, not what it held on the way."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _drop_unused_shared(model: nn.Module) -> None:
    store = getattr(model, BASES_ATTR, None)
    if store is None:
        return
    used = {id(_shared_of(m)) for _, m in _layers(model)}
    for k in [k for k, m in store.items() if id(m) not in used]:
        del store[k]
    if not len(store):
        delattr(model, BASES_ATTR)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters, buffers, CSR parts), each once."""
    seen, total = set(), 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.device.type == "meta":
            return
        k = (t.data_ptr(), t.numel(), t.dtype)
        if k not in seen:
            seen.add(k)
            total += t.numel() * t.element_size()

    for m in model.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            add(t)
        csr = m.__dict__.get("V_csr")
        if csr is not None:
            for t in (csr.values(), csr.crow_indices(), csr.col_indices()):
                add(t)
    return total


def forms(model: nn.Module) -> dict[str, int]:
    """How many compressed layers are in each form (merged ones are plain nn.Linear, not counted)."""
    out: dict[str, int] = {}
    for _, m in _layers(model):
        f = m.form if isinstance(m, SharedBasisLinear) else "atoms"
        out[f] = out.get(f, 0) + 1
    return out


__all__ = ["RUNTIMES", "factored_is_smaller", "forms", "kernel_is_smaller", "merged_linear", "resident_bytes",
           "to_runtime"]
