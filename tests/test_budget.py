import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.compression.budget import BudgetError, GroupShape, plan, solve_group
from layershare.methods.fips import shared_svd


@pytest.mark.parametrize("d,hs", [(64, (160, 160, 160)), (576, (1536,) * 6), (768, (3072, 3072)),
                                  (640, (2048,) * 3), (192, (768, 768) * 4), (100, (130, 70))])
@pytest.mark.parametrize("keep,density", [(0.5, 0.5), (0.8, 0.25), (0.3, 1.0), (0.9, 0.5)])
def test_group_budget_hits_keep_fraction(d, hs, keep, density):
    shape = GroupShape(d=d, hs=hs)
    b = solve_group(shape, keep, density, bytes_per_param=4)
    assert abs(b.stored - keep * shape.dense) <= 0.01 * keep * shape.dense
    assert 0 < b.nnz <= b.rank * shape.H
    # stored = U once + nnz + bitmask
    assert b.stored == pytest.approx(d * b.rank + b.nnz + b.rank * shape.H / 32)


def test_rank_above_width_is_planned_and_initialised():
    """High keep at low density asks for r > d: U is zero-padded, V padded with scaled top rows."""
    shape = GroupShape(d=64, hs=(256, 256, 256, 256))
    b = solve_group(shape, keep=0.9, density=0.25, bytes_per_param=4)
    assert b.rank > 64
    mats = [torch.randn(64, h) for h in shape.hs]
    U, Vs = shared_svd(mats, b.rank)
    assert U.shape == (64, b.rank) and [v.shape for v in Vs] == [(b.rank, h) for h in shape.hs]
    # padding does not change the product: U V still reproduces W exactly
    for m, V in zip(mats, Vs):
        torch.testing.assert_close(U @ V, m, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(U[:, 64:]) == 0


def test_infeasible_ratio_names_the_feasible_range():
    shapes = [GroupShape(d=64, hs=(160, 160))]
    with pytest.raises(BudgetError, match=r"feasible range is 0\.000 < ratio < 0\.410"):
        plan(shapes, total_params=50_000, ratio=0.5, of="model", density=0.5, bytes_per_param=4)


@pytest.mark.parametrize("ratio_of", ["model", "mlp"])
@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_compressed_model_hits_target_and_saved_bytes_agree(ratio_of, ratio, tokens, tmp_path):
    model = make_model("llama")
    dense = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    res = layershare.compress(model, small_recipe(ratio=ratio, ratio_of=ratio_of), data=tokens,
                              output_dir=tmp_path / "out")
    target_removed = ratio * (dense if ratio_of == "model" else mlp)
    removed = res.sizes.dense_params - res.sizes.param_equivalents
    assert res.sizes.dense_params == dense
    assert abs(removed - target_removed) <= 0.01 * dense
    # what is on disk: stored values and bitmasks, plus only the safetensors header
    on_disk = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert res.sizes.weight_bytes <= on_disk <= res.sizes.weight_bytes + 32_000
    # and the model really holds fewer values than the dense one
    assert res.sizes.stored_values < dense


def test_deit_shapes_budget():
    """DeiT-Tiny/Small/Base MLP shapes (d, 4d) in groups of 4 blocks, 33% of MLP parameters."""
    for d in (192, 384, 768):
        shapes = [GroupShape(d=d, hs=(4 * d, 4 * d) * 4, n_bias=4 * (4 * d + d))] * 3
        p = plan(shapes, total_params=sum(s.dense for s in shapes) * 3 // 2, ratio=0.33, of="mlp",
                 density=0.5, bytes_per_param=4)
        assert p.mlp_ratio == pytest.approx(0.33, abs=0.01)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.66])
def test_width_density_puts_the_rank_at_the_width(keep):
    """Unclipped, the width rule's density gives every (equal) group rank d, the budget still hit."""
    from layershare.compression.budget import width_density

    shape = GroupShape(d=576, hs=(1536,) * 6)
    rho = width_density([shape] * 3, keep, 4, 0.01, 0.99)
    b = solve_group(shape, keep, rho, bytes_per_param=4)
    assert abs(b.rank - 576) <= 1
    assert abs(b.stored - keep * shape.dense) <= 0.001 * shape.dense
    assert width_density([shape], keep, 4, 0.5, 0.6) == min(0.6, max(0.5, rho))  # clipped to the range


