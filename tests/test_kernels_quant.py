"""V's kept values held as codes (ops.QuantValues) in the native bitmask kernels, against the
grid's own dequantization (quant/grid.py), and a quantized FiPS model loaded with them."""
import pytest
import torch
from conftest import make_model

import layershare
from layershare.modules.shared_basis import SharedBasisLinear, pack_bits
from layershare.quant.grid import QuantSpec, dequantize, quantize
from layershare.runtime import kernels
from layershare.runtime.forms import forms, resident_bytes
from layershare.runtime.kernels import ops

native = pytest.mark.skipif(not kernels.available(), reason="native kernel not loaded (not built, or "
                            "LAYERSHARE_NO_KERNEL set): build it with `python -m layershare.runtime.kernels.build`")
SHAPES = [(33, 100), (65, 65), (100, 7), (5, 200), (1, 1), (64, 130)]


def quant_v(r, h, bits, group, symmetric, seed=0, keep=None):
    """(QuantValues, mask, offsets, dense float32 V of the dequantized values)."""
    g = torch.Generator().manual_seed(seed)
    if keep is None:
        keep = torch.rand(r, h, generator=g) < 0.5
    values = torch.randn(int(keep.sum()), generator=g) * 0.1
    q = quantize(values, QuantSpec(bits, group, symmetric))
    qv = ops.QuantValues.from_codes(q.codes, q.scales, q.zeros, bits, group)
    dense = torch.zeros(r, h)
    dense[keep] = dequantize(q)
    mask = pack_bits(keep)
    return qv, mask, ops.prepare(mask, (r, h)), dense


