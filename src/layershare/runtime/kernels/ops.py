"""Products with a sparse V held as it is stored: its kept values (row-major) plus a bitmask.

A FiPS layer's V (r x h) is `values` (the kept entries in row-major order; float32, bfloat16 or
float16) and `mask` (uint8, one bit per entry of the flat r*h matrix, most significant bit first:
shared_basis.pack_bits). `prepare(mask, shape)` computes at load the small index the native
kernels need (`offsets`: for each row and every 4th block of 64 columns, where its values start;
the kernels count the mask bits of the blocks between); it is never stored. Then, for
activations of any leading shape and dtype:

  in_product(z, values, mask, offsets, h)   z @ V    (..., r) -> (..., h)   (up/gate: z = x @ U)
  out_product(x, values, mask, offsets)     x @ V^T  (..., h) -> (..., r)   (down, before @ U^T)

Up to DECODE_ROWS rows of activations (decoding) go through the sparse kernels (bitmask.cpp:
float32 accumulation; bfloat16/float16 activations are widened to float32 inside the op and the
result rounded back to their dtype). More
rows (a prompt) expand V into a per-thread scratch buffer and use PyTorch's dense GEMM, in
bfloat16 for bfloat16 activations on a CPU that has it in hardware (as the dense model's linears
do; V expanded straight into bfloat16), else in float32: no dense V is kept by any layer between
calls. CUDA activations
take the Triton kernels (triton_bitmask.py) when Triton is installed, at every row count.

`values` may also be a `QuantValues`: the kept values as integer codes on a group-wise grid
(quant/grid.py: value = (code - zero) * scale per group of consecutive values), held packed (half
a byte per value at 4 bits and below) and dequantized inside the kernels as they are read, to
exactly grid.decode's float32 values; a prompt's expansion writes those values into the scratch
buffer. A quantized FiPS model loaded on the CPU keeps its V values so (runtime/forms.py).

The native library is built once by `python -m layershare.runtime.kernels.build` and loaded from
its cache here, never compiled implicitly. Without it (or with LAYERSHARE_NO_KERNEL=1) the same
functions run a pure-PyTorch reference (V rebuilt densely per call: correct, slow), after one
warning. The reference also serves tensors the kernels do not take: other devices (a GPU without
Triton), float64, and activations that require grad (the kernels have no backward).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from layershare.hardware import native_bf16
from layershare.modules.bits import pack_bits, unpack_bits
from layershare.runtime.kernels.library import library_path

BLOCK = 64  # columns per offsets block (bitmask.cpp's kBlock)
DECODE_ROWS = 8  # activation rows up to which the sparse kernels run; above, dense GEMM on an expanded V
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPS = ("bitmask_in", "bitmask_out", "bitmask_expand", "bitmask_in_q", "bitmask_out_q", "bitmask_expand_q")


class QuantValues(NamedTuple):
    """A sparse V's kept values held as codes: `codes` (uint8, 1-D: two codes a byte, value p in the
    low nibble of byte p // 2 when p is even, when `bits` is 4; one a byte when 8), `scales`
    (float16) and `zeros` (uint8 zero points), one per `group` consecutive values (a power of two
    >= 16), `n` values. Value p is (code_p - zeros[p // group]) * scales[p // group] in float32."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group: int
    n: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group: int) -> "QuantValues | None":
        """From a 1-D QTensor's parts (codes one per value, float16 scales, uint8 zero points or None
        for a symmetric grid of `bits`): 2-, 3- and 4-bit codes held as 4-bit ones (exactly), 8-bit as
        bytes. None when the kernels cannot take the grid (a group that is not a power of two >= 16)."""
        if group < 16 or group & (group - 1) or codes.dim() != 1:
            return None
        from layershare.quant.pack import pack

        n = codes.numel()
        width = 4 if bits <= 4 else 8
        c = pack(codes, 4) if width == 4 else codes.to(torch.uint8)  # quant/pack.py's order: low nibble first
        z = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.uint8) if zeros is None else zeros.to(torch.uint8)
        return cls(c.contiguous(), scales.to(torch.float16).contiguous(), z.reshape(-1).contiguous(), width, group, n)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def codes_per_value(self) -> torch.Tensor:
        """The codes one per value (uint8)."""
        from layershare.quant.pack import unpack

        return self.codes if self.bits == 8 else unpack(self.codes, 4, self.n)

    def dequantize(self) -> torch.Tensor:
        """The float32 values (grid.decode's arithmetic)."""
        g = torch.arange(self.n, device=self.codes.device) // self.group
        return (self.codes_per_value().float() - self.zeros[g].float()) * self.scales[g].float()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    def args(self) -> tuple:
        return (self.codes, self.scales, self.zeros, self.bits, self.group, self.n)

