"""The native sparse-V kernels (runtime/kernels) against dense products, their fallback, and the
"kernel" form of SharedBasisLinear (runtime="sparse")."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.modules.shared_basis import SharedBasisLinear, pack_bits
from layershare.runtime import kernels
from layershare.runtime.forms import forms, narrow_values, resident_bytes
from layershare.runtime.kernels import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 33, 65, 100]
ROWS = [*range(1, 9), 37]

native = pytest.mark.skipif(not kernels.available(), reason="native kernel not loaded (not built, or "
                            "LAYERSHARE_NO_KERNEL set): build it with `python -m layershare.runtime.kernels.build`")


def sparse_v(r, h, dtype=torch.float32, density=0.5, seed=0, keep=None):
    """(values, mask, offsets, dense float64 V of the values as stored)."""
    g = torch.Generator().manual_seed(seed)
    if keep is None:
        keep = torch.rand(r, h, generator=g) < density
    dense = (torch.randn(r, h, generator=g) * keep).to(dtype)
    values, mask = dense[keep].contiguous(), pack_bits(keep)
    return values, mask, ops.prepare(mask, (r, h)), dense.double()


def check_products(values, mask, offsets, dense, rows=ROWS, raw=False):
    """in/out products (the wrappers, or the raw ops for every N) against float64 dense ones."""
    r, h = dense.shape
    g = torch.Generator().manual_seed(1)
    for n in rows:
        z, x = torch.randn(n, r, generator=g), torch.randn(n, h, generator=g)
        if raw:
            y = torch.ops.layershare.bitmask_in(z, values, mask, offsets, h)
            o = torch.ops.layershare.bitmask_out(x, values, mask, offsets)
        else:
            y, o = ops.in_product(z, values, mask, offsets, h), ops.out_product(x, values, mask, offsets)
        assert y.shape == (n, h) and o.shape == (n, r)
        torch.testing.assert_close(y.double(), z.double() @ dense, rtol=1e-5, atol=1e-5 * r ** 0.5, msg=f"in {n}")
        torch.testing.assert_close(o.double(), x.double() @ dense.t(), rtol=1e-5, atol=1e-5 * h ** 0.5,
                                   msg=f"out {n}")


@pytest.fixture
def isa():
    """Switch the native path (set_isa) within a test; the best path again afterwards."""
    yield ops.set_isa
    ops.set_isa("best")
    ops.set_spread("best")


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", SIZES)
def test_products_match_dense(r, dtype):
    for h in SIZES:
        v = sparse_v(r, h, dtype, seed=r * 1000 + h)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            check_products(*v)  # N <= 8: sparse kernels; N = 37: expanded V + GEMM
            check_products(*v, rows=[37], raw=True)  # the sparse kernels take any N (8 rows at a time)
    torch.set_num_threads(2)


@native
def test_in_product_split_by_rows_over_threads_matches_dense():
    """The in-product gives each thread a stretch of V's rows and adds their partial sums: V large
    enough for 2..4 tasks, any row count (more than 8: several passes), every value dtype."""
    for dtype in DTYPES:
        v = sparse_v(300, 700, dtype, seed=3)
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            check_products(*v, rows=[1, 5, 8, 11], raw=True)
    torch.set_num_threads(2)


@native
def test_the_decoding_fast_path_takes_only_what_it_may():
    """float32/bfloat16/float16 rows up to DECODE_ROWS, contiguous, no grad, 16/32-bit values:
    straight to the op (the same op as the general path, so the same numbers); anything else goes
    the checked way."""
    values, mask, offsets, dense = sparse_v(20, 70, torch.bfloat16)
    x = torch.randn(3, 70)
    assert ops._decoding(x, values) and ops._decoding(x.bfloat16(), values) and ops._decoding(x.half(), values)
    assert not ops._decoding(x.double(), values)
    assert not ops._decoding(torch.randn(ops.DECODE_ROWS + 1, 70), values)
    assert not ops._decoding(torch.randn(70, 3).t(), values) and not ops._decoding(x.requires_grad_(), values)
    assert not ops._decoding(x.detach(), values.double())
    assert torch.equal(ops.out_product(x.detach(), values, mask, offsets),
                       torch.ops.layershare.bitmask_out(x.detach(), values, mask, offsets))
    y = ops.out_product(x, values, mask, offsets)  # requires grad: the reference, differentiable
    y.sum().backward()
    torch.testing.assert_close(x.grad, dense.float().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_16bit_activations_are_the_float32_product_rounded(act):
    """The ops widen 16-bit activations inside (no conversion ops around them): the result is the
    float32 product of the widened rows, rounded to the activations' dtype, bit for bit; the
    prompt path (more than DECODE_ROWS rows) agrees to the dtype's rounding."""
    for dtype in DTYPES:
        values, mask, offsets, dense = sparse_v(37, 150, dtype)
        for rows in (1, 3, 8):
            z, x = torch.randn(rows, 37).to(act), torch.randn(rows, 150).to(act)
            y_in, y_out = ops.in_product(z, values, mask, offsets, 150), ops.out_product(x, values, mask, offsets)
            assert y_in.dtype == act and y_out.dtype == act
            assert torch.equal(y_in, ops.in_product(z.float(), values, mask, offsets, 150).to(act))
            assert torch.equal(y_out, ops.out_product(x.float(), values, mask, offsets).to(act))
        z, x = torch.randn(ops.DECODE_ROWS + 3, 37).to(act), torch.randn(ops.DECODE_ROWS + 3, 150).to(act)
        ref = dense.float()  # sums of up to 150 terms of about 1: a 16-bit result is within ~0.05
        torch.testing.assert_close(ops.in_product(z, values, mask, offsets, 150).float(), z.float() @ ref,
                                   rtol=2e-2, atol=1e-1)
        torch.testing.assert_close(ops.out_product(x, values, mask, offsets).float(), x.float() @ ref.t(),
                                   rtol=2e-2, atol=1e-1)


