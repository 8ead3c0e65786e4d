"""Calibration statistics where the forward runs (capture.run_group's stats_device and stats_dtype,
the recipe's `stats_dtype`), the tuning loop's deferred loss reads, the refusal of a CUDA device
that is not there, and a compressor that imports no optional library it does not use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, make_model, small_recipe

import layershare
from layershare.adapters import get_adapter
from layershare.compression.capture import capture_inputs, run_group
from layershare.compression.drivers.sequential import record_device
from layershare.compression.train import optimize
from layershare.config import RecipeError

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _group_stats(tokens, stats_dtype=torch.float64):
    """Block 0 of a tiny Llama run on 4 calibration batches: its MLP linears' second moments as
    run_group accumulates them (batch by batch), and every input each linear saw."""
    model = make_model("llama")
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    batches = list(tokens[:4 * 2 * 32].view(4, 2, 32))
    cap = capture_inputs(model, blocks, batches, "cpu", adapter)
    prefix = adapter.blocks_path(model)
    linears = {f"{prefix}.0.{name}": m for name, m in blocks[0].named_modules() if name in adapter.linears}
    seen = {path: [] for path in linears}
    hooks = [m.register_forward_pre_hook(lambda m, a, path=path: seen[path].append(a[0].reshape(-1, a[0].shape[-1])))
             for path, m in linears.items()]
    grams: dict[str, torch.Tensor] = {}
    try:
        run_group(blocks, [0], cap, adapter, "cpu", record=False, grams=grams, linears=linears,
                  stats_device="cpu", stats_dtype=stats_dtype)
    finally:
        for h in hooks:
            h.remove()
    return grams, {path: torch.cat(xs) for path, xs in seen.items()}


def test_chunked_second_moments_equal_the_one_shot_float64_product(tokens):
    """The second moment summed batch by batch (4 batches) is the one product over all the rows,
    in float64, to its rounding; every linear of the MLP has one, on the statistics' device."""
    grams, inputs = _group_stats(tokens)
    assert set(grams) == set(inputs) and len(grams) == 3  # gate, up, down
    for path, x in inputs.items():
        x64 = x.double()
        one_shot = x64.t() @ x64 / x64.shape[0]
        assert grams[path].dtype == torch.float64 and grams[path].device.type == "cpu"
        torch.testing.assert_close(grams[path], one_shot, rtol=1e-12, atol=1e-14)


def test_float32_second_moments_within_their_bound(tokens):
    """Accumulated in float32 (the recipe's stats_dtype="float32"), the second moment stays within
    a relative Frobenius error of 1e-6 of the float64 one, on a realistic activation matrix:
    8,192 tokens x 1,024 channels, correlated channels with log-normal scales, 8 outlier channels
    50x larger and a mean offset (what an MLP's input looks like), and their gated product (a
    down projection's input), summed in chunks of 2,048 rows as batches are. Measured here:
    4e-8 and 7e-8. The same holds through run_group on a tiny model."""
    g = torch.Generator().manual_seed(0)
    n, w, chunk = 8192, 1024, 2048
    mix = torch.randn(w, w, generator=g) / w ** 0.5
    scale = torch.exp(torch.randn(w, generator=g))
    scale[torch.randperm(w, generator=g)[:8]] *= 50
    a = (torch.randn(n, w, generator=g) @ mix) * scale + 0.5 * scale
    b = torch.randn(n, w, generator=g) @ mix
    for x in (a, torch.nn.functional.silu(a) * b):
        exact = x.double().t() @ x.double()
        acc = torch.zeros(w, w)
        for i in range(0, n, chunk):
            acc.addmm_(x[i:i + chunk].t(), x[i:i + chunk])
        assert float((acc.double() - exact).norm() / exact.norm()) <= 1e-6
    g32, _ = _group_stats(tokens, torch.float32)
    g64, _ = _group_stats(tokens, torch.float64)
    for path in g64:
        assert g32[path].dtype == torch.float32
        assert float((g32[path].double() - g64[path]).norm() / g64[path].norm()) <= 1e-6


