"""Which hidden states a group is tuned on: the dense model's, or the compressed model's so far."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
import layershare.compression.drivers.sequential as sequential
import layershare.compression.pipeline as pipeline
from layershare.api import _calibration


@pytest.mark.parametrize("propagate", ["dense", "compressed"])
def test_propagate_chooses_the_inputs_of_later_groups(propagate, tokens, monkeypatch):
    """Group g's recorded MLP inputs are the dense model's (propagate="dense") or exactly what
    the final compressed model feeds those MLPs (propagate="compressed"): later groups do not
    change earlier blocks, so the final model reproduces the inputs each group saw."""
    recipe = small_recipe(method="fips", ratio=0.3, group_size=2, steps=5, propagate=propagate)
    seen = []
    real = sequential.reconstruct

    def spy(fns, X, Y, *args, **kw):
        seen.append(X[0].clone())  # the first block of the group: its MLP's input rows
        return real(fns, X, Y, *args, **kw)

    monkeypatch.setattr(sequential, "reconstruct", spy)
    dense = make_model("llama")
    model = make_model("llama")
    layershare.compress(model, recipe, data=tokens)
    assert len(seen) == 2  # 4 blocks, groups of 2

    def mlp_inputs(m, block):
        rows = []
        hook = m.model.layers[block].mlp.register_forward_pre_hook(
            lambda mod, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for batch in _calibration(tokens, None, recipe, 8):
                m(batch)
        hook.remove()
        return torch.cat(rows)

    compressed_in, dense_in = mlp_inputs(model, 2), mlp_inputs(dense, 2)
    assert torch.allclose(seen[0], mlp_inputs(dense, 0))  # the first group always sees the dense inputs
    assert (compressed_in - dense_in).abs().max() > 1e-3  # the two choices differ here
    expected = compressed_in if propagate == "compressed" else dense_in
    assert torch.allclose(seen[1], expected, atol=1e-5)


# ---- drivers are chosen by what a method needs, never by its name ------------------------------

def test_driver_is_chosen_by_the_methods_needs():
    from layershare.compression.drivers import DRIVERS, driver_for
    from layershare.compression.drivers.sequential import run_sequential
    from layershare.compression.drivers.whole_model import run_whole_model
    from layershare.methods import METHODS, build_method, config_class

    for name, cls in METHODS.items():
        method = build_method(config_class(name)())
        assert type(method) is cls
        assert driver_for(method) is DRIVERS[method.needs().driver]
        # ffn-merge chooses its window by the whole model's loss; masa needs no data at all; quant
        # runs the whole model once (GPTQ's Hessians)
        whole = name in ("ffn-merge", "masa", "quant")
        assert driver_for(method) is (run_whole_model if whole else run_sequential), name


def test_driver_and_pipeline_sources_name_no_method():
    import inspect

    import layershare.compression.drivers as drivers
    import layershare.compression.drivers.base as base
    import layershare.compression.drivers.sequential as seq
    import layershare.compression.drivers.whole_model as whole
    from layershare.methods import METHODS

    for module in (seq, whole, base, drivers, pipeline):
        text = inspect.getsource(module)
        for name in METHODS:
            for quoted in (f'"{name}"', f"'{name}'"):
                assert quoted not in text, f"{module.__name__} names the method {quoted}"


# ---- callbacks and a two-stage recipe -----------------------------------------------------------

def two_stage_recipe():
    from layershare.methods import FiPSConfig, MASAConfig

    return layershare.Recipe(stages=[MASAConfig(ratio=0.5, ratio_of="attention"), FiPSConfig(ratio=0.2, steps=2)],
                             nsamples=8, seqlen=32)


def test_callbacks_see_every_stage_and_group_in_order(tokens):
    from layershare.compression.drivers import Callback

    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_stage_start(self, stage, method, plan):
            self.events.append(("stage_start", stage, method.name, plan))

        def on_group_start(self, stage, group, blocks):
            self.events.append(("group_start", stage, group, list(blocks)))

        def on_group_end(self, stage, group, report):
            self.events.append(("group_end", stage, group, report))

        def on_stage_end(self, stage, report):
            self.events.append(("stage_end", stage, report))

    rec = Recorder()
    result = layershare.compress(make_model("llama"), two_stage_recipe(), data=tokens, callbacks=[rec])
    report = result.report
    assert [s.method for s in report.stages] == ["masa", "fips"]
    expected = []
    for i, st in enumerate(report.stages):
        expected.append(("stage_start", i, st.method, st.plan))
        for g, gr in enumerate(st.groups):
            expected += [("group_start", i, g, gr.blocks), ("group_end", i, g, gr)]
        expected.append(("stage_end", i, st))
    assert [e[:3] for e in rec.events] == [e[:3] for e in expected]
    # masa runs in one whole-model call (no groups reported); fips in pairs of blocks
    assert len(report.stages[0].groups) == 0 and len(report.stages[1].groups) == 2
    assert set(report.stages[0].extra["weight_rel_err"]) == {f"group 0 self_attn.{p}_proj" for p in "qkvo"}
    for got, want in zip(rec.events, expected):
        if got[0] in ("group_end", "stage_end"):
            assert got[-1] is want[-1]  # the very objects in the report
        elif got[0] == "stage_start":
            assert got[3] is want[3]  # the stage's plan
        else:
            assert got[3] == want[3]  # the group's blocks


def test_two_stage_recipe_compresses_attention_and_mlps(tokens, input_ids, tmp_path):
    import json

    from layershare.modules.atoms import AtomLinear
    from layershare.modules.shared_basis import SharedBasisLinear

    model = make_model("llama")
    result = layershare.compress(model, two_stage_recipe(), data=tokens, output_dir=tmp_path / "c")
    for block in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(block.self_attn, name), AtomLinear), name
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(getattr(block.mlp, name), SharedBasisLinear), name
    # both stages plan on the dense model's parameter count; sizes.ratio counts every value stored
    # plus the bitmask of the sparse V (which the FiPS plan counts too)
    planned = sum(s.plan.model_ratio for s in result.report.stages)
    assert abs(result.sizes.ratio - planned) < 1e-6, (result.sizes.ratio, planned)
    loaded = layershare.load(tmp_path / "c", runtime="compact")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    bases = json.loads((tmp_path / "c" / "config.json").read_text())["layershare"]["bases"]
    assert bases and all(k.startswith(("s0_", "s1_")) for k in bases), list(bases)
    assert {k[:3] for k in bases} == {"s0_", "s1_"}


# ---- the closed-form update with propagate="compressed" ----------------------------------------

def test_closed_form_update_grams_follow_the_compressed_model(tokens, input_ids, monkeypatch):
    """svd-llm with update=True: group 1's update gram is exactly E[x x^T] of the inputs the final
    compressed model feeds its linears, for either propagate choice (both update on the model
    compressed so far); what propagate changes is the whitening gram (dense inputs, or the
    compressed model's), and so the compressed model."""
    import layershare.methods.svd as svd

    real = svd.lowrank_linear
    logits, grams = {}, {}
    for propagate in ("dense", "compressed"):
        dense = make_model("llama")
        model = make_model("llama")
        names = {id(m): n for n, m in model.named_modules()}
        calls = []

        def spy(module, role, rank, gram, *args, **kw):
            update = args[0] if args else kw.get("update_gram")
            calls.append((names[id(module)], gram, update))
            return real(module, role, rank, gram, *args, **kw)

        monkeypatch.setattr(svd, "lowrank_linear", spy)
        recipe = small_recipe(method="svd-llm", ratio=0.3, update=True, propagate=propagate,
                              stats_dtype="float64")  # compared with a float64 reference below
        layershare.compress(model, recipe, data=tokens)
        monkeypatch.setattr(svd, "lowrank_linear", real)
        by_name = {n: (g, u) for n, g, u in calls}
        assert len(by_name) == len(calls) == 12  # 4 blocks x 3 MLP linears, once each
        assert all(u is not None for _, _, u in calls)
        path = "model.layers.2.mlp.gate_proj"
        gram, update = by_name[path]

        def input_gram(m):
            xs = []
            hook = m.model.layers[2].mlp.gate_proj.register_forward_pre_hook(
                lambda mod, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
            with torch.no_grad():
                for batch in _calibration(tokens, None, recipe, 8):
                    m(batch)
            hook.remove()
            x = torch.cat(xs)
            return x.t() @ x / x.shape[0]

        final = input_gram(model)
        assert torch.allclose(update, final, rtol=1e-6, atol=1e-9)
        dense_gram = input_gram(dense)
        assert not torch.allclose(final, dense_gram, rtol=1e-3)  # group 0's compression changed group 1's inputs
        if propagate == "dense":
            assert torch.allclose(gram, dense_gram, rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(gram, update)  # one pass over the compressed model gives both
        with torch.no_grad():
            logits[propagate] = model(input_ids).logits
        grams[propagate] = (gram, update)
    assert not torch.allclose(logits["dense"], logits["compressed"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(grams["dense"][0], grams["compressed"][0], rtol=1e-3)  # whitening differs
    assert torch.allclose(grams["dense"][1], grams["compressed"][1], rtol=1e-6, atol=1e-9)  # update does not


# ---- never a broken model -----------------------------------------------------------------------

def test_non_finite_dense_weights_are_refused_before_any_work(tokens, tmp_path):
    from layershare.compression.finite import NonFiniteError

    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        layershare.plan(model, small_recipe())
    with pytest.raises(NonFiniteError, match="nothing was done"):
        layershare.compress(model, small_recipe(), data=tokens, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["fips", "masa"])
def test_a_group_that_comes_out_non_finite_stops_the_run_unsaved(method, tokens, tmp_path, monkeypatch):
    """A NaN produced by the compression itself (simulated: the method's result is poisoned)
    stops the run with an error naming the stage, the group and the tensor; nothing is written."""
    from layershare.compression.finite import NonFiniteError
    from layershare.methods import MASA, FiPS

    if method == "fips":
        real = FiPS.materialize

        def poisoned(self, comp):
            real(self, comp)
            layer = next(iter(comp.modules.values()))
            layer.basis.U.data[0, 0] = float("inf")

        monkeypatch.setattr(FiPS, "materialize", poisoned)
        recipe, where = small_recipe(ratio=0.3), r"stage 1 \(fips\), group 1 \(blocks \[0, 1\]\).*basis\.U"
    else:
        real = MASA.compress

        def poisoned(self, model, *a):
            out = real(self, model, *a)
            next(iter(model.layershare_bases.values())).atoms.data[0, 0, 0] = float("nan")
            return out

        monkeypatch.setattr(MASA, "compress", poisoned)
        recipe, where = small_recipe(method="masa", ratio=0.2), r"stage 1 \(masa\).*layershare_bases\.s0_g0_t0"
    with pytest.raises(NonFiniteError, match=where):
        layershare.compress(make_model("llama"), recipe, data=tokens, output_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
