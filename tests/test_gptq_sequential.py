"""Sequential GPTQ (quant/sequential.py, issue 30): the stage's codes are those of a plain
block-by-block reference; each Hessian comes from the inputs the quantized model feeds the layer;
a shared basis sums its uses over its group (one read along both axes, FiPS's, is rounded); a sparse V keeps its pattern (quant/gptq.gptq_masked);
a singular Hessian stops the run with the tensor's name, writing nothing."""
import copy

import pytest
import torch
from conftest import make_model

import layershare
from layershare import Recipe
from layershare.adapters import get_adapter
from layershare.compression.drivers import StageContext
from layershare.data.text import calibration_batches
from layershare.methods import BasisSharingConfig, FiPSConfig, QuantConfig
from layershare.methods.quant import Quantize
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.modules.store import StageStore
from layershare.quant import QuantSpec, dequantize, gptq, gptq_masked, pack, quantize
from layershare.quant.gptq import SingularHessianError, toward_float
from layershare.quant.inputs import Target, Use

SPEC = dict(bits=3, group_size=32, algorithm="gptq")
# IST-DASLab/gptq's llama_sequential with true_sequential: the order a Llama block's linears are quantized in
SEQUENCE = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _batches(tokens):
    return calibration_batches(tokens, 8, 32, 4, 0)


def _run_stage(model, batches, record=None, **kw):
    """The quantization stage on `model` in place; `record` gets every Hessian GPTQ is given."""
    method = Quantize(QuantConfig(**{**SPEC, **kw}))
    if record is not None:
        inner = method._quantize
        method._quantize = lambda t, H, D=None: (record.__setitem__(t.name, H.clone()), inner(t, H, D))[1]
    ctx = StageContext(stage=1, device="cpu", seed=0, store=StageStore(model, 1, "cpu"))
    return method.compress(model, get_adapter(model), batches, None, ctx)


def _gram_hooks(modules: dict, H: dict, transform):
    """Pre-hooks adding X^T X (float32 products, float64 sums, per batch) of each module's input to H[name]."""
    def hook(name):
        def fn(m, args):
            x = transform(m, args[0])
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.t() @ x).double()
            H[name] = H[name] + g if name in H else g
        return fn
    return [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]


def _model_hessians(model, batches, modules: dict, transform=lambda m, x: x) -> dict:
    H: dict = {}
    handles = _gram_hooks(modules, H, transform)
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    return H


def _reference_sequential(model, batches, spec: QuantSpec, act_order: bool) -> dict:
    """GPTQ block by block, written plainly: for each block and each sub-list of SEQUENCE, the
    whole model (earlier blocks and sub-lists already quantized) is run on every batch, each
    linear's X^T X summed, GPTQ applied and the dequantized weight written back."""
    codes = {}
    for i, block in enumerate(model.model.layers):
        for names in SEQUENCE:
            H = _model_hessians(model, batches, {n: block.get_submodule(n) for n in names})
            for n in names:
                lin = block.get_submodule(n)
                q = gptq(lin.weight.detach(), H[n], spec, act_order=act_order)
                with torch.no_grad():
                    lin.weight.copy_(dequantize(q))
                codes[f"model.layers.{i}.{n}.weight"] = q.codes
    return codes


@pytest.mark.parametrize("act_order", [True, False])  # the default, and without
def test_sequential_gptq_gives_the_codes_of_a_plain_block_by_block_reference(tokens, act_order):
    batches = _batches(tokens)
    model, ref = make_model("llama"), make_model("llama")
    report = _run_stage(model, batches, act_order=act_order, gptaq=0.0)  # plain GPTQ's targets
    # the default grid: zero points, MSE ranges
    want = _reference_sequential(ref, batches, QuantSpec(3, 32, False, "mse"), act_order)
    assert report["by_gptq"] == len(want) == 28 and report["by_rtn"] == 0
    for name, codes in want.items():
        owner = model.get_submodule(name.rpartition(".")[0])
        assert torch.equal(owner.weight_qcodes, pack(codes, 3)), name
        assert torch.equal(owner.weight, ref.get_submodule(name.rpartition(".")[0]).weight), name


