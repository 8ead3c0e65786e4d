"""The budget split over groups by a one-shot probe (compression/allocate.py, FiPS allocation="error")."""
import math

import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.adapters import get_adapter
from layershare.compression.allocate import FLOOR, common_slope, probe, split_by_error
from layershare.compression.drivers import Residency
from layershare.data.text import calibration_batches
from layershare.methods import build_method


def test_split_equalises_marginal_errors_within_bounds():
    removed, sizes, slope = [0.3, 0.3, 0.3, 0.3], [10, 10, 20, 10], 7.0
    total = sum(s * x for s, x in zip(sizes, removed))
    r = split_by_error(removed, sizes, [0.01, 0.03, 0.03, 0.002], slope, 0.5, 2.0)
    assert sum(s * x for s, x in zip(sizes, r)) == pytest.approx(total)
    assert r[1] < r[2] < r[0] < r[3]  # more error (per parameter), less removal
    # none clipped here: every group ends at one marginal error per parameter, e_g exp(b (r_g - r0)) / size_g
    marginal = [e * math.exp(slope * (x - r0)) / s for e, x, r0, s in zip([0.01, 0.03, 0.03, 0.002], r, removed, sizes)]
    assert max(marginal) == pytest.approx(min(marginal), rel=1e-6)
    # a nearly free group takes the most it may (twice), a costly one the least (half); the total holds
    r = split_by_error(removed, sizes, [0.01, 0.03, 0.03, 1e-6], slope, 0.5, 2.0)
    assert r[3] == pytest.approx(0.6) and r[1] == pytest.approx(0.15)
    assert sum(s * x for s, x in zip(sizes, r)) == pytest.approx(total)
    # equal errors per parameter: nothing moves
    assert split_by_error(removed, [10] * 4, [0.02] * 4, slope, 0.5, 2.0) == pytest.approx(removed)


def test_common_slope_is_the_median_and_needs_a_growing_error():
    errors = [[0.02, 0.01], [0.08, 0.02], [0.03, 0.03], [0.05, 0.0125]]
    removed = [[0.4, 0.3]] * 4
    slopes = sorted(math.log(a / b) / 0.1 for a, b in (errors[0], errors[1], errors[3]))
    assert common_slope(errors, removed) == pytest.approx(slopes[1])  # the flat group does not vote
    assert common_slope([[0.01, 0.02], [0.03, 0.03]], [[0.4, 0.3]] * 2) is None  # no group votes


def test_a_probe_whose_loss_never_grows_keeps_the_uniform_split_with_a_warning(tokens, monkeypatch):
    """A model where compressing more never costs more loss (flat probe) is compressed at the
    uniform plan, with a warning that says so, instead of failing midway."""
    from layershare.compression import allocate

    monkeypatch.setattr(allocate, "probe", lambda model, adapter, method, batches, groups, plans, *a, **k:
                        [[1e-3, 1e-3] for _ in groups])
    uniform = layershare.compress(make_model("llama"), small_recipe(ratio=0.2), data=tokens)
    with pytest.warns(allocate.NoSlopeWarning, match="do not grow with the removed fraction in any group; "
                                                     "the split stays uniform"):
        res = layershare.compress(make_model("llama"), small_recipe(ratio=0.2, allocation="error"), data=tokens)
    assert res.plan.groups == uniform.plan.groups


@pytest.fixture
def probed(tokens):
    """A tiny model probed at FiPS's two probe plans; its state before and after."""
    model = make_model("llama")
    adapter = get_adapter(model)
    config = small_recipe(ratio=0.2, allocation="error").stages[0]
    method = build_method(config)
    groups, plan = method.plan_for(model, adapter, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans = method.probe_plans(model, adapter, groups, plan.total_params, 4)
    batches = calibration_batches(tokens, 8, 32, 8, 0)
    errors = probe(model, adapter, method, batches, groups, plans, "cpu", Residency())
    return model, before, plans, errors


def test_the_probe_measures_both_plans_and_leaves_the_model_dense(probed):
    model, before, plans, errors = probed
    assert len(errors) == 2 and all(len(e) == 2 for e in errors)
    assert plans[1].model_ratio == pytest.approx(0.75 * plans[0].model_ratio, rel=0.02)
    assert all(e0 >= e1 >= FLOOR for e0, e1 in errors) and errors[0][0] > errors[0][1]  # more removed, more loss
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_error_allocation_gives_the_sensitive_group_less_and_keeps_the_ratio(probed, tokens, tmp_path):
    """The group whose one-shot compression raises the loss more removes less; the total is the
    ratio; what is saved is what was planned, and the same recipe makes the same plan."""
    *_, losses = probed
    recipe = small_recipe(ratio=0.2, allocation="error")
    res = layershare.compress(make_model("llama"), recipe, data=tokens, output_dir=tmp_path / "c")
    assert res.sizes.ratio == pytest.approx(0.2, abs=2e-3)
    removed = [1 - g.stored / g.dense for g in res.plan.groups]
    sensitive = 0 if losses[0][0] > losses[1][0] else 1
    assert removed[sensitive] < 0.8 * removed[1 - sensitive]
    assert layershare.Recipe.from_yaml(tmp_path / "c" / "recipe.yaml").stages[0].allocation == "error"
    again = layershare.compress(make_model("llama"), recipe, data=tokens)
    assert again.plan.groups == res.plan.groups


def test_error_allocation_is_refused_with_onload_before_any_work(tmp_path, tokens):
    from layershare.compression.onload import OnloadError, compress_checkpoint

    dense = tmp_path / "dense"
    make_model("llama").save_pretrained(dense)
    recipe = small_recipe(ratio=0.2, allocation="error")
    with pytest.raises(OnloadError, match="allocation 'error' probes every group on the whole model"):
        compress_checkpoint(dense, recipe, data=tokens, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
