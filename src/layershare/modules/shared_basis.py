"""What a FiPS-compressed MLP linear is at run time.

A group of blocks shares one basis U (d x r). Each of the group's MLP linears keeps its
own sparse projection V_i (r x h_i); its weight in d x h form is U @ V_i:
  d -> h (up/gate/fc1):  y = (x @ U) @ V_i + b
  h -> d (down/fc2):     y = (x @ V_i^T) @ U^T + b
The up and gate projections of a block read the same x through the same U: `SharedBasis.project`
computes z = x @ U once per input and hands it to both.

A layer is in one form at a time (`form`):
  train    V a Parameter and a bool mask of the entries it keeps (while tuning); V is zero outside
           the mask (the pruner zeroes it, `apply_mask` again after every optimiser step), so
           the forward reads V itself, with no masked copy of it
  compact  what is stored: V's nonzeros + a bitmask of where they are (a sparse V) or the dense V;
           a sparse V is rebuilt on every forward (the smallest resident form, the slowest)
  factored V dense, zeros in place (dense matmuls: fast when the factors are smaller than W)
  csr      V as a CSR tensor with int32 indices (8 bytes per nonzero)
  kernel   a sparse V as in compact (the same two buffers) plus a small index computed at load
           (`V_offsets`, not saved); products by the native kernels of runtime/kernels, straight
           from the packed form (up to 8 rows of activations; more: V expanded into a scratch
           buffer and a dense GEMM), so smaller and faster than dense at once. A quantized V's
           values may stay codes here (`Vq_codes`, `Vq_scales`, `Vq_zeros`: ops.QuantValues,
           dequantized inside the kernels; runtime/quantized.pack_values)
`pack()` freezes a tuned layer into compact form; runtime.py converts between forms and to
`merged` (plain nn.Linear layers holding W = U V_i).
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from layershare.adapters.base import IN
from layershare.modules.bits import pack_bits, unpack_bits  # noqa: F401 (also imported from here)


def _sparse_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """A CSR tensor with int32 indices, without PyTorch's "beta"/"invariant checks" warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow.to(torch.int32), col.to(torch.int32), values, size=size)




_ops = None  # runtime.kernels.ops once a held basis or a kernel-form layer first runs


def _load_ops():
    global _ops
    from layershare.runtime.kernels import ops

    _ops = ops
    return ops