def test_each_hessian_comes_from_the_quantized_model(tokens):
    """Block 2's Hessians are those of its inputs in the quantized model: its q_proj's from block 1
    quantized, its down_proj's from block 2's quantized gate and up (true-sequential)."""
    batches = _batches(tokens)
    model, dense = make_model("llama"), make_model("llama")
    seen: dict = {}
    _run_stage(model, batches, record=seen)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        mine = _model_hessians(model, batches, {name: model.get_submodule(name)})[name]
        theirs = _model_hessians(dense, batches, {name: dense.get_submodule(name)})[name]
        torch.testing.assert_close(seen[name + ".weight"], mine, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(seen[name + ".weight"], theirs, rtol=1e-3)  # not the dense model's


def _fips(tokens):
    model = make_model("llama")
    layershare.compress(model, Recipe(stages=[FiPSConfig(ratio=0.2, steps=0, batch_tokens=128, group_size=2)],
                                      nsamples=8, seqlen=32), data=tokens)
    return model


def test_a_shared_basis_sums_its_hessian_over_its_group(tokens):
    """Basis Sharing's gate basis of blocks 0-1 (read by "in" layers only): the sum over both
    blocks' gate of X^T X, each x from the quantized attention (the MLPs still float while the
    basis's Hessian is gathered)."""
    batches = _batches(tokens)
    model = make_model("llama")
    layershare.compress(model, Recipe(stages=[BasisSharingConfig(ratio=0.2, group_size=2)], nsamples=8, seqlen=32),
                        data=tokens)
    before = copy.deepcopy(model)
    seen: dict = {}
    _run_stage(model, batches, record=seen)
    with torch.no_grad():  # the model as the basis's Hessian saw it: quantized attention, float MLPs
        for i in (0, 1):
            for n in SEQUENCE[0] + SEQUENCE[1]:
                before.model.layers[i].get_submodule(n).weight.copy_(model.model.layers[i].get_submodule(n).weight)
    users = {f"{i}.gate": before.model.layers[i].mlp.gate_proj for i in (0, 1)}
    assert users["0.gate"].basis is users["1.gate"].basis
    H = _model_hessians(before, batches, users)
    (name,) = [n for n, m in model.named_modules() if m is model.model.layers[0].mlp.gate_proj.basis]
    torch.testing.assert_close(seen[name + ".U"], sum(H.values()), rtol=1e-6, atol=1e-6)
    assert all(h.diagonal().sum() > 0.05 * sum(H.values()).diagonal().sum() for h in H.values())


def test_a_basis_read_along_both_axes_is_rounded(tokens, capsys):
    """FiPS's U (gate and up read it along d, down along r): rounded to nearest, its V's by GPTQ
    (quant/inputs.py: GPTQ's updates along d were measured to hurt the "out" layers)."""
    model = _fips(tokens)
    bases = {n: m.U.detach().clone() for n, m in model.named_modules() if isinstance(m, SharedBasis)}
    seen: dict = {}
    report = _run_stage(model, _batches(tokens), record=seen)
    assert bases and not any(n.endswith(".U") for n in seen)
    assert report["by_rtn"] == len(bases) and report["by_gptq"] == 4 * 4 + 3 * 4  # attention 4 x 4, V's 3 x 4
    for n, U in bases.items():  # at the stage's basis_bits (8 by default; the V's and the attention at 3)
        owner = model.get_submodule(n)
        assert torch.equal(owner.U_qcodes, pack(quantize(U.t(), QuantSpec(8, 32, False, "mse")).codes, 8)), n
        assert model.layershare_quant["tensors"][n + ".U"]["bits"] == 8
    assert model.layershare_quant["bits"] == 3 and not any(
        "bits" in t for n, t in model.layershare_quant["tensors"].items() if not n.endswith(".U"))
    out = capsys.readouterr().out
    assert "round to nearest: 2 tensors (layershare_bases." in out and "; shared bases at 8 bits" in out


def test_v_reads_x_at_the_quantized_basis(tokens):
    """A V of role "in" gets the Hessian of z = x @ U with U already quantized."""
    batches = _batches(tokens)
    model = _fips(tokens)
    seen: dict = {}
    _run_stage(model, batches, record=seen)
    name = "model.layers.1.mlp.up_proj"
    layer = model.get_submodule(name)
    z = _model_hessians(model, batches, {name: layer}, transform=lambda m, x: x @ m.basis.U)[name]
    torch.testing.assert_close(seen[name + ".V_values"], z, rtol=1e-6, atol=1e-6)


def test_a_sparse_v_keeps_its_pattern_and_beats_rounding(tokens):
    """Masked GPTQ: the bitmask and the count of stored values unchanged, pruned entries exactly 0;
    on correlated inputs a lower output error than rounding the same values (a smaller gain than a
    dense weight's: the pruned entries absorb updates and hand them on, as in SparseGPT)."""
    model = _fips(tokens)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SharedBasisLinear)}
    masks = {n: (m.V_mask.clone(), m.V_values.numel()) for n, m in layers.items()}
    assert all(m.sparse and m.form == "compact" for m in layers.values())
    _run_stage(model, _batches(tokens))
    for n, m in layers.items():
        assert torch.equal(m.V_mask, masks[n][0]) and m.V_values.numel() == masks[n][1]
    g = torch.Generator().manual_seed(3)
    spec = QuantSpec(3, 16, True)
    for role in ("in", "out"):
        r, h = 32, 48
        V = torch.randn(r, h, generator=g) * (torch.rand(r, h, generator=g) < 0.5)
        layer = SharedBasisLinear(SharedBasis(torch.randn(56, r, generator=g)), V, role, sparse=True)
        layer.pack()
        t = Target("v", layer, "V_values", False, [Use(layer, 0, 0, "x")])
        n_in = r if role == "in" else h
        X = torch.randn(512, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)  # correlated inputs
        W = t.matrix()
        errors = []
        for q in (quantize(layer.V_values, spec), gptq_masked(W, X.t().double() @ X.double(), spec, t.stored())):
            assert q.codes.shape == layer.V_values.shape and q.scales.shape == (spec.groups(layer.V_values.numel()),)
            dense = torch.zeros(r * h).masked_scatter_((V != 0).flatten(), dequantize(q)).view(r, h)
            Wq = dense.t() if role == "in" else dense
            errors.append(float((X @ (W - Wq).t()).norm()))
        assert errors[1] < 0.95 * errors[0], (role, errors)  # measured: -7% for each role