_loaded: bool | None = None
# the ops' overloads, bound at load (decode_fn's products)
_decode_in = _decode_out = _decode_in_q = _decode_out_q = None
_fakes = False
_warned = False
_scratch = threading.local()


# ---- the native library ---------------------------------------------------------------------
def _registered() -> bool:
    """Whether layershare's ops have CPU kernels in this process (an unknown op dumps as "")."""
    return all("CPU" in torch._C._dispatch_dump(f"layershare::{op}") for op in OPS)


def disabled() -> bool:
    """Whether LAYERSHARE_NO_KERNEL asks to run without the native kernels (tests use it)."""
    return os.environ.get("LAYERSHARE_NO_KERNEL", "") not in ("", "0")


def _load() -> bool:
    global _decode_in, _decode_out, _decode_in_q, _decode_out_q
    if disabled():
        return False
    if not _registered():
        path = library_path()
        if not path.exists():
            return False
        torch.ops.load_library(str(path))
    _register_fakes()
    if not _registered():
        return False
    _decode_in, _decode_out = torch.ops.layershare.bitmask_in.default, torch.ops.layershare.bitmask_out.default
    _decode_in_q, _decode_out_q = torch.ops.layershare.bitmask_in_q.default, torch.ops.layershare.bitmask_out_q.default
    return True


def _decoding(t: torch.Tensor, values) -> bool:
    """Whether `t` (2-D) is the common decoding case, for the ops with no further checks or
    conversions: at most DECODE_ROWS contiguous float32/bfloat16/float16 CPU rows that ask for no
    gradient (16-bit ones widened inside the op, the result in their dtype), 16/32-bit values or
    QuantValues on the CPU, the library loaded: decode_rows and decode_fn admit them. (Each check
    of the general path costs about a microsecond; a token of SmolLM2 calls the products some 270
    times. 4-bit values through the general path: 12.7 us a call of a tiny V against 4.1 us for
    the op itself.)"""
    return decode_rows(t) is not None and decode_fn(values, None, None, None) is not None


def decode_fn(values, mask: torch.Tensor, offsets: torch.Tensor, h: int | None):
    """A layer's decoding product, made once and kept by the layer: (op, args) with op(rows, *args)
    = rows @ V (h given: in_product's) or rows @ V^T (h None: out_product's) for rows that
    decode_rows admits; None where the kernels do not take these values (not loaded, values off the
    CPU or of another dtype). The layers call it again when their tensors change."""
    if _loaded is not True:
        return None
    if type(values) is torch.Tensor:
        if not (values.is_cpu and values.dtype in VALUE_DTYPES):
            return None
        return (_decode_out, (values, mask, offsets)) if h is None else (_decode_in, (values, mask, offsets, h))
    if type(values) is QuantValues and values.codes.is_cpu:
        args = (*values.args(), mask, offsets)
        return (_decode_out_q, args) if h is None else (_decode_in_q, (*args, h))
    return None


def decode_rows(t: torch.Tensor) -> torch.Tensor | None:
    """`t` as a 2-D view of its rows when it is the decoding case for a decode_fn product (at most
    DECODE_ROWS contiguous CPU rows of a kernel dtype that ask for no gradient: _decoding's checks
    on the activations' side), else None."""
    if t.requires_grad or not t.is_cpu or t.dtype not in ACTIVATION_DTYPES or not t.is_contiguous():
        return None
    d = t.shape[-1]
    n = t.numel() // d if d else 0
    return t.view(n, d) if n <= DECODE_ROWS and d else None


