"""The GPU's bitmask-sparse products (runtime/kernels/triton_bitmask.py), run on the CPU by Triton's
interpreter, against dense float64 products; and a model whose sparse layers take them computes
what the compact form does."""
import os

import pytest
import torch
from test_kernels import ROWS, SIZES, compressed  # noqa: F401 (compressed: a fixture)
from test_kernels import sparse_v as cpu_sparse_v

import layershare
from layershare.runtime.forms import forms
from layershare.runtime.kernels import ops

pytest.importorskip("triton")


def sparse_v(r, h, *args, **kwargs):
    """test_kernels.sparse_v with the index these kernels read: an offset per block (per=1)."""
    values, mask, _, dense = cpu_sparse_v(r, h, *args, **kwargs)
    return values, mask, ops.prepare(mask, (r, h), per=1), dense


@pytest.fixture(scope="module")
def tb():
    """triton_bitmask under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before
    triton is first imported: its own library functions, tl.cumsum among them, are decorated then)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is set to something else than 1")
    from layershare.runtime.kernels import triton_bitmask

    return triton_bitmask


def check(tb, values, mask, offsets, dense, rows=ROWS, dtype=torch.float32, contiguous=True):
    r, h = dense.shape
    g = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 and values.dtype == torch.float32 else \
        dict(rtol=2e-2, atol=2e-2 * max(r, h) ** 0.5)
    for n in rows:
        z, x = torch.randn(n, 2 * r, generator=g).to(dtype), torch.randn(n, 2 * h, generator=g).to(dtype)
        z, x = (z[:, :r].contiguous(), x[:, :h].contiguous()) if contiguous else (z[:, ::2], x[:, ::2])
        assert contiguous or not (z.is_contiguous() or x.is_contiguous())
        y, o = tb.in_product(z, values, mask, offsets, h), tb.out_product(x, values, mask, offsets)
        assert y.shape == (n, h) and o.shape == (n, r) and y.dtype == o.dtype == torch.float32
        torch.testing.assert_close(y.double(), z.double() @ dense, **tol, msg=f"in {n}")
        torch.testing.assert_close(o.double(), x.double() @ dense.t(), **tol, msg=f"out {n}")


@pytest.mark.parametrize("r", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_products_match_dense(tb, r, dtype):
    for h in (1, 63, 64, 130):  # within a block, one block, more blocks; rows rarely start on a byte
        values, mask, offsets, dense = sparse_v(r, h, dtype, seed=r + h)
        check(tb, values, mask, offsets, dense, rows=[1, 3, 8, 37])


@pytest.mark.parametrize("pattern", ["zeros", "ones", "empty rows"])
def test_masks(tb, pattern):
    r, h = 40, 100
    keep = {"zeros": torch.zeros(r, h, dtype=torch.bool), "ones": torch.ones(r, h, dtype=torch.bool),
            "empty rows": torch.rand(r, h, generator=torch.Generator().manual_seed(3)) < 0.5}[pattern]
    if pattern == "empty rows":
        keep[::3] = False
        keep[:, 64:] = False  # and an empty block in every row
    values, mask, offsets, dense = sparse_v(r, h, keep=keep)
    assert values.numel() == int(keep.sum())
    check(tb, values, mask, offsets, dense)


@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_dtypes_and_layouts(tb, activations):
    """Every activation dtype against every value dtype (16-bit tiles multiply in 16 bits when both
    match: float16 here; mixed ones in float32), strided inputs."""
    for values_dtype in (torch.float32, torch.bfloat16, torch.float16):
        values, mask, offsets, dense = sparse_v(33, 70, values_dtype, seed=5)
        check(tb, values, mask, offsets, dense, rows=[2, 17], dtype=activations, contiguous=False)


def test_no_rows_and_no_columns(tb):
    values, mask, offsets, dense = sparse_v(5, 9)
    assert tb.in_product(torch.empty(0, 5), values, mask, offsets, 9).shape == (0, 9)
    assert tb.out_product(torch.empty(0, 9), values, mask, offsets).shape == (0, 5)


def test_usable_only_on_a_gpu_or_under_the_interpreter(tb, monkeypatch):
    t = torch.zeros(1)
    assert tb.usable(t)  # the interpreter runs the kernels on the CPU
    monkeypatch.setattr(ops, "_kernel_input", lambda t, values, device_type: True)  # as a CUDA tensor would be
    assert ops._gpu(t, t, torch.ones(1, dtype=torch.uint8))
    assert not ops._gpu(t, t, ops.all_kept((3, 4))[0])  # a V kept whole: the reference's dense product
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not tb.usable(t)  # a CPU tensor otherwise takes the native kernels (ops.py)
    assert not ops._gpu(t, t, torch.ones(1, dtype=torch.uint8))


def test_a_model_whose_sparse_layers_take_them_computes_what_compact_does(tb, compressed, input_ids, monkeypatch):
    """The routing of ops.in_product/out_product to these kernels, as on a GPU, end to end."""
    calls = []

    def gpu(t, values, mask):
        calls.append(t.shape[0])
        return tb.usable(t)

    monkeypatch.setattr(ops, "_gpu", gpu)
    monkeypatch.setattr(ops, "_triton", lambda: tb)
    monkeypatch.setattr(ops, "_decoding", lambda t, values: False)  # the CPU's fast path: these stand for CUDA tensors
    monkeypatch.setattr(ops, "decode_fn", lambda *args: None)  # and the layers' (CUDA values have none)
    compact = layershare.load(compressed, runtime="compact")
    sparse = layershare.load(compressed, runtime="sparse")
    assert forms(sparse) == {"kernel": 12}
    with torch.no_grad():
        for ids in (input_ids, input_ids[:1, :1]):  # 48 rows (a prompt), 1 (decoding)
            torch.testing.assert_close(sparse(ids).logits, compact(ids).logits, rtol=1e-5, atol=1e-5)
    assert sorted(set(calls)) == [1, 48] and len(calls) == 2 * 12


def test_a_coarse_index_is_refused_here_and_expanded_by_ops(tb):
    values, mask, _, dense = cpu_sparse_v(9, 300)
    coarse = ops.prepare(mask, (9, 300))  # the native kernels' default: an offset per 4 blocks
    with pytest.raises(ValueError, match="need an offset per block of 64 columns: got 2 per row for 300 columns"):
        tb.in_product(torch.randn(2, 9), values, mask, coarse, 300)
    assert torch.equal(ops._per_block(coarse, mask, (9, 300)), ops.prepare(mask, (9, 300), per=1))