def test_a_singular_hessian_stops_the_run_with_the_tensors_name(tokens, tmp_path):
    """damp 0 and 32 calibration tokens for 64 input features: no GPTQ, no NaN, no directory."""
    model = make_model("llama")
    recipe = Recipe(stages=[QuantConfig(bits=4, group_size=32, damp=0.0, algorithm="gptq")], nsamples=1, seqlen=32)
    with pytest.raises(ValueError, match=r"GPTQ on model\.layers\.0\.self_attn\.[qkv]_proj\.weight: .*singular"):
        layershare.compress(model, recipe, data=tokens, output_dir=tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_the_stage_says_what_it_did(tokens, capsys):
    layershare.compress(make_model("llama"), Recipe(stages=[QuantConfig(bits=3, group_size=32, embeddings=True, algorithm="gptq")],
                                                    nsamples=8, seqlen=32), data=tokens)
    out = capsys.readouterr().out
    assert "quant: 3-bit codes, groups of 32, asymmetric, MSE-searched ranges, sequential GPTQ (damp 0.01, blocksize 128" in out
    assert "GPTQ: 28 tensors (model.layers.*.self_attn.q_proj.weight x4" in out
    assert "round to nearest: 2 tensors (model.embed_tokens.weight, lm_head.weight)" in out


def test_units_cut_where_no_shared_tensor_spans_the_cut():
    from types import SimpleNamespace

    from layershare.quant.sequential import units

    spans = [{0}, {1, 2}, {2}, {4}, {5, 7}, {6}]
    assert units([SimpleNamespace(blocks=frozenset(s)) for s in spans]) == [[0], [1, 2], [3], [4], [5, 6, 7]]
    assert units([]) == []


def test_toward_float_is_the_least_squares_weight_for_the_quantized_inputs():
    """W' = W + W D H^-1 solves min ||W X - W' X~|| (damp 0); equal inputs leave W exactly; GPTQ of
    W' ends nearer the float output W X than GPTQ of W (GPTAQ's asymmetric calibration)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g)
    X = torch.randn(600, 40, generator=g) @ torch.randn(40, 40, generator=g)  # rows are tokens
    Xq = X + 0.3 * torch.randn(600, 40, generator=g) @ torch.randn(40, 40, generator=g)
    H, D = Xq.t().double() @ Xq.double(), (X - Xq).t().double() @ Xq.double()
    want = torch.linalg.lstsq(Xq.double(), X.double() @ W.double().t()).solution.t()
    torch.testing.assert_close(toward_float(W, H, D, percdamp=0.0), want.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(toward_float(W, H, D, percdamp=0.0, alpha=0.25), W + 0.25 * (want.float() - W),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(toward_float(W, H, torch.zeros_like(D)), W)
    spec = QuantSpec(3, 8, False)
    errors = [float((X @ W.t() - Xq @ dequantize(gptq(w, H, spec)).t()).norm())
              for w in (W, toward_float(W, H, D))]
    assert errors[1] < 0.85 * errors[0], errors  # measured: 0.79x
    with pytest.raises(ValueError, match="cross moment must be in x in"):
        toward_float(W, H, D[:3])
    few = Xq[:20]  # 20 tokens for 40 inputs, damp 0: refused as GPTQ refuses it, no W' computed
    with pytest.raises(SingularHessianError, match="singular after dampening"):
        toward_float(W, few.t().double() @ few.double(), D, percdamp=0.0)


def _cross_moments(model, float_model, batches, name: str):
    """D = (X - X~)^T X~ of `name`'s input: X in float_model, X~ in model (float32 products, float64 sums)."""
    got: dict = {}
    D = 0
    for b in batches:
        for key, m in (("float", float_model), ("quant", model)):
            handle = m.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, key=key: got.__setitem__(key, args[0].reshape(-1, args[0].shape[-1]).float()))
            with torch.no_grad():
                m(input_ids=b, use_cache=False)
            handle.remove()
        D = D + ((got["float"] - got["quant"]).t() @ got["quant"]).double()
    return D