def available() -> bool:
    """Whether the native kernels are loaded (loads them from the build cache on first call)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def isa() -> str:
    """The path the products run: "avx512", "avx2", "portable" (the native scalar code) or
    "reference" (no native library)."""
    return torch.ops.layershare.bitmask_isa() if available() else "reference"


def set_isa(use: str) -> str:
    """Switch the native kernels to "portable", to at most "avx2", or back to the "best" path the
    CPU has (tests compare them); returns the path now in use."""
    return _native_ops().bitmask_isa(use)


def spread() -> str:
    """How the AVX-512 path moves kept values to their columns: "expand16" (bfloat16 values spread
    32 columns at a time by one vpexpandw, 4- and 8-bit codes 64 at a time by one vpexpandb: the
    default on Intel CPUs with AVX-512 VBMI2; other value types take "expand"), "expand" (one
    vexpandps per 16 columns: other Intel CPUs) or "permute" (a lookup table and one vpermps:
    elsewhere). In-products are the same bit for bit; expand16's out-products at up to 4 rows sum
    in other lanes (bitmask.cpp, each_pair32)."""
    return _native_ops().bitmask_spread()


def set_spread(use: str) -> str:
    """Switch the AVX-512 spreading to "expand16" (where the CPU has VBMI2, else "expand"), "expand",
    "permute" or back to the CPU's "best"; returns the one now in use."""
    return _native_ops().bitmask_spread(use)


def amx() -> str:
    """Whether products of bfloat16 values and bfloat16 activations run on AMX tiles (in-products
    at 6-8 rows, out-products at 4-8: bitmask.cpp, in_tile_amx and out_rows_amx): "on" (the default
    where the CPU has AMX-BF16 and the OS allows it; LAYERSHARE_KERNEL_AMX=0 turns it off), "off",
    or "absent"."""
    return _native_ops().bitmask_amx()


def set_amx(use: str) -> str:
    """Switch the AMX products "on" (refused where absent), "off" or back to the "best"; returns
    amx()."""
    return _native_ops().bitmask_amx(use)


def _native_ops():
    """torch.ops.layershare, refusing when the native library is not loaded."""
    if not available():
        raise RuntimeError("the native sparse kernel is not loaded")
    return torch.ops.layershare


def _register_fakes() -> None:
    """Shapes of the ops' outputs without computing them (torch.compile, meta tensors)."""
    global _fakes
    if _fakes:
        return
    _fakes = True

    @torch.library.register_fake("layershare::bitmask_in")
    def _(z, values, mask, offsets, h):
        return z.new_empty((z.shape[0], h))

    @torch.library.register_fake("layershare::bitmask_out")
    def _(x, values, mask, offsets):
        return x.new_empty((x.shape[0], offsets.shape[0]))

    @torch.library.register_fake("layershare::bitmask_expand")
    def _(values, mask, offsets, out):
        return None

    @torch.library.register_fake("layershare::bitmask_in_q")
    def _(z, codes, scales, zeros, bits, group, n, mask, offsets, h):
        return z.new_empty((z.shape[0], h))

    @torch.library.register_fake("layershare::bitmask_out_q")
    def _(x, codes, scales, zeros, bits, group, n, mask, offsets):
        return x.new_empty((x.shape[0], offsets.shape[0]))

    @torch.library.register_fake("layershare::bitmask_expand_q")
    def _(codes, scales, zeros, bits, group, n, mask, offsets, out):
        return None


def _warn_fallback() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    why = "is disabled (LAYERSHARE_NO_KERNEL is set)" if disabled() else "is not built"
    warnings.warn(f"layershare: the native sparse kernel {why}; sparse layers run on a pure-PyTorch fallback "
                  "that rebuilds each dense V per call (correct but slow). Build the kernel once with "
                  "`python -m layershare.runtime.kernels.build`.", RuntimeWarning, stacklevel=3)


def _kernel_input(t: torch.Tensor, values: torch.Tensor, device_type: str) -> bool:
    """Whether activations `t` and `values` are what a kernel on `device_type` takes: that device,
    the dtypes it computes, no gradient asked for (the kernels have no backward)."""
    if isinstance(values, QuantValues):  # the native kernels only (a GPU dequantizes)
        if device_type != "cpu" or values.device.type != "cpu" or t.device.type != "cpu":
            return False
    elif values.dtype not in VALUE_DTYPES:
        return False
    if t.device.type != device_type or t.dtype not in ACTIVATION_DTYPES:
        return False
    return not (t.requires_grad and torch.is_grad_enabled())