class SharedBasis(nn.Module):
    """The basis U (d x r) one group of blocks shares; registered once per group.

    At run time a quantized U whose users all run the native kernels may be held as its codes
    instead (`hold_codes`: ops.QuantValues of U's stored orientation, kept whole: ops.all_kept):
    `project` and `unproject` then run the bitmask kernels, and `U` is rebuilt on access."""

    CODE_BUFFERS = ("Uq_codes", "Uq_scales", "Uq_zeros", "Uq_mask", "Uq_offsets")

    def __init__(self, U: torch.Tensor):
        super().__init__()
        self.U = nn.Parameter(U)
        self._z = None  # (weakref to x, versions, z) of the last projection
        self._fast = None  # (U16, Uq_codes, the two decoding products): _times
        self.projections = 0  # how many x @ U products were computed (tests count them)
        self.fake_quant = None  # a quant.QuantSpec while tuning with quantization-aware training
        self.fake_quant_input_first = True  # U's groups along d (shared with layers of role "in"), else along r

    NARROW_BUFFERS = ("U16", "U16_mask", "U16_offsets")

    @property
    def U(self) -> torch.Tensor:
        """The basis (d x r): the parameter, or, while held as codes or at 16 bits, rebuilt from them (float32)."""
        p = self._parameters.get("U")
        if p is not None:
            return p
        if "U16" in self._buffers:
            return self.U16.float()
        if "Uq_codes" in self._buffers:
            M = self._coded_matrix()
            return M.t() if self._uq[1] else M
        raise AttributeError("U")

    # ---- held as codes (the kernel form at run time) --------------------------------------------
    @property
    def held(self) -> bool:
        """U held for the kernels (as codes, or at 16 bits), not as a parameter."""
        return "U" not in self._parameters and ("Uq_codes" in self._buffers or "U16" in self._buffers)

    def _codes(self):
        from layershare.runtime.kernels.ops import QuantValues

        return QuantValues(self.Uq_codes, self.Uq_scales, self.Uq_zeros, *self._uq[0])

    def _coded_matrix(self) -> torch.Tensor:
        shape = tuple(self._uq[2])
        dense = self._codes().dequantize()
        return dense.view(shape)

    def stage_codes(self, qv, transposed: bool) -> None:
        """Keep U's codes (an ops.QuantValues of U^T when `transposed`, else of U, in row-major
        order) beside the float U until the run-time form is chosen: `hold_codes` or `drop_staged`."""
        self._uq_staged = (qv, transposed)

    def drop_staged(self) -> None:
        self.__dict__.pop("_uq_staged", None)

    def hold_codes(self) -> bool:
        """Replace the float U by its staged codes (True), if any were staged."""
        staged = self.__dict__.pop("_uq_staged", None)
        if staged is None:
            return False
        self._fast = None
        from layershare.runtime.kernels import ops

        qv, transposed = staged
        d, r = self._parameters["U"].shape
        shape = (r, d) if transposed else (d, r)
        for k, t in zip(self.CODE_BUFFERS, (qv.codes, qv.scales, qv.zeros, *ops.all_kept(shape))):
            self.register_buffer(k, t, persistent=False)
        self._uq = ((qv.bits, qv.group, qv.n), transposed, shape)
        del self._parameters["U"]
        self._z = None
        return True

    def hold_narrow(self, stored: torch.dtype | None) -> bool:
        """Hold a float32 U at the 16-bit `stored` dtype (a 16-bit file loaded in float32) for the
        kernels, which widen it as they read it (kept whole, ops.all_kept: the same float32 products,
        half the bytes), if every value round-trips exactly (True); else leave it (False). A U
        that is 16-bit already (a model loaded in bfloat16/float16) is held as it is (True): at a
        few rows the kernels' product is faster than PyTorch's 16-bit GEMV (runtime/narrow.py)."""
        p = self._parameters.get("U")
        if p is None or p.device.type != "cpu":
            return False
        if p.dtype in (torch.bfloat16, torch.float16):
            narrow = p.detach()
        elif p.dtype != torch.float32 or stored not in (torch.bfloat16, torch.float16):
            return False
        else:
            narrow = p.detach().to(stored)
            if not torch.equal(narrow.float(), p.detach()):
                return False
        from layershare.runtime.kernels import ops

        for k, t in zip(self.NARROW_BUFFERS, (narrow.contiguous(), *ops.all_kept(tuple(p.shape)))):
            self.register_buffer(k, t, persistent=False)
        del self._parameters["U"]
        self._z = self._fast = None
        return True

    def _times(self, x: torch.Tensor, transpose_u: bool) -> torch.Tensor:
        """x @ U (or x @ U^T) from U held at 16 bits or as codes, by the bitmask kernels."""
        ops = _ops or _load_ops()  # (not an import statement: this runs ~100 times a token)

        b = self._buffers
        # decoding: the two products made once (ops.decode_fn), remade when U's tensors change
        held = b.get("U16"), b.get("Uq_codes")
        fast = self._fast
        if fast is None or fast[0] is not held[0] or fast[1] is not held[1]:
            fast = (*held, *self._decode_fns())
            if ops._loaded is True:
                self._fast = fast
        x2 = ops.decode_rows(x) if fast[2 + transpose_u] is not None else None
        if x2 is not None:
            op, args = fast[2 + transpose_u]
            return op(x2, *args).view(*x.shape[:-1], -1)
        if "U16" in b:  # U (d x r) as the kernels' V
            U16 = b["U16"]
            if ops.dense_16bit(x.reshape(-1, x.shape[-1]), U16):  # a 16-bit model's prompt: PyTorch's GEMM
                return x @ (U16.t() if transpose_u else U16)
            M = (U16.view(-1), b["U16_mask"], b["U16_offsets"])
            return ops.out_product(x, *M) if transpose_u else ops.in_product(x, *M, U16.shape[1])
        M = (self._codes(), self.Uq_mask, self.Uq_offsets)
        transposed, shape = self._uq[1], self._uq[2]
        if transposed != transpose_u:  # x @ M^T
            return ops.out_product(x, *M)
        return ops.in_product(x, *M, shape[1])  # x @ M

    def _decode_fns(self) -> tuple:
        """(x @ U, x @ U^T) as ops.decode_fn products of U as held (16-bit or codes)."""
        ops = _ops or _load_ops()
        b = self._buffers
        if "U16" in b:
            M = (b["U16"].view(-1), b["U16_mask"], b["U16_offsets"])
            return ops.decode_fn(*M, b["U16"].shape[1]), ops.decode_fn(*M, None)
        M = (self._codes(), self.Uq_mask, self.Uq_offsets)
        transposed, shape = self._uq[1], self._uq[2]
        # x @ M^T where M's orientation differs from the product's, else x @ M
        return (ops.decode_fn(*M, None) if transposed else ops.decode_fn(*M, shape[1]),
                ops.decode_fn(*M, shape[1]) if transposed else ops.decode_fn(*M, None))

    def effective_U(self) -> torch.Tensor:
        """U as the forward uses it: while QAT is on, fake-quantized on the grid the quantization
        stage will store (quant/model.py: along d when a layer of role "in" shares it)."""
        if self.fake_quant is None:
            return self.U
        from layershare.quant.grid import fake_quantize

        if self.fake_quant_input_first:
            return fake_quantize(self.U.t(), self.fake_quant).t()
        return fake_quantize(self.U, self.fake_quant)

    @property
    def rank(self) -> int:
        if "U16" in self._buffers:
            return self.U16.shape[1]
        return self._uq[2][0 if self._uq[1] else 1] if self.held else self.U.shape[1]

    HOLD_ROWS = 8  # a projection of more rows than this is cached only while its input lives

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """z = x @ U, computed once for the layers that read the same x (up and gate): the last
        result is reused while x is the same tensor, unchanged, and U unchanged."""
        # inference tensors keep no version counter (and cannot change outside inference mode);
        # a held U (no parameter) does not change. (Read without properties: a decoding token
        # projects 30 times, and each attribute lookup through nn.Module costs.)
        p = self._parameters.get("U")
        key = (-1 if x.is_inference() else x._version, -1 if p is None else p._version,
               torch.is_grad_enabled(), self.fake_quant)
        cached = self._z
        if cached is not None and cached[0]() is x and cached[1] == key:
            return cached[2]
        z = self._times(x, False) if p is None else x @ self.effective_U().to(x.dtype)
        self.projections += 1
        self._z = entry = (weakref.ref(x), key, z)
        if z.numel() > self.HOLD_ROWS * z.shape[-1] and not torch.compiler.is_compiling():
            # a prompt's z lives no longer than its x: kept until the next call, each basis held
            # its last prompt's z after the forward (SmolLM2 in bfloat16, 15 bases: 35 MiB after
            # a 2048-token prompt). A decoding step's few rows stay cached (no finalizer's cost).
            # (With grad, z's graph holds x itself, as training needs: kept until the next call.)
            weakref.finalize(x, self._drop, entry)
        return z

    def _drop(self, entry) -> None:
        if self._z is entry:
            self._z = None

    def unproject(self, z: torch.Tensor) -> torch.Tensor:
        """z @ U^T (the out-layers' last product)."""
        return self._times(z, True) if self.held else z @ self.effective_U().to(z.dtype).t()

    def forget(self) -> None:
        self._z = None

    def _apply(self, fn, recurse=True):
        self._z = self._fast = None
        return super()._apply(fn, recurse)

    def __getstate__(self):  # deepcopy/pickle: a weakref cannot be copied (nor need the products be)
        state = dict(super().__getstate__())
        state["_z"] = state["_fast"] = None
        return state


