"""Weights that are exactly 16-bit, held at 16 bits by a model loaded in float32.

A model loaded in float32 from a checkpoint whose weights were bfloat16 (SmolLM2's, Llama's,
Gemma's: most released LLMs) holds every weight at twice the bytes it carries: the attention's
linears, the embedding and a tied head are still the source model's 16-bit values. With
`runtime="auto"` on the CPU, `narrow_model` keeps each plain nn.Linear and nn.Embedding whose
float32 weight round-trips exactly through bfloat16 (or float16) at that width, and computes
with it in float32:

  Embedding16  rows looked up at 16 bits, widened to float32 (exact)
  Linear16     up to DECODE_ROWS rows: the native kernel's x @ V^T with V kept whole (ops.all_kept)
               (runtime/kernels: 16-bit values widened in registers, float32 accumulation); more
               rows: the weight widened a slice at a time into the kernels' scratch buffer (ops.scratch), then PyTorch's
               GEMM. A tied embedding and head share one 16-bit tensor.

The products are float32 products of the same float32 numbers, so the outputs equal the wide
model's up to the order of summation (tests/test_narrow.py). Half the bytes per token to read
also make decoding faster.

A model loaded in bfloat16 or float16 holds its linears at 16 bits already; `narrow_model` puts
each plain one in a Linear16 on the same tensor too, because at a few rows the kernels' product
(widened in registers, float32 sums, the result rounded to the activations' dtype) is faster than
PyTorch's 16-bit GEMV on the CPUs measured (docs/runtime.md); prompts (more than
ops.DECODE_ROWS rows) run PyTorch's GEMM as the dense model does. Nothing is narrowed without
the native kernels (the widening per call would be slower than the float32 weights), off the
CPU, or for any other runtime. Such a model refuses to be saved, like a merged or packed one
(load it with runtime="compact" to save it).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from layershare.adapters.base import set_path
from layershare.runtime import kernels
from layershare.runtime.kernels import ops

NARROW_DTYPES = (torch.bfloat16, torch.float16)
SCRATCH_FLOATS = 1 << 20  # the prefill path widens at most this many weights at a time (4 MiB)


def exact_narrow(w: torch.Tensor) -> torch.Tensor | None:
    """`w` (float32) at 16 bits if some 16-bit dtype holds every value exactly, else None."""
    if w.dtype != torch.float32:
        return None
    for dtype in NARROW_DTYPES:
        narrow = w.to(dtype)
        if torch.equal(narrow.float(), w):
            return narrow
    return None


class Linear16(nn.Module):
    """y = x W^T + b with W held at 16 bits, computed in float32 (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight16", weight)
        # the kernel's view of W: every entry kept (mask all ones), the per-row index built here
        mask, offsets = ops.all_kept(tuple(weight.shape))
        self.register_buffer("mask", mask)
        self.register_buffer("offsets", offsets)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._fast = None  # (weight16, ops.decode_fn's product for it): the decoding path, remade when weight16 changes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decoding, the common case (some 120 calls a token): the product kept in a plain attribute
        # (no nn.Module lookups), remade when weight16 is another tensor (moved, loaded, assigned)
        w = self._buffers["weight16"]
        fast = self._fast
        if fast is None or fast[0] is not w:
            prod = ops.decode_fn(w.view(-1), self._buffers["mask"], self._buffers["offsets"], None)
            fast = self._fast = (w, prod) if prod is not None else None
        x2 = ops.decode_rows(x) if fast is not None else None
        if x2 is not None:
            op, args = fast[1]
            y = op(x2, *args)
            bias = self._parameters.get("bias")
            if bias is not None:
                y = y + bias.to(y.dtype)
            return y.view(*x.shape[:-1], self.out_features)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if ops.dense_16bit(x2, self.weight16):  # a 16-bit model's prompt: the dense model's own GEMM
            y = F.linear(x2, self.weight16)
        elif x2.shape[0] <= ops.DECODE_ROWS:
            y = ops.out_product(x2, self.weight16.view(-1), self.mask, self.offsets)
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)
            step = max(1, SCRATCH_FLOATS // self.in_features)
            for i in range(0, self.out_features, step):
                part = self.weight16[i:i + step]
                w = ops.scratch(tuple(part.shape)).copy_(part).to(x2.dtype)
                y[:, i:i + step] = x2 @ w.t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def __getstate__(self):  # deepcopy/pickle: the decoding path is remade from the buffers
        state = dict(super().__getstate__())
        state["_fast"] = None
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight16.dtype} held"


class Embedding16(nn.Module):
    """nn.Embedding with its table held at 16 bits; rows widened to `dtype` as they are looked up."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight16", weight)
        # the output dtype, as an empty buffer: model.to(dtype) moves it along with the model
        self.register_buffer("out_dtype", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight16, self.padding_idx).to(self.out_dtype.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight16.dtype} held"


def _plain(m: nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """A plain nn.Linear / nn.Embedding on the CPU, its weight of one of `dtypes`, with no hooks
    (subclasses compute otherwise: Gemma-3's scaled embedding, GPT-2's Conv1D)."""
    if type(m) not in (nn.Linear, nn.Embedding):
        return False
    if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):  # accelerate's offload hooks too
        return False
    if type(m) is nn.Embedding and (m.max_norm is not None or m.sparse or m.scale_grad_by_freq):
        return False
    return m.weight.dtype in dtypes and m.weight.device.type == "cpu"


def narrow_model(model: nn.Module) -> int:
    """Replace, in place, every plain float32 nn.Linear / nn.Embedding of a CPU model whose weight
    is exactly 16-bit by Linear16 / Embedding16 (tied weights stay one tensor), and every plain
    16-bit nn.Linear (a model loaded in bfloat16 or float16) by a Linear16 on the same tensor.
    Returns how many modules it replaced (0 without the native kernels)."""
    if not kernels.available():
        return 0
    holders: dict[int, list[nn.Module]] = {}  # id(weight) -> every module holding it (tied ones: several)
    for m in model.modules():
        w = m.__dict__.get("_parameters", {}).get("weight")
        if isinstance(w, torch.Tensor):
            holders.setdefault(id(w), []).append(m)
    narrowed: dict[int, torch.Tensor | None] = {}  # id(float32 weight) -> its 16-bit tensor (None: not exact)
    done: dict[int, nn.Module] = {}  # id(module) -> its replacement (a module at several paths: one replacement)
    replaced = 0
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) in done:
            set_path(model, name, done[id(m)])
            continue
        if name and type(m) is nn.Linear and _plain(m, NARROW_DTYPES):  # a 16-bit model's linear: the same
            new = Linear16(m.weight.detach(), m.bias.detach() if m.bias is not None else None)  # tensor, no copy
            set_path(model, name, new)
            done[id(m)] = new
            replaced += 1
            continue
        if not name or not _plain(m):
            continue
        key = id(m.weight)
        if key not in narrowed:
            # a weight tied to a module that stays wide (Gemma-3's scaled embedding) would be held twice
            tied_wide = not all(_plain(h) for h in holders[key])
            narrowed[key] = None if tied_wide else exact_narrow(m.weight.detach())
        w16 = narrowed[key]
        if w16 is None:
            continue
        if type(m) is nn.Linear:
            bias = m.bias.detach() if m.bias is not None else None
            new = Linear16(w16, bias)
        else:
            new = Embedding16(w16, m.padding_idx, m.weight.dtype)
        set_path(model, name, new)
        done[id(m)] = new
        replaced += 1
    return replaced


__all__ = ["Embedding16", "Linear16", "exact_narrow", "narrow_model"]
