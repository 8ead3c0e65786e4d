"""Run-time forms (runtime.py), V's sparsity patterns and the shared x @ U."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.compression.sparsity import is_nm
from layershare.config import RecipeError
from layershare.methods.fips import FiPSConfig
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.runtime import kernels
from layershare.runtime.forms import (
    RUNTIMES,
    factored_is_smaller,
    forms,
    resident_bytes,
    to_runtime,
)

FORMS = ["compact", "factored", "csr", "merged", "sparse", "auto"]


def _compressed(tmp_path, tokens, name, **fields):
    model = make_model("llama")
    # N:M rounds the tiny model's ranks to multiples of M: 21.2-21.3% removed for 20%
    res = layershare.compress(model, small_recipe(ratio=0.2, steps=5, **fields), data=tokens,
                              output_dir=tmp_path / name, allow_ratio_miss=":" in fields.get("pattern", ""))
    return model, res


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "none"])
def test_every_runtime_form_computes_the_tuned_function(pattern, tokens, input_ids, tmp_path):
    model, _ = _compressed(tmp_path, tokens, "c", pattern=pattern)
    for m in model.modules():  # the form the layers were tuned in: V times its mask
        if isinstance(m, SharedBasisLinear):
            m.to_form("train")
    with torch.no_grad():
        ref = model(input_ids).logits
    seen = set()
    for rt in FORMS:
        loaded = layershare.load(tmp_path / "c", runtime=rt)
        with torch.no_grad():
            out = loaded(input_ids).logits
        tol = 0 if rt in ("compact", "factored", "auto") and (rt != "auto" or pattern == "none") else 2e-5
        torch.testing.assert_close(out, ref, atol=tol * ref.abs().max().item(), rtol=0, msg=f"{pattern} {rt}")
        seen.add(tuple(sorted(forms(loaded).items())))
    assert len(seen) >= 3  # the forms really differ


def test_compact_form_holds_what_is_stored(tokens, tmp_path):
    _compressed(tmp_path, tokens, "c")
    compact = layershare.load(tmp_path / "c", runtime="compact")
    stored = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert abs(resident_bytes(compact) - stored) / stored < 0.05
    factored = layershare.load(tmp_path / "c", runtime="factored")
    assert resident_bytes(factored) > 1.05 * resident_bytes(compact)  # V's zeros are held there


def test_auto_picks_factored_only_where_it_is_smaller(tokens, tmp_path):
    _compressed(tmp_path, tokens, "none", pattern="none")
    _compressed(tmp_path, tokens, "u", pattern="unstructured")
    for name in ("none", "u"):
        compact = layershare.load(tmp_path / name, runtime="compact")
        bases = {id(m.basis): m.basis for m in compact.modules() if isinstance(m, SharedBasisLinear)}
        groups = {k: [m for m in compact.modules() if isinstance(m, SharedBasisLinear) and id(m.basis) == k]
                  for k in bases}
        smaller = [factored_is_smaller(bases[k], ls) for k, ls in groups.items()]
        n_layers = sum(len(ls) for ls in groups.values())
        auto = to_runtime(compact, "auto")
        assert forms(auto).get("factored", 0) == sum(len(groups[k]) for k, s in zip(groups, smaller) if s)
        assert n_layers == 12
    # dense V at 20%: rank well below d*H/(d+H), so factored; unstructured 50%: rank too high for
    # the factored form, so the sparse kernels where they are built (smaller than merged), else merged
    assert forms(layershare.load(tmp_path / "none")) == {"factored": 12}
    u = layershare.load(tmp_path / "u")
    assert forms(u) == ({"kernel": 12} if kernels.available() else {})
    assert hasattr(u, "layershare_bases") == kernels.available()  # merged: no basis left behind


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4)])
def test_nm_masks_are_nm_and_the_budget_counts_them(pattern, n, m, tokens, tmp_path):
    _, res = _compressed(tmp_path, tokens, "c", pattern=pattern)
    loaded = layershare.load(tmp_path / "c", runtime="factored")
    layers = [l for l in loaded.modules() if isinstance(l, SharedBasisLinear)]
    assert layers and all(is_nm(l.V, l.role, n, m) for l in layers)
    assert all(l.basis.rank % m == 0 for l in layers)
    for budget in res.report.plan.groups:
        assert budget.nnz == budget.rank * sum(l.v_shape[1] for l in layers[:6]) * n // m
    assert sum(int((l.V != 0).sum()) for l in layers) <= sum(b.nnz for b in res.report.plan.groups)
    assert sum(int((l.V != 0).sum()) for l in layers) >= 0.99 * sum(b.nnz for b in res.report.plan.groups)
    assert res.sizes.ratio >= 0.2  # the pattern fixes nnz: the group keeps at most what was asked


def test_dense_v_has_no_bitmask(tokens, tmp_path):
    _, res = _compressed(tmp_path, tokens, "c", pattern="none")
    assert res.sizes.index_bytes == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("V_mask") for k in f.keys())


def test_up_and_gate_share_one_projection_per_block(tokens, input_ids, tmp_path):
    _compressed(tmp_path, tokens, "c", pattern="none")
    model = layershare.load(tmp_path / "c", runtime="factored")
    bases = list(model.layershare_bases.values())
    for b in bases:
        b.projections = 0
    with torch.no_grad():
        first = model(input_ids).logits
        second = model(input_ids.flip(0)).logits  # another input: nothing stale is reused
    blocks_per_group = 2
    assert [b.projections for b in bases] == [2 * blocks_per_group] * len(bases)  # once per block per call
    torch.testing.assert_close(second, model(input_ids.flip(0)).logits, atol=0, rtol=0)
    assert not torch.equal(first, second)


def test_projection_cache_sees_in_place_changes():
    basis = SharedBasis(torch.randn(8, 4))
    x = torch.randn(3, 8)
    z = basis.project(x)
    assert basis.project(x) is z
    x.mul_(2)
    torch.testing.assert_close(basis.project(x), 2 * z)
    with torch.no_grad():
        basis.U.mul_(3)
    torch.testing.assert_close(basis.project(x), 6 * z)
    assert basis.projections == 3


def test_a_prompts_projection_lives_no_longer_than_its_input():
    """More than HOLD_ROWS rows (a prompt): z is reused while x lives, then dropped with it (each
    basis used to hold its last prompt's z after the forward: 35 MiB for SmolLM2 after 2048
    tokens). A decoding step's few rows stay cached until the next input."""
    import weakref

    basis = SharedBasis(torch.randn(8, 4))
    with torch.no_grad():  # (with grad, z's graph holds x, as training needs)
        x = torch.randn(2, SharedBasis.HOLD_ROWS, 8)  # 16 rows over a batch of 2
        z = basis.project(x)
        assert basis.project(x) is z and basis.projections == 1
        gone = weakref.ref(z)
        del x, z
        assert basis._z is None and gone() is None
        step = torch.randn(SharedBasis.HOLD_ROWS, 8)
        z = basis.project(step)
        del step, z
        assert basis._z is not None