FORMS = ("train", "compact", "factored", "csr", "kernel")


class SharedBasisLinear(nn.Module):
    def __init__(self, basis: SharedBasis, V: torch.Tensor, role: str, bias: torch.Tensor | None = None,
                 sparse: bool = False):
        super().__init__()
        # a plain attribute, not a submodule: the basis is owned (and saved) once, by the group
        object.__setattr__(self, "basis", basis)
        self.role = role
        r, h = V.shape
        d = basis.U.shape[0]
        self.in_features, self.out_features = (d, h) if role == IN else (h, d)
        self._v_shape = (r, h)
        self.V = nn.Parameter(V)
        self.register_buffer("mask", None, persistent=False)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.sparse = sparse  # stored as nonzeros + bitmask (a pruned V) or dense
        self.form = "train"
        self.fake_quant = None  # a quant.QuantSpec while tuning with quantization-aware training
        self._fast = None  # the kernel form's decoding product and the tensors it was made of

    def __getstate__(self):  # deepcopy/pickle: the decoding product is remade from the buffers
        state = dict(super().__getstate__())
        state["_fast"] = None
        return state

    @property
    def packed(self) -> bool:
        """Frozen with only V's nonzeros held (compact, CSR or kernel)."""
        return self.form in ("compact", "csr", "kernel")

    @property
    def v_shape(self) -> tuple[int, int]:
        return self._v_shape

    # ---- forward --------------------------------------------------------------------
    def masked_V(self) -> torch.Tensor:
        return self.V if self.mask is None else self.V * self.mask

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero V outside its mask (after an optimiser step moved pruned entries)."""
        if self.mask is not None:
            self.V.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "kernel":
            return self._kernel_forward(x)
        if self.form == "csr":
            return self._csr_forward(x)
        V = self.V if self.form in ("train", "factored") else self._rebuild_V()
        if self.fake_quant is not None and self.form == "train":
            V = self._fake_quantized(V)
        V = V.to(x.dtype)
        if self.role == IN:
            y = self.basis.project(x) @ V
        else:
            y = (x @ V.t()) @ self.basis.effective_U().to(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _fake_quantized(self, V: torch.Tensor) -> torch.Tensor:
        """V on the grid the quantization stage will store: a sparse V's nonzero values in their
        stored (row-major) order, a dense V along its input axis (straight-through gradients)."""
        from layershare.quant.grid import fake_quantize

        if self.sparse or self.mask is not None:
            keep = self.mask if self.mask is not None else V != 0
            return torch.zeros_like(V).masked_scatter(keep, fake_quantize(V.masked_select(keep), self.fake_quant))
        return fake_quantize(V.t(), self.fake_quant).t() if self.role == IN else fake_quantize(V, self.fake_quant)

    # not f"{attr}_q{suffix}" (quant/model.py's names for a file's codes: a dense V's are "V_qcodes")
    QUANT_BUFFERS = ("Vq_codes", "Vq_scales", "Vq_zeros")

    def stored_values(self):
        """A sparse compact/kernel layer's kept values: the `V_values` tensor, or an ops.QuantValues
        when they are held as codes (set_quant_values). (Read from _buffers, not through nn.Module's
        attribute lookup: the kernel form asks for them some 90 times a decoded token.)"""
        values = self._buffers.get("V_values")
        if values is not None:
            return values
        if not hasattr(self, "_vq"):
            return self.V_values
        from layershare.runtime.kernels.ops import QuantValues

        return QuantValues(*(self._buffers[k] for k in self.QUANT_BUFFERS), *self._vq)

    def set_quant_values(self, qv) -> None:
        """Hold the kept values as codes (an ops.QuantValues) instead of `V_values` (kernel or
        compact form; the buffers are not saved: such a model runs, it is not saved again)."""
        if not self.sparse or self.form not in ("compact", "kernel"):
            raise ValueError("only a sparse V in the compact or kernel form holds its values as codes")
        kept = int(unpack_bits(self.V_mask, self.v_shape).sum())
        if qv.n != kept:
            raise ValueError(f"{qv.n} codes for the {kept} entries V's bitmask keeps")
        self._buffers.pop("V_values", None)
        self._fast = None
        for k, t in zip(self.QUANT_BUFFERS, (qv.codes, qv.scales, qv.zeros)):
            self.register_buffer(k, t, persistent=False)
        self._vq = (qv.bits, qv.group, qv.n)

    def _rebuild_V(self) -> torch.Tensor:
        if not self.sparse:
            return self.V
        values = self.stored_values()
        values = values if isinstance(values, torch.Tensor) else values.dequantize()
        V = values.new_zeros(self.v_shape)
        return V.masked_scatter_(unpack_bits(self.V_mask, self.v_shape), values)  # 2x index_put's speed

    def _csr_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.role == IN:
            z = self.basis.project(x2)  # (N, r)
            y = (self.V_csr @ z.t().to(self.V_csr.dtype)).t()  # (N, h)
        else:
            z = (self.V_csr @ x2.t().to(self.V_csr.dtype)).t()  # (N, r)
            y = z @ self.basis.effective_U().t()
        y = y.to(x.dtype).reshape(*lead, -1)
        return y if self.bias is None else y + self.bias

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _ops or _load_ops()  # (not an import statement: this runs ~100 times a token)

        b = self._buffers  # read directly: this runs some 90 times a decoded token
        # decoding: V's product made once (ops.decode_fn) and kept in a plain attribute with the
        # tensors it was made of, remade when any of them is another tensor
        values, codes, mask = b.get("V_values"), b.get("Vq_codes"), b.get("V_mask")
        fast = self._fast
        if fast is None or fast[0] is not values or fast[1] is not codes or fast[2] is not mask:
            prod = ops.decode_fn(self.stored_values(), mask, b["V_offsets"],
                                 self._v_shape[1] if self.role == IN else None)
            fast = self._fast = (values, codes, mask, prod) if prod is not None else None
        if fast is not None:
            op, args = fast[3]
            if self.role == IN:
                z = self.basis.project(x)
                z2 = ops.decode_rows(z)
                if z2 is not None:
                    y = op(z2, *args).view(*x.shape[:-1], self.out_features)
                    return y if self.bias is None else y + self.bias.to(x.dtype)
            else:
                x2 = ops.decode_rows(x)
                if x2 is not None:
                    y = self.basis.unproject(op(x2, *args)).view(*x.shape[:-1], self.out_features)
                    return y if self.bias is None else y + self.bias.to(x.dtype)
        packed = (self.stored_values(), b["V_mask"], b["V_offsets"])
        if self.role == IN:
            y = ops.in_product(self.basis.project(x), *packed, self._v_shape[1])
        else:
            y = self.basis.unproject(ops.out_product(x, *packed))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    # ---- forms ----------------------------------------------------------------------
    def dense_V(self) -> torch.Tensor:
        """V as a dense (r x h) matrix, zeros included."""
        if self.form == "train":
            return self.masked_V().detach()
        if self.form == "factored":
            return self.V.detach()
        if self.form == "csr":
            dense = self.V_csr.to_dense()
            return dense.t() if self.role == IN else dense
        return self._rebuild_V().detach()

    def _clear(self) -> None:
        self.__dict__.pop("_vq", None)
        for name in ("V", "V_values", "V_mask", "V_offsets", "mask", *self.QUANT_BUFFERS):
            if name in self._parameters:
                del self._parameters[name]
            if name in self._buffers:
                del self._buffers[name]
        self.__dict__.pop("V_csr", None)
        self.__dict__.pop("V", None)

    def _pattern(self, V: torch.Tensor) -> torch.Tensor | None:
        """Where a sparse V keeps entries: its bitmask or training mask where it has one (a kept
        value may be exactly zero, e.g. quantized to zero), else its nonzeros."""
        if not self.sparse:
            return None
        if self.form in ("compact", "kernel"):
            return unpack_bits(self.V_mask, self.v_shape)
        if self.form == "train" and self.mask is not None:
            return self.mask
        return V != 0

    @torch.no_grad()
    def to_form(self, form: str) -> "SharedBasisLinear":
        """Hold V in `form` (see the module docstring); the function computed is unchanged."""
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r} (known: {', '.join(FORMS)})")
        if form == "kernel" and not self.sparse:
            raise ValueError("the kernel form holds a sparse V (nonzeros + bitmask); this layer's V is dense")
        if form == self.form:
            return self
        self._fast = None  # (nor keep the tensors it held)
        if {form, self.form} == {"compact", "kernel"}:  # the same stored tensors: add or drop the index
            if form == "kernel":
                self._set_offsets()
            else:
                del self._buffers["V_offsets"]
            self.form = form
            return self
        V = self.dense_V()
        keep = self._pattern(V)
        self._clear()
        if form in ("train", "factored"):
            self.V = nn.Parameter(V, requires_grad=form == "train")
            if form == "train":
                self.register_buffer("mask", keep if self.sparse else None, persistent=False)
        elif form in ("compact", "kernel") and self.sparse:
            self.register_buffer("V_values", V[keep].contiguous())
            self.register_buffer("V_mask", pack_bits(keep))
            if form == "kernel":
                self._set_offsets()
        elif form == "compact":
            self.V = nn.Parameter(V, requires_grad=False)
        else:  # csr: oriented for the forward
            self._set_csr(V)
        if form != "train":
            self.register_buffer("mask", None, persistent=False)
        self.form = form
        return self

    def pack(self) -> None:
        """Freeze a tuned layer into its stored form: V's nonzeros + bitmask, or a dense V."""
        self.to_form("compact")

    def unpack(self) -> None:
        """Back to a dense V (zeros included): the same function, computed with dense matmuls."""
        self.to_form("factored")

    def _set_offsets(self) -> None:
        """The kernels' index of where each row's values start (computed from the mask, not saved)."""
        from layershare.runtime.kernels import ops

        per = 1 if self.V_mask.device.type == "cuda" else ops.INDEX_PER  # the Triton kernels read every block's
        self.register_buffer("V_offsets", ops.prepare(self.V_mask, self.v_shape, per), persistent=False)

    def _set_csr(self, V: torch.Tensor) -> None:
        dense = V.t() if self.role == IN else V  # IN: (h x r) @ z^T ; OUT: (r x h) @ x^T
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            csr = dense.contiguous().to_sparse_csr()
        self.V_csr = _sparse_csr(csr.crow_indices(), csr.col_indices(), csr.values(), csr.shape)

    @classmethod
    def empty(cls, basis: SharedBasis, v_shape: tuple[int, int], role: str, bias: bool,
              sparse: bool) -> "SharedBasisLinear":
        """A compact layer on the meta device (no memory), waiting for `load_state_dict(assign=True)`."""
        d = basis.U.shape[0]
        out = v_shape[1] if role == IN else d
        meta = dict(device="meta", dtype=basis.U.dtype)
        layer = cls(basis, torch.empty(v_shape, **meta), role, torch.empty(out, **meta) if bias else None,
                    sparse=sparse)
        layer._clear()
        if sparse:
            layer.register_buffer("V_values", torch.empty(0, **meta))
            layer.register_buffer("V_mask", torch.empty(0, device="meta", dtype=torch.uint8))
        else:
            layer.V = nn.Parameter(torch.empty(v_shape, **meta), requires_grad=False)
        layer.form = "compact"
        return layer.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.form == "csr":  # a CSR tensor is no parameter or buffer: move/cast it by hand
            self.V_csr = fn(self.V_csr)
        return self

    # ---- state dict: a sparse V is saved as its nonzero values + a bitmask -------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.sparse and self.form not in ("compact", "kernel"):
            destination.pop(prefix + "V", None)
            V = self.dense_V()
            keep = V != 0
            destination[prefix + "V_values"] = V[keep]
            destination[prefix + "V_mask"] = pack_bits(keep)
        elif not self.sparse and self.form == "csr":
            destination[prefix + "V"] = self.dense_V()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = (prefix + "V_values", prefix + "V_mask")
        # sizes known only from the file: assign as they are (a quantized V's values come as packed buffers)
        if self.sparse and self.form in ("compact", "kernel") and "V_values" in self._buffers:
            missing = [k for k in keys if k not in state_dict]
            if missing:
                missing_keys.extend(missing)
                return
            values, bits = state_dict[keys[0]], state_dict[keys[1]]
            n = self.v_shape[0] * self.v_shape[1]
            ones = int(unpack_bits(bits, self.v_shape).sum()) if bits.numel() == (n + 7) // 8 else None
            if ones is None:
                error_msgs.append(f"{prefix}V_mask: {bits.numel()} bytes, expected {(n + 7) // 8} for V of "
                                  f"shape {self.v_shape}")
            elif ones != values.numel():
                error_msgs.append(f"{prefix}: bitmask has {ones} ones but {values.numel()} values")
            else:
                self._buffers["V_values"] = values
                self._buffers["V_mask"] = bits.to(torch.uint8)
                if self.form == "kernel":
                    self._set_offsets()
            rest = {k: v for k, v in state_dict.items() if k not in keys}
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            for k in keys:  # the parent did not see them: they were consumed above
                if k in missing_keys:
                    missing_keys.remove(k)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def nnz(self) -> int:
        if self.form in ("compact", "kernel") and self.sparse:
            return int(self.V_values.numel()) if "V_values" in self._buffers else self._vq[2]
        if self.form == "csr":
            return int(self.V_csr.values().numel())
        return int((self.dense_V() != 0).sum()) if self.sparse else self.v_shape[0] * self.v_shape[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, role={self.role}, "
                f"rank={self.basis.rank}, nnz={self.nnz()}, form={self.form}")


def unpack_all(model: nn.Module) -> int:
    """Every compact or CSR layer of `model` to the factored form (dense V, zeros in place).
    Returns how many layers changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, SharedBasisLinear) and m.packed:
            m.unpack()
            n += 1
    return n