@pytest.fixture
def isa():
    yield ops.set_isa
    ops.set_isa("best")
    ops.set_spread("best")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_round_trip_and_dequantize_as_the_grid_does(bits):
    for n, group, symmetric in [(1, 16, True), (333, 32, False), (1000, 128, False), (129, 64, True)]:
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        q = quantize(w, QuantSpec(bits, group, symmetric))
        qv = ops.QuantValues.from_codes(q.codes, q.scales, q.zeros, bits, group)
        assert qv.bits == (4 if bits <= 4 else 8) and qv.n == n
        assert qv.codes.numel() == (-(-n // 2) if bits <= 4 else n)  # half a byte a value up to 4 bits
        assert torch.equal(qv.codes_per_value(), q.codes)
        assert torch.equal(qv.dequantize(), dequantize(q))  # bit for bit


def test_groups_the_kernels_cannot_take_are_refused():
    q = quantize(torch.randn(100), QuantSpec(4, 24, False))
    assert ops.QuantValues.from_codes(q.codes, q.scales, q.zeros, 4, 24) is None  # not a power of two
    q = quantize(torch.randn(100), QuantSpec(4, 8, False))
    assert ops.QuantValues.from_codes(q.codes, q.scales, q.zeros, 4, 8) is None  # shorter than 16


@native
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (3, False), (2, True), (8, False), (8, True)])
@pytest.mark.parametrize("group", [16, 64, 128])
def test_every_path_expands_exactly_and_multiplies_as_the_dense_dequantized_v(isa, bits, symmetric, group):
    best = isa("best")
    for r, h in SHAPES:
        qv, mask, offsets, dense = quant_v(r, h, bits, group, symmetric, seed=r * h + bits)
        g = torch.Generator().manual_seed(1)
        # AVX-512: every spread (expand16 decodes 4-bit codes with VBMI2 where the CPU has it)
        for use in ("portable", "avx2", "best", "best-permute", "best-expand16"):
            base, _, spread = use.partition("-")
            if isa(base) not in (base, best):
                continue
            if best == "avx512":
                ops.set_spread(spread or "expand")
            elif spread:
                continue
            # the expansion is grid.decode's values exactly, on every path
            assert torch.equal(ops.expand(qv, mask, offsets, torch.empty(r, h)), dense), (use, r, h)
            # and into bfloat16 (a prompt's 16-bit GEMM): those values rounded as Tensor.to rounds
            assert torch.equal(ops.expand(qv, mask, offsets, torch.empty(r, h, dtype=torch.bfloat16)),
                               dense.bfloat16()), (use, r, h)
            for n in (1, 2, 5, 8, 37):  # sparse kernels up to 8 rows; more: expanded V + GEMM
                for threads in ((1, 2) if n == 1 else (2,)):
                    torch.set_num_threads(threads)
                    z, x = torch.randn(n, r, generator=g), torch.randn(n, h, generator=g)
                    y, o = ops.in_product(z, qv, mask, offsets, h), ops.out_product(x, qv, mask, offsets)
                    torch.testing.assert_close(y.double(), z.double() @ dense.double(), rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(o.double(), x.double() @ dense.double().t(), rtol=1e-5, atol=1e-5)
    torch.set_num_threads(2)


@native
def test_the_vbmi2_codes_path_is_the_expand_path_bit_for_bit(isa):
    """4- and 8-bit codes spread as bytes (groups >= 64; smaller groups take the other path) give
    the expand spread's products exactly: odd and even starts, blocks across two groups, full and
    empty blocks, any zero points, 1-8 rows, bad offsets read nothing out of bounds."""
    if isa("best") != "avx512" or ops.set_spread("expand16") != "expand16":
        pytest.skip("needs a CPU with AVX-512 VBMI2")
    g = torch.Generator().manual_seed(5)
    cases = [(33, 100, 64, 0.5), (65, 129, 128, 0.5), (40, 256, 64, 0.97), (17, 64, 256, 1.0), (50, 190, 64, 0.1)]
    for r, h, group, density in cases:
        keep = torch.rand(r, h, generator=g) < density
        keep[3] = True  # a full row: whole blocks
        keep[5] = False  # an empty row
        for bits in (4, 2, 8):
            qv, mask, offsets, _ = quant_v(r, h, bits, group, False, seed=r + h, keep=keep)
            if bits == 2:  # zero points past 15 for 4-bit codes (not written by the grid), still exact
                qv = ops.QuantValues(qv.codes, qv.scales, torch.randint(0, 256, qv.zeros.shape, dtype=torch.uint8,
                                                                        generator=g), 4, group, qv.n)
            zs = [torch.randn(n, r, generator=g) for n in range(1, 9)]
            xs = [torch.randn(n, h, generator=g) for n in range(1, 9)]
            got = {}
            for spread in ("expand", "expand16"):
                ops.set_spread(spread)
                got[spread] = ([ops.expand(qv, mask, offsets, torch.empty(r, h))]
                               + [ops.in_product(z, qv, mask, offsets, h) for z in zs]
                               + [ops.out_product(x, qv, mask, offsets) for x in xs])
            exact = torch.zeros(r, h)
            exact[keep] = qv.dequantize()  # grid.decode's arithmetic, with whatever zero points
            assert torch.equal(got["expand16"][0], exact)
            same = [torch.equal(a, b) for a, b in zip(got["expand"], got["expand16"], strict=True)]
            assert all(same), (r, h, group, bits, same)
            for bad in (offsets + qv.n - 3, offsets - 10**6, torch.full_like(offsets, 2**31 - 1)):
                ops.in_product(torch.randn(3, r), qv, mask, bad, h)
                ops.out_product(torch.randn(3, h), qv, mask, bad)


@native
@pytest.mark.parametrize("pattern", ["zeros", "ones", "empty rows"])
def test_masks_and_non_contiguous_activations(pattern):
    r, h = 40, 150
    g = torch.Generator().manual_seed(3)
    keep = {"zeros": torch.zeros(r, h, dtype=torch.bool), "ones": torch.ones(r, h, dtype=torch.bool),
            "empty rows": (torch.rand(r, h, generator=g) < 0.5) & (torch.arange(r) % 3 != 1)[:, None]}[pattern]
    qv, mask, offsets, dense = quant_v(r, h, 4, 32, False, keep=keep)
    z = torch.randn(3, 2 * r, generator=g)[:, ::2]  # strided
    x = torch.randn(h, 3, generator=g).t()  # transposed
    for act in (torch.float32, torch.bfloat16):
        y = ops.in_product(z.to(act), qv, mask, offsets, h)
        o = ops.out_product(x.to(act), qv, mask, offsets)
        assert y.dtype == act and o.dtype == act
        tol = 1e-5 if act == torch.float32 else 2e-2
        torch.testing.assert_close(y.float(), z.to(act).float() @ dense, rtol=tol, atol=tol)
        torch.testing.assert_close(o.float(), x.to(act).float() @ dense.t(), rtol=tol, atol=tol)


@native
def test_the_ops_check_their_inputs_and_pass_opcheck():
    qv, mask, offsets, _ = quant_v(33, 100, 4, 32, False)
    z = torch.randn(2, 33)
    with pytest.raises(RuntimeError, match="group must be a power of two >= 16, got 24"):
        torch.ops.layershare.bitmask_in_q(z, qv.codes, qv.scales, qv.zeros, 4, 24, qv.n, mask, offsets, 100)
    with pytest.raises(RuntimeError, match="bits must be 4 .* or 8, got 3"):
        torch.ops.layershare.bitmask_in_q(z, qv.codes, qv.scales, qv.zeros, 3, 32, qv.n, mask, offsets, 100)
    with pytest.raises(RuntimeError, match=f"codes must be a contiguous 1-D uint8 CPU tensor of {(qv.n + 3) // 2} "):
        torch.ops.layershare.bitmask_in_q(z, qv.codes, qv.scales, qv.zeros, 4, 32, qv.n + 2, mask, offsets, 100)
    groups = -(-qv.n // 32)
    with pytest.raises(RuntimeError, match=f"scales must be a contiguous 1-D float16 CPU tensor of {groups} entries"):
        torch.ops.layershare.bitmask_out_q(torch.randn(2, 100), qv.codes, qv.scales.float(), qv.zeros, 4, 32, qv.n,
                                           mask, offsets)
    with pytest.raises(RuntimeError, match="zeros must be a contiguous 1-D uint8 CPU tensor"):
        torch.ops.layershare.bitmask_out_q(torch.randn(2, 100), qv.codes, qv.scales, qv.zeros.float(), 4, 32, qv.n,
                                           mask, offsets)
    for n in (1, 5):
        torch.library.opcheck(torch.ops.layershare.bitmask_in_q.default, (torch.randn(n, 33), *qv.args(), mask,
                                                                          offsets, 100))
        torch.library.opcheck(torch.ops.layershare.bitmask_out_q.default, (torch.randn(n, 100), *qv.args(), mask,
                                                                           offsets))
    torch.library.opcheck(torch.ops.layershare.bitmask_expand_q.default, (*qv.args(), mask, offsets,
                                                                          torch.empty(33, 100)))


@native
def test_inconsistent_offsets_never_read_out_of_bounds():
    qv, mask, offsets, _ = quant_v(65, 100, 4, 16, False)
    for bad in (offsets + qv.n - 3, offsets - 10**6, torch.full_like(offsets, 2**31 - 1)):
        torch.ops.layershare.bitmask_in_q(torch.randn(3, 65), *qv.args(), mask, bad, 100)
        torch.ops.layershare.bitmask_out_q(torch.randn(3, 100), *qv.args(), mask, bad)
        ops.expand(qv, mask, bad, torch.empty(65, 100))


def test_the_reference_path_takes_codes_too():
    """Without the native kernels (or for a GPU) the reference rebuilds V from the codes."""
    qv, mask, offsets, dense = quant_v(9, 40, 4, 16, False)
    assert torch.equal(ops.reference_dense(qv, mask, (9, 40)), dense)


@pytest.fixture(scope="module")
def fips_4bit(tmp_path_factory):
    from layershare import FiPSConfig, QuantConfig, Recipe

    model = make_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("kq") / "fq"
    recipe = Recipe(stages=[FiPSConfig(ratio=0.2, steps=0), QuantConfig(bits=4, group_size=32, algorithm="rtn")],
                    nsamples=8, seqlen=32)
    layershare.compress(model, recipe, data=tokens, output_dir=path)
    return path, tokens


@native
def test_a_quantized_fips_model_keeps_v_as_codes_and_computes_what_the_dequantized_one_does(fips_4bit):
    path, tokens = fips_4bit
    packed = layershare.load(path)  # auto, CPU
    reference = layershare.load(path, runtime="sparse")  # the same kernels on the dequantized float32 values
    layers = [m for m in packed.modules() if isinstance(m, SharedBasisLinear)]
    ref_layers = [m for m in reference.modules() if isinstance(m, SharedBasisLinear)]
    assert layers and forms(packed) == {"kernel": len(layers)}
    for m, ref in zip(layers, ref_layers):
        values = m.stored_values()
        assert isinstance(values, ops.QuantValues) and values.bits == 4 and "V_values" not in m._buffers
        assert values.codes.numel() == -(-ref.nnz() // 2) and m.nnz() == ref.nnz()
        assert torch.equal(m.dense_V(), ref.dense_V())  # the dequantized values, exactly
    with torch.no_grad():
        for ids in (tokens[:1, :1], tokens[:2, :4], tokens[:2]):  # decode (kernels) and prefill (expanded)
            a, b = packed(ids).logits, reference(ids).logits
            assert (a - b).abs().max() <= 3e-2 * b.abs().max()  # the attention's int4 kernel: bfloat16 activations
    # codes: a byte per two values plus a float16 scale and a uint8 zero point per 32 values, against 4 bytes a value
    v_bytes = sum(m.stored_values().nbytes() for m in layers)
    ref_bytes = sum(m.V_values.numel() * 4 for m in ref_layers)
    assert v_bytes < 0.2 * ref_bytes
    assert resident_bytes(packed) < resident_bytes(reference)
    # the shared bases are held as their codes too (no float U), and no file codes are left over
    bases = {id(m.basis): m.basis for m in layers}.values()
    ref_bases = {id(m.basis): m.basis for m in ref_layers}.values()
    assert bases and all(b.held and "U" not in b._parameters for b in bases)
    for b, ref in zip(bases, ref_bases):
        assert torch.equal(b.U, ref.U) and b.rank == ref.rank  # rebuilt on access: the dequantized U, exactly
        x = torch.randn(3, ref.U.shape[0])
        torch.testing.assert_close(b.project(x), x @ ref.U, rtol=1e-5, atol=1e-5)
        z = torch.randn(3, b.rank)
        torch.testing.assert_close(b.unproject(z), z @ ref.U.t(), rtol=1e-5, atol=1e-5)
    assert not [k for k, _ in packed.named_buffers() if k.endswith(("_qcodes", "_qscales", "_qzeros"))]
    assert [k for k, _ in reference.named_buffers() if k.endswith("U_qcodes")]
    assert packed.layershare_packed >= len(layers) + len(bases)
    with pytest.raises(layershare.checkpoint.verify.CheckpointError, match="kept packed for the low-bit kernels"):
        layershare.checkpoint.save.save_compressed(packed, path.parent / "again")
    layer = layers[0]  # other forms rebuild V from the codes
    before = layer.dense_V()
    layer.to_form("factored")
    assert torch.equal(layer.dense_V(), before) and not any(k in layer._buffers for k in layer.QUANT_BUFFERS)


def test_codes_must_match_the_bitmask():
    from layershare.modules.shared_basis import SharedBasis

    V = torch.randn(4, 40) * (torch.rand(4, 40) < 0.5)
    layer = SharedBasisLinear(SharedBasis(torch.randn(8, 4)), V, "in", sparse=True).to_form("compact")
    q = quantize(layer.V_values[:-1], QuantSpec(4, 16, False))
    with pytest.raises(ValueError, match=f"{layer.nnz() - 1} codes for the {layer.nnz()} entries"):
        layer.set_quant_values(ops.QuantValues.from_codes(q.codes, q.scales, q.zeros, 4, 16))


@native
def test_a_model_holding_codes_runs_on_the_reference_path_and_converts_to_merged(fips_4bit, monkeypatch):
    """The reference path (a device without the kernels) takes codes too, and codes are rebuilt
    where another form needs dense factors (merged: W = U V)."""
    from layershare.runtime.forms import to_runtime

    path, tokens = fips_4bit
    reference = layershare.load(path, runtime="sparse")
    model = layershare.load(path)
    ids = tokens[:1, :6]
    with torch.no_grad():
        expected = reference(ids).logits
        with monkeypatch.context() as m:
            m.setattr(ops, "_native", lambda t, values: False)
            got = model(ids).logits
        assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()
        to_runtime(model, "merged")
        assert not [m for m in model.modules() if isinstance(m, SharedBasisLinear)]
        got = model(ids).logits
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_a_basis_whose_rows_cannot_be_regrouped_stays_dequantized():
    """U's groups are re-cut at gcd(group, row length); below 16 (or not a power of two) the basis
    is not staged, and stays the dequantized float tensor."""
    from layershare.modules.shared_basis import SharedBasis
    from layershare.quant.grid import to_tensors
    from layershare.runtime.quantized import _stage_basis

    for cols, staged in ((96, True), (72, False)):  # gcd(32, 96) = 32; gcd(32, 72) = 8
        basis = SharedBasis(torch.randn(cols, 8))
        q = quantize(basis.U.detach().t(), QuantSpec(4, 32, False))  # stored input-first: U^T, groups along d
        for k, t in to_tensors(q, "q").items():
            basis.register_buffer("U_q" + k.split(".")[1], t)
        entry = {"bits": 4, "group_size": 32, "symmetric": False, "tensors": {"b.U": {"shape": [cols, 8],
                                                                                      "input_first": True}}}
        _stage_basis(basis, "b.U", entry["tensors"]["b.U"], entry)
        assert basis.hold_codes() is staged
        if staged:
            assert basis.held and torch.equal(basis.U, dequantize(q).t())