@native
@pytest.mark.parametrize("path", ["best", "avx2", "portable"])
def test_a_matrix_kept_whole_needs_no_mask_and_computes_as_an_all_ones_one(isa, path):
    """all_kept's form (an empty mask, offsets of shape (r, 0)) reads every entry in row-major order:
    the same products and expansion, bit for bit, as the same values under an explicit all-ones
    bitmask, on every path, for float and code values; a wrong value count is refused."""
    if isa(path) != path and path != "best":
        pytest.skip(f"this CPU has no {path} path")
    g = torch.Generator().manual_seed(7)
    for r, h in [(33, 100), (65, 7), (7, 130), (1, 1), (3, 64)]:
        keep = torch.ones(r, h, dtype=torch.bool)
        mask, offsets = ops.all_kept((r, h))
        assert mask.numel() == 0 and tuple(offsets.shape) == (r, 0)
        ones, ones_off = pack_bits(keep), ops.prepare(pack_bits(keep), (r, h))
        for dtype in DTYPES:
            values = torch.randn(r * h, generator=g).to(dtype)
            for n in (1, 3, 8, 11):
                z, x = torch.randn(n, r, generator=g), torch.randn(n, h, generator=g)
                assert torch.equal(ops.in_product(z, values, mask, offsets, h),
                                   ops.in_product(z, values, ones, ones_off, h))
                assert torch.equal(ops.out_product(x, values, mask, offsets), ops.out_product(x, values, ones, ones_off))
            assert torch.equal(ops.expand(values, mask, offsets, torch.empty(r, h)), values.float().view(r, h))
            assert torch.equal(ops.reference_dense(values, mask, (r, h)), values.view(r, h))
        q = torch.randint(0, 16, (r * h,), generator=g, dtype=torch.uint8)
        qv = ops.QuantValues.from_codes(q, torch.rand(-(-r * h // 16), generator=g).half(), None, 4, 16)
        z = torch.randn(2, r, generator=g)
        assert torch.equal(ops.in_product(z, qv, mask, offsets, h), ops.in_product(z, qv, ones, ones_off, h))
        torch.testing.assert_close(ops.in_product(z, qv, mask, offsets, h), z @ qv.dequantize().view(r, h),
                                   rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"kept whole needs 12 values, got 11"):
        torch.ops.layershare.bitmask_out(torch.randn(1, 4), torch.randn(11), *ops.all_kept((3, 4)))


@native
@pytest.mark.parametrize("pattern", ["zeros", "ones", "empty rows", "sparse", "dense"])
def test_masks(pattern):
    for r, h in [(33, 100), (65, 7), (7, 130), (1, 1)]:
        g = torch.Generator().manual_seed(r + h)
        keep = {"zeros": torch.zeros(r, h, dtype=torch.bool), "ones": torch.ones(r, h, dtype=torch.bool),
                "empty rows": (torch.rand(r, h, generator=g) < 0.5) & (torch.arange(r) % 3 != 1)[:, None],
                "sparse": torch.rand(r, h, generator=g) < 0.05,
                "dense": torch.rand(r, h, generator=g) < 0.95}[pattern]
        for dtype in DTYPES:
            check_products(*sparse_v(r, h, dtype, keep=keep))


@native
@pytest.mark.parametrize("path,spread", [("avx2", None), ("avx512", "permute"), ("avx512", "expand"),
                                         ("avx512", "expand16")])
def test_vector_paths_equal_the_portable_one(isa, path, spread):
    best = isa("best")
    if path == "avx512" and best != "avx512" or isa(path if path == "avx2" else "best") != path:
        pytest.skip(f"this CPU has no {path} path (its best: {best})")
    if spread and ops.set_spread(spread) != spread:
        pytest.skip(f"this CPU has no {spread} spread (no AVX-512 VBMI2)")
    g = torch.Generator().manual_seed(1)
    full = torch.rand(40, 300, generator=g) < 0.5  # whole 64-column blocks kept in some rows (loaded unspread)
    full[::3] = True
    full[1, 64:128] = True
    cases = [sparse_v(r, h, dtype, seed=r + h) for r, h in [(33, 100), (65, 65), (100, 7), (5, 200)] for dtype in DTYPES]
    cases += [sparse_v(40, 300, dtype, keep=full) for dtype in DTYPES]
    g = torch.Generator().manual_seed(2)
    for values, mask, offsets, dense in cases:
        r, h = dense.shape
        for n in (1, 3, 8, 11):
            z, x = torch.randn(n, r, generator=g), torch.randn(n, h, generator=g)
            got = {}
            for use in (path, "portable"):
                assert isa("best" if use == "avx512" else use) == use
                got[use] = (torch.ops.layershare.bitmask_in(z, values, mask, offsets, h),
                            torch.ops.layershare.bitmask_out(x, values, mask, offsets),
                            ops.expand(values, mask, offsets, torch.empty(r, h)))
            for a, b in zip(got[path][:2], got["portable"][:2]):  # float32 sums in another order
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert torch.equal(got[path][2], got["portable"][2])
    ops.set_spread("best")


@native
def test_spreads_are_bit_identical_and_the_choice_is_checked(isa):
    """The spreads move the same values to the same lanes: equal in-products, not just close (expand16
    keeps each column's sums in the same order); equal out-products from expand and permute (expand16's
    are summed in other lanes up to 4 rows: close; at more rows it runs expand's)."""
    if isa("best") != "avx512":
        pytest.skip("no AVX-512 path on this CPU")
    values, mask, offsets, dense = sparse_v(70, 333, torch.bfloat16, seed=5)
    got = {}
    uses = ("permute", "expand", "expand16")
    for n in (1, 3, 8):
        z, x = torch.randn(n, 70), torch.randn(n, 333)
        for use in uses:
            got[use] = (ops.set_spread(use), torch.ops.layershare.bitmask_in(z, values, mask, offsets, 333),
                        torch.ops.layershare.bitmask_out(x, values, mask, offsets))
        assert torch.equal(got["permute"][1], got["expand"][1]) and torch.equal(got["permute"][2], got["expand"][2])
        assert torch.equal(got["expand16"][1], got["expand"][1])
        if got["expand16"][0] == "expand16" and n <= 4:
            torch.testing.assert_close(got["expand16"][2], got["expand"][2], rtol=1e-5, atol=1e-5)
        else:  # no VBMI2 (expand16 runs expand), or more than 4 rows
            assert torch.equal(got["expand16"][2], got["expand"][2])
    with pytest.raises(RuntimeError, match="use must be 'expand16', 'expand', 'permute' or 'best', got 'gather'"):
        ops.set_spread("gather")
    assert ops.set_spread("best") in uses


@native
def test_expand_is_exact_and_checks_its_inputs():
    values, mask, offsets, dense = sparse_v(33, 100, torch.bfloat16)
    assert torch.equal(ops.expand(values, mask, offsets, torch.empty(33, 100)), dense.float())
    with pytest.raises(RuntimeError, match=r"mask has 413 bytes, expected 417 for V of shape \(33, 101\)"):
        ops.expand(values, mask, offsets, torch.empty(33, 101))
    shapes = r"of shape \(33, 2\) or \(33, 1\)"  # an offset per block, or per 4 blocks
    with pytest.raises(RuntimeError, match="offsets must be a contiguous int32 tensor " + shapes):
        torch.ops.layershare.bitmask_out(torch.randn(2, 100), values, mask, offsets.repeat(1, 3))
    with pytest.raises(RuntimeError, match="values must be float32, bfloat16 or float16"):
        torch.ops.layershare.bitmask_out(torch.randn(2, 100), values.double(), mask, offsets)
    with pytest.raises(RuntimeError, match="z must be a contiguous 2-D float32"):
        torch.ops.layershare.bitmask_in(torch.randn(2, 33).t(), values, mask, offsets, 100)
    with pytest.raises(RuntimeError, match="out must be a contiguous 2-D float32, bfloat16 or float16 CPU tensor"):
        ops.expand(values, mask, offsets, torch.empty(33, 100, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out must be a contiguous 2-D float32"):
        ops.expand(values, mask, offsets, torch.empty(100, 33, dtype=torch.bfloat16).t())


@native
@pytest.mark.parametrize("path", ["best", "avx2", "portable"])
@pytest.mark.parametrize("threads", [1, 2])
def test_expanding_into_16_bits_is_the_float32_expansion_rounded(isa, path, threads):
    """V expanded straight into bfloat16 or float16 (a prompt's 16-bit GEMM, with no float32 V held)
    is the float32 expansion rounded as Tensor.to rounds, bit for bit: values that round (float32),
    ties, the largest finite float32 (to infinity), infinities, subnormals; shapes past the op's
    8-row chunks and not multiples of 8 or 64; NaN stays NaN."""
    if isa(path) != path and path != "best":
        pytest.skip(f"this CPU has no {path} path")
    torch.set_num_threads(threads)
    try:
        for r, h, dtype in [(33, 100, torch.float32), (70, 333, torch.float32), (17, 64, torch.bfloat16),
                            (9, 1000, torch.float16), (1, 7, torch.float32)]:
            values, mask, offsets, _ = sparse_v(r, h, dtype, seed=r + h)
            if dtype == torch.float32:  # specials among the values
                special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4028235e38, float("inf"),
                                        -float("inf"), 1e-40, -1e-45, float("nan"), 0.0, -0.0])
                values[: special.numel()] = special[: values.numel()]
            full = ops.expand(values, mask, offsets, torch.empty(r, h))
            for out in (torch.bfloat16, torch.float16):
                got = ops.expand(values, mask, offsets, torch.full((r, h), 7, dtype=out))
                want = full.to(out)
                nan = want.isnan()
                assert torch.equal(got.isnan(), nan), (r, h, dtype, out)
                assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), (r, h, dtype, out)
    finally:
        torch.set_num_threads(2)


@native
@pytest.mark.parametrize("h", [64, 65, 256, 300, 1000])
def test_an_offset_per_four_blocks_gives_what_one_per_block_does(h):
    """The default index keeps every 4th block's offset and counts the mask bits of the blocks
    between; tasks that start between two offsets (1 and 2 threads, any row count) see the same V."""
    values, mask, _, dense = sparse_v(37, h, torch.bfloat16, seed=h)
    full, coarse = ops.prepare(mask, (37, h), per=1), ops.prepare(mask, (37, h))
    nb = -(-h // 64)
    assert full.shape == (37, nb) and coarse.shape == (37, -(-nb // 4)) and torch.equal(coarse, full[:, ::4])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for offsets in (full, coarse):
            check_products(values, mask, offsets, dense, rows=[1, 3, 8, 37], raw=True)
            assert torch.equal(ops.expand(values, mask, offsets, torch.empty(37, h)), dense.float())
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="per must be 1 or 4"):
        ops.prepare(mask, (37, h), per=2)


@native
def test_inconsistent_offsets_never_read_out_of_bounds():
    """Offsets that disagree with the mask give wrong numbers, not a crash (every read is checked)."""
    values, mask, offsets, _ = sparse_v(65, 100)
    for bad in (offsets + values.numel() - 3, offsets - 10**6, torch.full_like(offsets, 2**31 - 1)):
        torch.ops.layershare.bitmask_in(torch.randn(3, 65), values, mask, bad, 100)
        torch.ops.layershare.bitmask_out(torch.randn(3, 100), values, mask, bad)
        ops.expand(values, mask, bad, torch.empty(65, 100))


@native
def test_any_leading_shape_layout_and_activation_dtype():
    values, mask, offsets, dense = sparse_v(33, 100, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 33, 2, generator=g).transpose(1, 2)  # (3, 2, 33), not contiguous
    x = torch.randn(100, 2, 3, generator=g).permute(2, 1, 0)  # (3, 2, 100)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        zd, xd = z.to(dtype), x.to(dtype)
        y, o = ops.in_product(zd, values, mask, offsets, 100), ops.out_product(xd, values, mask, offsets)
        assert y.shape == (3, 2, 100) and o.shape == (3, 2, 33) and y.dtype == o.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.double(), zd.double() @ dense, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(o.double(), xd.double() @ dense.t(), rtol=tol, atol=tol * 10)


@native
def test_long_bfloat16_inputs_multiply_as_the_dense_bfloat16_model_does():
    """A prompt's rows in bfloat16: V expanded, then PyTorch's bfloat16 GEMM where the CPU has
    bfloat16 in hardware (the dense model's arithmetic: the same numbers as V in bfloat16), else
    a float32 GEMM."""
    values, mask, offsets, dense = sparse_v(33, 100, torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    z, x = torch.randn(20, 33, generator=g).bfloat16(), torch.randn(20, 100, generator=g).bfloat16()
    y, o = ops.in_product(z, values, mask, offsets, 100), ops.out_product(x, values, mask, offsets)
    assert y.dtype == o.dtype == torch.bfloat16
    if ops.native_bf16("cpu"):
        assert torch.equal(y, z @ dense.bfloat16()) and torch.equal(o, x @ dense.bfloat16().t())
    else:
        assert torch.equal(y, (z.float() @ dense.float()).bfloat16())
        assert torch.equal(o, (x.float() @ dense.float().t()).bfloat16())


@native
def test_opcheck():
    values, mask, offsets, _ = sparse_v(33, 100, torch.bfloat16)
    for n in (1, 5):
        torch.library.opcheck(torch.ops.layershare.bitmask_in.default,
                              (torch.randn(n, 33), values, mask, offsets, 100))
        torch.library.opcheck(torch.ops.layershare.bitmask_out.default, (torch.randn(n, 100), values, mask, offsets))
    torch.library.opcheck(torch.ops.layershare.bitmask_expand.default, (values, mask, offsets, torch.empty(33, 100)))


def test_grad_and_float64_use_the_reference():
    values, mask, offsets, dense = sparse_v(7, 33, torch.float64)
    z = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    y = ops.in_product(z, values, mask, offsets, 33)
    y.sum().backward()
    torch.testing.assert_close(z.grad, dense.sum(dim=1).expand(2, 7))


FALLBACK = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from layershare.modules.shared_basis import pack_bits
    from layershare.runtime.kernels import ops
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(33, 100, generator=g) < 0.5
    dense = torch.randn(33, 100, generator=g) * keep
    values, mask = dense[keep], pack_bits(keep)
    offsets = ops.prepare(mask, (33, 100))
    z, x = torch.randn(3, 33, generator=g), torch.randn(40, 100, generator=g)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = ops.in_product(z, values, mask, offsets, 100)
        o = ops.out_product(x, values, mask, offsets)
        ops.in_product(z, values, mask, offsets, 100)
    print(json.dumps({"available": ops.available(), "isa": ops.isa(), "warnings": [str(w.message) for w in seen],
                      "y": y.tolist(), "o": o.tolist(), "y_ref": (z @ dense).tolist(),
                      "o_ref": (x @ dense.t()).tolist(),
                      "lean": not {"setuptools", "torch.utils.cpp_extension"} & set(sys.modules)}))
""")


def run_script(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fallback_without_kernel_warns_once_and_computes_the_same():
    seen = run_script({"LAYERSHARE_NO_KERNEL": "1"})
    assert not seen["available"] and seen["isa"] == "reference"
    assert len(seen["warnings"]) == 1
    assert "python -m layershare.runtime.kernels.build" in seen["warnings"][0]
    for got, ref in (("y", "y_ref"), ("o", "o_ref")):
        torch.testing.assert_close(torch.tensor(seen[got]), torch.tensor(seen[ref]), rtol=1e-5, atol=1e-5)


@native
def test_environment_caps_the_path_and_loading_stays_lean():
    assert run_script({"LAYERSHARE_KERNEL": "avx2"})["isa"] in ("avx2", "portable")  # never avx512
    seen = run_script({"LAYERSHARE_KERNEL": "portable"})
    assert seen["available"] and seen["isa"] == "portable" and seen["warnings"] == []
    assert seen["lean"]  # loading the library does not import torch.utils.cpp_extension (setuptools)
    for got, ref in (("y", "y_ref"), ("o", "o_ref")):
        torch.testing.assert_close(torch.tensor(seen[got]), torch.tensor(seen[ref]), rtol=1e-5, atol=1e-5)


@pytest.fixture
def amx():
    """Switch the AMX products (set_amx) within a test; the default again afterwards."""
    yield ops.set_amx
    ops.set_amx("best")


@native
def test_amx_switch_is_checked():
    with pytest.raises(RuntimeError, match="bitmask_amx: use must be 'on', 'off' or 'best', got 'yes'"):
        ops.set_amx("yes")
    if ops.amx() == "absent":
        with pytest.raises(RuntimeError, match="no AMX-BF16 tiles to use"):
            ops.set_amx("on")
        assert ops.set_amx("best") == "absent"
    else:
        assert ops.set_amx("off") == "off" and ops.set_amx("best") == "on"


@native
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_products_equal_the_fma_paths_to_rounding(amx, threads):
    """bfloat16 values times bfloat16 activations at 1-8 rows (tiles from 4 or 6 rows) over shapes
    that are not multiples of the tiles (16 or 32 rows of V, 64 columns), empty and full rows, and
    the same products of float32 activations, which never take the tiles, bit for bit."""
    if ops.amx() == "absent":
        pytest.skip("this CPU (or OS) has no AMX-BF16 tiles")
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(7)
    for r, h in [(33, 100), (65, 129), (100, 7), (1, 64), (575, 200), (17, 1)]:
        keep = torch.rand(r, h, generator=g) < 0.5
        keep[0] = True
        keep[min(2, r - 1)] = False
        values, mask, offsets, dense = sparse_v(r, h, torch.bfloat16, keep=keep, seed=r)
        for n in range(1, 9):
            z, x = torch.randn(n, r, generator=g), torch.randn(n, h, generator=g)
            got = {}
            for use in ("on", "off"):
                amx(use)
                got[use] = [ops.in_product(z.bfloat16(), values, mask, offsets, h),
                            ops.out_product(x.bfloat16(), values, mask, offsets),
                            ops.in_product(z, values, mask, offsets, h), ops.out_product(x, values, mask, offsets)]
            ref_in, ref_out = z.bfloat16().double() @ dense, x.bfloat16().double() @ dense.t()
            for use in ("on", "off"):  # float32 sums in either order, then one rounding to bfloat16
                torch.testing.assert_close(got[use][0].double(), ref_in, rtol=2**-7, atol=1e-4 * r, msg=f"{use} in")
                torch.testing.assert_close(got[use][1].double(), ref_out, rtol=2**-7, atol=1e-4 * h, msg=f"{use} out")
            assert torch.equal(got["on"][2], got["off"][2]) and torch.equal(got["on"][3], got["off"][3])
    # a weight held whole: its rows' tiles loaded where they lie (whole blocks, 16 rows at a time),
    # the same tiles as an explicit all-ones bitmask gives, so the same sums bit for bit
    amx("on")
    for r, h in [(40, 128), (33, 64), (16, 192), (70, 100)]:
        values = torch.randn(r * h, generator=g).bfloat16()
        mask, offsets = ops.all_kept((r, h))
        ones = pack_bits(torch.ones(r, h, dtype=torch.bool))
        ones_off = ops.prepare(ones, (r, h))
        for n in (4, 8):
            x = torch.randn(n, h, generator=g).bfloat16()
            whole = ops.out_product(x, values, mask, offsets)
            assert torch.equal(whole, ops.out_product(x, values, ones, ones_off))
            torch.testing.assert_close(whole.double(), x.double() @ values.double().view(r, h).t(), rtol=2**-7,
                                       atol=1e-4 * h)
    torch.set_num_threads(2)


def test_the_build_is_keyed_by_every_file_the_source_includes(tmp_path, monkeypatch):
    """A library built from older sources is never loaded: its folder's name hashes bitmask.cpp
    and each local header it includes (build.py passes only bitmask.cpp to the compiler)."""
    import re

    from layershare.runtime.kernels import library

    local = set(re.findall(r'^#include "([^"]+)"', library.SOURCE.read_text(), re.M))
    assert local and local == {h.name for h in library.HEADERS} and all(h.exists() for h in library.HEADERS)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = library.build_dir()
    header = tmp_path / library.HEADERS[0].name
    header.write_text(library.HEADERS[0].read_text() + "// edited\n")
    monkeypatch.setattr(library, "HEADERS", (header,))
    assert library.build_dir() != before and library.build_dir().parent == before.parent


# ---- the "kernel" form of SharedBasisLinear (runtime="sparse") --------------------------------
@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (4096,), generator=g)
    path = tmp_path_factory.mktemp("kernels") / "c"
    layershare.compress(make_model("llama"), small_recipe(ratio=0.2, pattern="unstructured"), data=tokens,
                        output_dir=path)
    return path


def test_kernel_form_computes_what_compact_does(compressed, input_ids):
    compact = layershare.load(compressed, runtime="compact")
    sparse = layershare.load(compressed, runtime="sparse")
    assert forms(sparse) == {"kernel": 12} and forms(compact) == {"compact": 12}
    with torch.no_grad():
        for ids in (input_ids, input_ids[:, :3], input_ids[:1, :1]):  # 48 rows (prefill), 6 and 1 (decode)
            torch.testing.assert_close(sparse(ids).logits, compact(ids).logits, rtol=1e-5, atol=1e-5)
    # it holds the stored tensors (saved as they are) plus the load-time index, not saved
    assert sparse.state_dict().keys() == compact.state_dict().keys()
    for k, t in compact.state_dict().items():
        assert torch.equal(sparse.state_dict()[k], t), k
    layers = [m for m in sparse.modules() if isinstance(m, SharedBasisLinear)]
    index = sum(m.V_offsets.numel() * 4 for m in layers)
    assert resident_bytes(sparse) == resident_bytes(compact) + index
    assert index < 0.1 * sum(m.V_values.numel() * 4 for m in layers)
    first = next(m for m in compact.modules() if isinstance(m, SharedBasisLinear))
    layer = layers[0]
    assert layer.packed and layer.nnz() == first.nnz() and "form=kernel" in repr(layer)
    assert torch.equal(layer.dense_V(), first.dense_V())
    for form in ("factored", "kernel", "compact", "kernel", "train", "kernel"):  # round trips keep V
        layer.to_form(form)
        assert torch.equal(layer.dense_V(), first.dense_V()), form
    assert torch.equal(layer.V_offsets, ops.prepare(layer.V_mask, layer.v_shape))


def test_kernel_form_refuses_a_dense_v():
    from layershare.modules.shared_basis import SharedBasis

    layer = SharedBasisLinear(SharedBasis(torch.randn(8, 4)), torch.randn(4, 6), "in", sparse=False)
    with pytest.raises(ValueError, match="kernel form holds a sparse V"):
        layer.to_form("kernel")


def test_a_bfloat16_file_loaded_in_float32_keeps_its_values_at_16_bits(tmp_path, input_ids):
    """The kernel form holds V's values as the file stores them (exact: the kernels widen them),
    so it computes what the float32 compact form does with half the values' bytes; a quantized
    V's dequantized values, which bfloat16 does not hold exactly, stay float32."""
    tokens = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "c"
    recipe = small_recipe(ratio=0.2, pattern="unstructured")
    recipe.dtype = "bfloat16"
    layershare.compress(make_model("llama"), recipe, data=tokens, output_dir=path)
    sparse = layershare.load(path, runtime="sparse", dtype=torch.float32)
    compact = layershare.load(path, runtime="compact", dtype=torch.float32)
    layers = [m for m in sparse.modules() if isinstance(m, SharedBasisLinear)]
    assert layers and all(m.V_values.dtype == torch.bfloat16 for m in layers)
    # the shared U too: held at 16 bits for the kernels (U rebuilt in float32 on access), never saved
    bases = {id(m.basis): m.basis for m in layers}.values()
    assert all(b.held and b.U16.dtype == torch.bfloat16 and "U" not in b._parameters for b in bases)
    wide = {id(m.basis): m.basis for m in compact.modules() if isinstance(m, SharedBasisLinear)}.values()
    assert all(torch.equal(b.U, w.U) for b, w in zip(bases, wide))
    assert all(m.V_values.dtype == torch.float32 for m in compact.modules() if isinstance(m, SharedBasisLinear))
    with torch.no_grad():
        for ids in (input_ids, input_ids[:1, :1]):
            torch.testing.assert_close(sparse(ids).logits, compact(ids).logits, rtol=1e-5, atol=1e-5)
    from layershare.checkpoint.save import save_compressed
    from layershare.checkpoint.verify import CheckpointError

    with pytest.raises(CheckpointError, match=f"{len(bases)} of its linears, embeddings and shared bases were "
                       "narrowed to their exact 16-bit weights when it was loaded .*runtime='compact'"):
        save_compressed(sparse, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    layer = layers[0]
    wide = layer.V_values.float() * (1 + 2**-12)  # not a bfloat16 value any more
    layer._buffers["V_values"] = wide
    narrow_values(layer, torch.bfloat16)
    assert layer.V_values is wide


@native
def test_a_shared_basis_is_held_at_16_bits_only_when_exact():
    from layershare.modules.shared_basis import SharedBasis

    U = torch.randn(70, 33)
    basis = SharedBasis(U.clone())
    assert not basis.hold_narrow(torch.bfloat16) and not basis.held  # not bfloat16 values
    assert not SharedBasis(U.bfloat16().float()).hold_narrow(torch.float32)  # no 16-bit file dtype
    exact = SharedBasis(U.bfloat16().float())
    assert exact.hold_narrow(torch.bfloat16) and exact.held and exact.U16.dtype == torch.bfloat16
    assert torch.equal(exact.U, U.bfloat16().float()) and exact.rank == 33
    x, z = torch.randn(3, 70), torch.randn(3, 33)
    ref = U.bfloat16().double()
    torch.testing.assert_close(exact.project(x).double(), x.double() @ ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact.unproject(z).double(), z.double() @ ref.t(), rtol=1e-5, atol=1e-5)


def test_kernel_form_in_bfloat16(compressed, input_ids):
    ref = layershare.load(compressed, runtime="compact")
    model = layershare.load(compressed, runtime="sparse", dtype=torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, SharedBasisLinear))
    assert layer.form == "kernel" and layer.V_values.dtype == torch.bfloat16
    with torch.no_grad():
        for ids in (input_ids, input_ids[:, :2]):
            out, expected = model(ids).logits, ref(ids).logits
            assert out.dtype == torch.bfloat16
            assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


@native
def test_decoding_products_follow_the_tensors_a_layer_holds(compressed, input_ids):
    """Each layer makes its decoding product once (ops.decode_fn) and keeps it: after its tensors
    are replaced (here every 16-bit weight, shared basis and V doubled, as new tensors) it computes
    with the new ones, as a model that never ran before the change does; a deep copy computes the
    same; a form round trip too."""
    from layershare.modules.shared_basis import SharedBasis
    from layershare.runtime.narrow import Linear16

    def double(model):
        n = 0
        for m in model.modules():
            for cls, name in ((Linear16, "weight16"), (SharedBasis, "U16"), (SharedBasisLinear, "V_values")):
                if isinstance(m, cls) and name in m._buffers:
                    m._buffers[name] = m._buffers[name] * 2
                    n += 1
        return n

    ran = layershare.load(compressed, runtime="auto", dtype=torch.bfloat16)  # plain linears in Linear16 too
    fresh = layershare.load(compressed, runtime="auto", dtype=torch.bfloat16)
    assert forms(ran) == {"kernel": 12} and sum(isinstance(m, Linear16) for m in ran.modules()) > 12
    step = input_ids[:2, :1]  # two decoding rows
    with torch.no_grad():
        before = ran(step).logits
        counts = double(ran), double(fresh)
        assert counts[0] == counts[1] > 24  # V's, bases and plain linears all changed
        after = ran(step).logits
        assert not torch.equal(after, before)
        assert torch.equal(after, fresh(step).logits)
        import copy

        assert torch.equal(copy.deepcopy(ran)(step).logits, after)
        layer = next(m for m in ran.modules() if isinstance(m, SharedBasisLinear))
        layer.to_form("compact")
        layer.to_form("kernel")
        assert torch.equal(ran(step).logits, after)


def test_auto_picks_the_kernel_form_only_for_a_model_on_the_cpu(compressed):
    """The kernels are the CPU's: on another device `auto` keeps the group factored or merged
    (a meta-device copy stands in for a GPU here)."""
    from layershare.runtime.forms import _group_form

    model = layershare.load(compressed, runtime="compact")
    layer = next(m for m in model.modules() if isinstance(m, SharedBasisLinear))
    group = [m for m in model.modules() if isinstance(m, SharedBasisLinear) and m.basis is layer.basis]
    if not ops.available():
        pytest.skip("the native kernels are not built here")
    assert _group_form(layer.basis, group, "auto") == "kernel"
    layer.basis.to("meta")
    assert _group_form(layer.basis, group, "auto") in ("factored", "merged")
    assert _group_form(layer.basis, group, "sparse") == "sparse"