def _native(t: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the native kernels take activations `t` with `values` (else: the reference)."""
    if not _kernel_input(t, values, "cpu"):
        return False
    if not available():
        _warn_fallback()
        return False
    return True


def _triton():
    from layershare.runtime.kernels import triton_bitmask  # imported when a GPU tensor first arrives

    return triton_bitmask


def _gpu(t: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether activations `t` take the Triton kernels (a CUDA tensor, Triton installed, no grad, a
    V with a bitmask: one kept whole runs the reference's dense product)."""
    return mask.numel() > 0 and _kernel_input(t, values, "cuda") and _triton().usable(t)


# ---- the index, computed at load ------------------------------------------------------------
INDEX_PER = 4  # blocks of 64 columns per offset in the native kernels' index (bitmask.cpp counts the rest)


def prepare(mask: torch.Tensor, shape: tuple[int, int], per: int = INDEX_PER) -> torch.Tensor:
    """offsets (int32): the index in `values` of the first kept entry of each row's every `per`-th
    block of 64 columns: r x ceil(nb/per), nb = ceil(h/64). per = 4 (the native kernels' default:
    an int32 per 256 columns: at half density 1.6% of bfloat16 values' bytes, 6% of 4-bit ones) or 1 (every block:
    the Triton kernels')."""
    if per not in (1, 4):
        raise ValueError(f"per must be 1 or 4, got {per}")
    r, h = shape
    nb = -(-h // BLOCK)
    keep = F.pad(unpack_bits(mask, (r, h)), (0, nb * BLOCK - h)).view(r, nb, BLOCK)
    counts = keep.sum(dim=-1).flatten()
    if int(counts.sum()) >= 2 ** 31:
        raise ValueError(f"V of shape {tuple(shape)} keeps {int(counts.sum())} entries: the kernels index "
                         "at most 2**31 - 1")
    return (counts.cumsum(0) - counts).to(torch.int32).view(r, nb)[:, ::per].contiguous()


def all_kept(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, offsets) of a matrix the kernels read whole (a 16-bit weight or basis, or codes, that
    they widen as they read them): an empty mask and offsets of shape (r, 0), which tell the native
    kernels that every entry is kept, in row-major order. No bits to store or read (an all-ones
    bitmask alone is 1/16 of a 16-bit weight's bytes; with its index, 8.3 MiB of SmolLM2's FiPS
    20% model loaded: 214.8 -> 206.5 MiB)."""
    return torch.empty(0, dtype=torch.uint8), torch.empty((int(shape[0]), 0), dtype=torch.int32)


def _per_block(offsets: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """An offset per block, as the Triton kernels read them (a layer made on a GPU holds that one:
    shared_basis._set_offsets; one made on the CPU and moved holds the coarser one, expanded here)."""
    return offsets if offsets.shape[1] == -(-shape[1] // BLOCK) else prepare(mask, shape, per=1)


# ---- the pure-PyTorch reference -------------------------------------------------------------
def reference_dense(values: "torch.Tensor | QuantValues", mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """V as a dense (r x h) matrix in the values' dtype (float32 for QuantValues)."""
    if isinstance(values, QuantValues):
        values = values.dequantize()
    if mask.numel() == 0 and values.numel() == shape[0] * shape[1]:  # kept whole (all_kept)
        return values.reshape(shape)
    return values.new_zeros(shape).masked_scatter_(unpack_bits(mask, shape), values)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# ---- the products ---------------------------------------------------------------------------
def in_product(z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor,
               h: int) -> torch.Tensor:
    """z @ V for z of shape (..., r): (..., h), in z's dtype."""
    r = z.shape[-1]
    z2 = _rows(z)
    if _decoding(z2, values):
        op, args = decode_fn(values, mask, offsets, h)
        return op(z2, *args).view(*z.shape[:-1], h)
    if _gpu(z2, values, mask):
        y = _triton().in_product(z2, values, mask, _per_block(offsets, mask, (r, h)), h)
    elif not _native(z2, values):
        y = z2 @ reference_dense(values, mask, (r, h)).to(z.dtype)
    elif z2.shape[0] <= DECODE_ROWS and isinstance(values, QuantValues):
        y = torch.ops.layershare.bitmask_in_q(z2.contiguous(), *values.args(), mask, offsets, h)
    elif z2.shape[0] <= DECODE_ROWS:
        y = torch.ops.layershare.bitmask_in(z2.contiguous(), values, mask, offsets, h)
    else:
        y = (z2 @ _expanded(values, mask, offsets, (r, h), z2.dtype) if _gemm_16bit(z2)
             else z2.float() @ _expanded(values, mask, offsets, (r, h)))
    return y.to(z.dtype).reshape(*z.shape[:-1], h)


def out_product(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x @ V^T for x of shape (..., h): (..., r), in x's dtype."""
    r, h = offsets.shape[0], x.shape[-1]
    x2 = _rows(x)
    if _decoding(x2, values):
        op, args = decode_fn(values, mask, offsets, None)
        return op(x2, *args).view(*x.shape[:-1], r)
    if _gpu(x2, values, mask):
        y = _triton().out_product(x2, values, mask, _per_block(offsets, mask, (r, h)))
    elif not _native(x2, values):
        y = x2 @ reference_dense(values, mask, (r, h)).to(x.dtype).t()
    elif x2.shape[0] <= DECODE_ROWS and isinstance(values, QuantValues):
        y = torch.ops.layershare.bitmask_out_q(x2.contiguous(), *values.args(), mask, offsets)
    elif x2.shape[0] <= DECODE_ROWS:
        y = torch.ops.layershare.bitmask_out(x2.contiguous(), values, mask, offsets)
    else:
        y = (x2 @ _expanded(values, mask, offsets, (r, h), x2.dtype).t() if _gemm_16bit(x2)
             else x2.float() @ _expanded(values, mask, offsets, (r, h)).t())
    return y.to(x.dtype).reshape(*x.shape[:-1], r)


def expand(values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write V into `out` (r x h, contiguous; float32, or bfloat16/float16 rounded as Tensor.to
    rounds) with the native kernel; returns `out`."""
    if isinstance(values, QuantValues):
        torch.ops.layershare.bitmask_expand_q(*values.args(), mask, offsets, out)
    else:
        torch.ops.layershare.bitmask_expand(values, mask, offsets, out)
    return out


def _gemm_16bit(t: torch.Tensor) -> bool:
    """Whether a long input's GEMM runs in its own 16-bit dtype (as the dense model's does: bfloat16
    activations on a CPU with bfloat16 in hardware, AVX512-BF16 or AMX) rather than in float32."""
    return t.dtype == torch.bfloat16 and native_bf16("cpu")


def dense_16bit(t: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether activations `t` (2-D) times a whole 16-bit `weight` should run PyTorch's own GEMM in
    that dtype rather than the kernels: `t` of the weight's dtype and more than DECODE_ROWS rows (a
    prompt). Up to DECODE_ROWS the kernels are faster, also where the CPU multiplies bfloat16 in
    hardware: measured on an Intel Xeon with AMX, SmolLM2 FiPS 20% loaded in bfloat16 decoding 8
    sequences, its attention, bases and head through the kernels instead of PyTorch's bfloat16 GEMM
    0.83x against 0.79x the dense model's speed (same process, alternated: PyTorch's GEMM of a
    576 x 576 weight at 8 rows took 85-92 us in the decoding model, 41 us with the weight cached)."""
    return t.dtype == weight.dtype and t.shape[0] > DECODE_ROWS


def scratch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of `shape` and `dtype` in this thread's scratch buffer (valid until the next call in
    this thread; one buffer for every caller and dtype); a fresh tensor while torch.compile traces
    (no state outside the graph)."""
    if torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = max(numel, 1) * dtype.itemsize
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        # a normal tensor even when first asked for under torch.inference_mode: an inference
        # tensor could not be written again outside it (generate under inference_mode, then a
        # perplexity under no_grad failed so)
        with torch.inference_mode(False):
            buf = _scratch.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes].view(dtype)[:numel].view(shape)


def _expanded(values, mask, offsets, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """V in `dtype` (float32, or the 16-bit dtype of a prompt's GEMM: rounded as Tensor.to rounds,
    by the op, with no float32 V of the whole shape), in this thread's scratch buffer (scratch)."""
    return expand(values, mask, offsets, scratch(shape, dtype))


def self_check() -> None:
    """Raise unless both products and the expansion agree with the reference on a small V whose
    rows do not start on a byte (run after a build)."""
    g = torch.Generator().manual_seed(0)
    r, h = 33, 100
    keep = torch.rand(r, h, generator=g) < 0.5
    dense = torch.randn(r, h, generator=g) * keep
    values, mask = dense[keep], pack_bits(keep)
    offsets = prepare(mask, (r, h))
    z, x = torch.randn(3, r, generator=g), torch.randn(3, h, generator=g)
    torch.testing.assert_close(in_product(z, values, mask, offsets, h), z @ dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_product(x, values, mask, offsets), x @ dense.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(expand(values, mask, offsets, torch.empty(r, h)), dense)
