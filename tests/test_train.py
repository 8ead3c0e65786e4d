import math

import torch

from layershare.compression.train import optimize


def _reference(params, steps, lr, loss_at, weight_decay, min_lr):
    """One AdamW over all parameters, stepped after the backward (what optimize must equal)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    for t in range(steps):
        loss = loss_at(t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_stepping_inside_the_backward_equals_one_optimiser_after_it():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 8, generator=g), torch.randn(64, 5, generator=g)
    a0, b0 = torch.randn(8, 3, generator=g), torch.randn(3, 5, generator=g)
    out = []
    for fn in (optimize, _reference):
        a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
        unused = torch.nn.Parameter(torch.ones(2))  # no gradient: never stepped (AdamW skips it too)
        loss_at = lambda t: ((X @ a @ b - Y) ** 2).mean() + (X @ a).pow(2).mean() * 1e-3  # a gets two paths
        fn([a, b, unused], 25, 1e-2, loss_at, weight_decay=0.1, min_lr=0.01)
        out.append((a, b, unused))
    (a1, b1, u1), (a2, b2, u2) = out
    # the same update; the fused per-parameter kernel may round differently in the last bit (AVX-512)
    for mine, ref in ((a1, a2), (b1, b2)):
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6), (mine - ref).abs().max()
    assert torch.equal(u1, torch.ones(2))
    assert not torch.equal(a1.detach(), a0)  # it trained
    assert a1.grad is None and b1.grad is None  # each gradient freed by its own step


def test_compute_dtype_resolution(monkeypatch):
    from layershare.compression import train

    assert train.compute_dtype("float32", "cpu") is None
    assert train.compute_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert train.compute_dtype("auto", "cpu") is None  # no bfloat16 hardware: float32, as before
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.compute_dtype("auto", "cpu") is torch.bfloat16


def test_bfloat16_tuning_reaches_the_float32_error(tokens):
    """Tuning with bfloat16 products (parameters, Adam and loss in float32) ends within 10% of the
    float32 tuning's error on the same group, and below its init."""
    import layershare
    from conftest import make_model, small_recipe

    errs = {}
    for dtype in ("float32", "bfloat16"):
        res = layershare.compress(make_model("llama"), small_recipe(ratio=0.1, steps=40, tune_dtype=dtype),
                                  data=tokens)
        errs[dtype] = [(g.stats.rel_err_before, g.stats.rel_err_after) for g in res.report.groups]
    for (b32, a32), (b16, a16) in zip(errs["float32"], errs["bfloat16"]):
        assert b16 == b32  # the same init (the error is measured in float32)
        assert a16 < b16 and abs(a16 - a32) <= 0.1 * a32