def test_fips_default_sparsity_follows_the_width_rule():
    """FiPS with sparsity unset plans the rank at the model width within AUTO_SPARSITY (the
    ratio exact), and an explicit sparsity is kept as given."""
    from layershare.methods.fips import AUTO_SPARSITY

    model = make_model("llama")
    d = model.config.hidden_size
    for ratio in (0.1, 0.2, 0.3):
        p = layershare.plan(model, small_recipe(ratio=ratio))[-1].plan
        density = [g.density for g in p.groups]
        assert all(1 - AUTO_SPARSITY[1] - 0.01 <= x <= 1 - AUTO_SPARSITY[0] + 0.01 for x in density)
        assert p.model_ratio == pytest.approx(ratio, abs=2e-3)
        if all(1 - AUTO_SPARSITY[1] + 0.02 < x < 1 - AUTO_SPARSITY[0] - 0.02 for x in density):
            assert all(abs(g.rank - d) <= 1 for g in p.groups)
    fixed = layershare.plan(model, small_recipe(ratio=0.2, sparsity=0.5))[-1].plan
    assert all(g.density == pytest.approx(0.5, abs=0.02) for g in fixed.groups)


def test_allocation_splits_the_ratio_by_weight():
    """Per-group weights move the removal between groups; the stage's total stays the ratio, equal
    weights plan what no allocation plans, and each group gets its own width-rule sparsity."""
    model = make_model("llama")
    uniform = layershare.plan(model, small_recipe(ratio=0.2))[-1].plan
    assert layershare.plan(model, small_recipe(ratio=0.2, allocation=[2.0, 2.0]))[-1].plan.groups == uniform.groups
    p = layershare.plan(model, small_recipe(ratio=0.2, allocation=[1.0, 3.0]))[-1].plan
    assert p.model_ratio == pytest.approx(0.2, abs=2e-3) == uniform.model_ratio
    removed = [1 - g.stored / g.dense for g in p.groups]
    assert removed[1] / removed[0] == pytest.approx(3.0, rel=0.02)
    assert p.groups[0].density > uniform.groups[0].density > p.groups[1].density  # sparser where more goes


@pytest.mark.parametrize("allocation, match", [
    ([1.0], r"allocation has 1 weights for 2 groups"),
    ([1.0, 0.0], r"allocation weights must be positive"),
    ([1.0, float("nan")], r"allocation weights must be positive"),
    ([1.0, 500.0], r"would make groups \[2\] keep -\d+\.\d% of their parameters"),
])
def test_allocation_refusals_name_the_problem(allocation, match):
    with pytest.raises(BudgetError, match=match):
        layershare.plan(make_model("llama"), small_recipe(ratio=0.6, ratio_of="mlp", allocation=allocation))
    with pytest.raises(BudgetError, match="allocation splits a ratio over the groups"):
        layershare.plan(make_model("llama"), small_recipe(ratio=0.2, rank=16, allocation=[1.0, 2.0]))


def test_an_allocated_model_is_saved_and_reloaded_as_planned(tokens, tmp_path):
    from layershare.modules.shared_basis import SharedBasisLinear

    recipe = small_recipe(ratio=0.2, allocation=[1.0, 3.0])
    res = layershare.compress(make_model("llama"), recipe, data=tokens, output_dir=tmp_path / "c")
    groups = res.plan.groups
    assert res.sizes.ratio == pytest.approx(0.2, abs=2e-3)
    assert layershare.Recipe.from_yaml(tmp_path / "c" / "recipe.yaml").stages[-1].allocation == [1.0, 3.0]
    loaded = layershare.load(tmp_path / "c", runtime="compact")
    layers = [m for m in loaded.modules() if isinstance(m, SharedBasisLinear)]
    per_group = [sum(m.nnz() for m in layers[:6]), sum(m.nnz() for m in layers[6:])]
    assert per_group == [g.nnz for g in groups]
    assert [layers[0].v_shape[0], layers[6].v_shape[0]] == [g.rank for g in groups]