def test_gptaq_gathers_the_cross_moment_with_the_float_model(tokens):
    """With gptaq > 0, block 0's q/k/v read the float model's inputs (D = 0: the codes of the
    plain stage); block 1's q_proj and down_proj get D = (X - X~)^T X~ against the float model."""
    batches = _batches(tokens)
    model, plain, float_model = make_model("llama"), make_model("llama"), make_model("llama")
    crosses: dict = {}
    method = Quantize(QuantConfig(**SPEC, gptaq=1.0))
    inner = method._quantize
    method._quantize = lambda t, H, D: (crosses.__setitem__(t.name, D.clone()), inner(t, H, D))[1]
    ctx = StageContext(stage=1, device="cpu", seed=0, store=StageStore(model, 1, "cpu"))
    method.compress(model, get_adapter(model), batches, None, ctx)
    _run_stage(plain, batches)
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.count_nonzero(crosses[f"model.layers.0.self_attn.{n}.weight"]) == 0
        owner = f"model.layers.0.self_attn.{n}"
        assert torch.equal(model.get_submodule(owner).weight_qcodes, plain.get_submodule(owner).weight_qcodes)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        want = _cross_moments(model, float_model, batches, name)
        assert want.abs().max() > 0
        torch.testing.assert_close(crosses[name + ".weight"], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_gptaq_keeps_fips_patterns_and_comes_nearer_the_float_model(tokens):
    """FiPS with gptaq 1: every V keeps its bitmask, the basis copies leave the model's U
    alone (rounded), and the logits end nearer the float model's than without."""
    batches = _batches(tokens)
    float_model = _fips(tokens)
    errors = []
    for gptaq in (0.0, 1.0):
        model = copy.deepcopy(float_model)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SharedBasisLinear)}
        masks = {n: m.V_mask.clone() for n, m in layers.items()}
        _run_stage(model, batches, gptaq=gptaq)
        assert all(torch.equal(m.V_mask, masks[n]) for n, m in layers.items())
        with torch.no_grad():
            errors.append(sum(float((model(input_ids=b).logits - float_model(input_ids=b).logits).norm())
                              for b in batches))
    assert errors[1] < 0.6 * errors[0], errors  # measured: 0.31x