def test_the_recipe_stats_dtype_reaches_the_init(tokens, monkeypatch):
    """Recipe(stats_dtype=...) is the dtype of the statistics FiPS's init gets (on the recipe's
    device); the float32 result is the float64 one to within a small change of the error."""
    from layershare.methods import fips

    seen = []
    real = fips.whitened_shared_svd

    def spy(mats, roles, grams, rank):
        seen.append({(g.dtype, g.device.type, m.device.type) for g, m in zip(grams, mats)})
        return real(mats, roles, grams, rank)

    monkeypatch.setattr(fips, "whitened_shared_svd", spy)
    errors = {}
    for dtype in ("float64", "float32"):
        seen.clear()
        model = make_model("llama")
        result = layershare.compress(model, small_recipe(stats_dtype=dtype, nsamples=4), data=tokens,
                                     allow_ratio_miss=True)
        assert seen and all(s == {(getattr(torch, dtype), "cpu", "cpu")} for s in seen)
        errors[dtype] = [g.stats.rel_err_after for g in result.report.groups]
    assert errors["float32"] == pytest.approx(errors["float64"], rel=1e-3)
    assert layershare.Recipe.from_dict(small_recipe(stats_dtype="float32").to_dict()).stats_dtype == "float32"
    with pytest.raises(RecipeError, match="stats_dtype"):
        small_recipe(stats_dtype="float16")


def test_the_statistics_are_freed_with_their_group(tokens, monkeypatch):
    """Every second moment the driver accumulated for a group is gone when the group ends (no
    group's statistics live beside the next group's)."""
    import weakref

    from layershare.compression.drivers import sequential

    refs: list[weakref.ref] = []
    real = sequential.run_group

    def spy(*a, **kw):
        out = real(*a, **kw)
        refs.extend(weakref.ref(g) for g in (kw.get("grams") or {}).values())
        return out

    class Check(layershare.Callback):
        ends = 0

        def on_group_end(self, stage, group, report):
            assert refs and all(r() is None for r in refs), "a group's statistics outlived it"
            refs.clear()
            Check.ends += 1

    monkeypatch.setattr(sequential, "run_group", spy)
    layershare.compress(make_model("llama"), small_recipe(steps=2, group_size=1, nsamples=4), data=tokens,
                        callbacks=[Check()], allow_ratio_miss=True)
    assert Check.ends == 4


def test_activations_are_kept_on_the_cpu_when_the_forward_is_there(tokens):
    model = make_model("llama")
    adapter = get_adapter(model)
    cap = capture_inputs(model, adapter.blocks(model), list(tokens[:64].view(2, 1, 32)), "cpu", adapter)
    assert record_device("cpu", cap, 2) == "cpu"


def test_losses_read_every_few_steps_are_every_step_s():
    """optimize reads the loss every `read_every` steps (no host sync per step on a GPU); the
    curve it returns still holds every step's loss, in order."""
    p = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    target = torch.tensor([1.0, 1.0])
    seen = []

    def loss_at(t):
        loss = (p - target).pow(2).sum()
        seen.append(float(loss.detach()))
        return loss

    curve = optimize([p], 23, 0.1, loss_at, read_every=10)
    assert curve == seen and len(curve) == 23


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_refused_in_one_line_where_there_is_none(tmp_path):
    """The issue's command (`compress M --method fips --ratio 0.2 --onload --device cuda`) on a
    machine without CUDA: exit status 2 and one line, before any model is read."""
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 4)
    model = tmp_path / "dense"
    make_model("llama").save_pretrained(model)
    env = {**os.environ, "PYTHONPATH": SRC}
    run = subprocess.run([sys.executable, "-m", "layershare", "compress", str(model), "--method", "fips", "--ratio",
                          "0.2", "--onload", "--device", "cuda", "--calib", str(tmp_path / "calib.txt"),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no such CUDA device" in lines[0] and "--device cpu" in lines[0]
    assert not (tmp_path / "out").exists()


LEAN = """
import json, sys, torch, transformers
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256)).eval()
before = set(sys.modules)
import layershare
recipe = layershare.Recipe.of("fips", ratio=0.3, steps=1, nsamples=2, seqlen=32)
layershare.compress(model, recipe, data=torch.randint(0, 128, (512,)), allow_ratio_miss=True)
print(json.dumps(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""
OPTIONAL = {"sklearn", "scipy", "lm_eval", "datasets", "evaluate", "pandas", "matplotlib", "numba", "rdata",
            "torchvision", "timm"}


def test_the_compressor_imports_no_optional_library():
    """`import layershare; layershare.compress(...)` with FiPS imports none of the libraries that only
    an evaluation, a data source or another method needs (beyond what transformers' model did)."""
    run = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    new = set(json.loads(run.stdout.strip().splitlines()[-1]))
    assert not new & OPTIONAL, sorted(new & OPTIONAL)