def test_bad_runtime_and_pattern_are_refused(tokens, tmp_path):
    with pytest.raises(ValueError, match="unknown runtime 'fast'.*auto, compact, factored, csr, merged"):
        layershare.load(tmp_path / "missing", runtime="fast")
    assert RUNTIMES == ("auto", "compact", "factored", "csr", "merged", "sparse")
    from layershare.cli import (
        RUNTIMES as CLI_RUNTIMES,  # the CLI's copy (it starts without torch)
    )

    assert CLI_RUNTIMES == RUNTIMES
    with pytest.raises(RecipeError, match="pattern '2:4' fixes the sparsity at 0.5; got sparsity 0.3"):
        FiPSConfig(pattern="2:4", sparsity=0.3)
    with pytest.raises(RecipeError, match="pattern"):
        FiPSConfig(pattern="3:8")
    assert FiPSConfig(sparsity=0.6).resolved_pattern == "unstructured"
    assert FiPSConfig(pattern="1:4").density == 0.25


def test_a_merged_model_cannot_be_saved_or_finetuned(tokens, tmp_path):
    from layershare.checkpoint.verify import CheckpointError

    _compressed(tmp_path, tokens, "c", pattern="unstructured")
    merged = layershare.load(tmp_path / "c", runtime="merged")
    assert merged.layershare_merged == 12
    with pytest.raises(CheckpointError, match="12 of its compressed layers were merged.*runtime='compact'"):
        layershare.save_compressed(merged, tmp_path / "again") if hasattr(layershare, "save_compressed") else \
            __import__("layershare.checkpoint.save", fromlist=["x"]).save_compressed(merged, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(CheckpointError, match="cannot fine-tune"):
        layershare.finetune(merged, make_model("llama"), tokens)
