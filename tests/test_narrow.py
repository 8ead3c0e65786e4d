"""Exactly-16-bit weights held at 16 bits by a float32 model (runtime/narrow.py)."""
import pytest
import torch
from conftest import make_model, small_recipe
from torch import nn

import layershare
from layershare.checkpoint.save import save_compressed
from layershare.checkpoint.verify import CheckpointError
from layershare.runtime import kernels, narrow
from layershare.runtime.kernels import ops
from layershare.runtime.narrow import Embedding16, Linear16, exact_narrow, narrow_model

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="the native kernels are not built")


def _round_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every weight rounded to `dtype` and held in float32 (a 16-bit source model loaded wide)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def _saved(tmp_path, tokens, dtype=torch.bfloat16, name="c"):
    model = _round_to(make_model("llama"), dtype) if dtype is not None else make_model("llama")
    layershare.compress(model, small_recipe(ratio=0.2, steps=5), data=tokens, output_dir=tmp_path / name)
    return tmp_path / name


@needs_kernel
def test_exact_16_bit_weights_are_held_narrow_and_compute_the_same(tokens, tmp_path):
    path = _saved(tmp_path, tokens)
    wide = layershare.load(path, runtime="compact")
    auto = layershare.load(path)  # runtime "auto"
    lin = [m for m in auto.modules() if isinstance(m, Linear16)]
    emb = [m for m in auto.modules() if isinstance(m, Embedding16)]
    n_attn = 4 * auto.config.num_hidden_layers
    assert len(emb) == 1 and len(lin) == n_attn + 1  # q, k, v, o per block, and the head
    assert all(m.weight16.dtype == torch.bfloat16 for m in lin + emb)
    assert auto.layershare_narrowed == n_attn + 2
    assert auto.dtype == torch.float32  # the first parameter is a norm's, not a 16-bit table
    g = torch.Generator().manual_seed(3)
    for rows in (1, 3, 8, 37):  # the kernel's rows, then the widened-scratch path
        ids = torch.randint(0, auto.config.vocab_size, (1, rows), generator=g)
        with torch.no_grad():
            a, w = auto(ids).logits, wide(ids).logits
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    ids = torch.randint(0, auto.config.vocab_size, (2, 5), generator=g)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(auto.generate(ids, **kw), wide.generate(ids, **kw))


@needs_kernel
def test_a_model_loaded_in_bfloat16_runs_its_16_bit_linears_and_bases_in_the_kernels(tokens, tmp_path, monkeypatch):
    """Loaded in bfloat16, each plain linear becomes a Linear16 on the same tensor (no copy) and each
    shared U is held for the kernels as it is: a few rows run the kernels (float32 sums, rounded to
    bfloat16), longer inputs PyTorch's bfloat16 GEMM as the dense layers do; the logits agree with
    the compact form in bfloat16 and a prompt's linears give the plain module's output exactly."""
    path = _saved(tmp_path, tokens)
    compact = layershare.load(path, runtime="compact", dtype=torch.bfloat16)
    auto = layershare.load(path, dtype=torch.bfloat16)
    lin = [m for m in auto.modules() if isinstance(m, Linear16)]
    assert len(lin) == 4 * auto.config.num_hidden_layers + 1 and all(m.weight16.dtype == torch.bfloat16 for m in lin)
    bases = [m for m in auto.modules() if type(m).__name__ == "SharedBasis"]
    assert bases and all(b.held and b.U16.dtype == torch.bfloat16 for b in bases)
    plain = dict(compact.named_modules())
    for name, m in auto.named_modules():  # the very weights the compact form holds, not rounded again
        if isinstance(m, Linear16):
            assert torch.equal(m.weight16, plain[name].weight)
    calls = []
    real = narrow.F.linear
    monkeypatch.setattr(narrow.F, "linear", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    g = torch.Generator().manual_seed(5)
    for rows in (1, 4, 8, 37):
        ids = torch.randint(0, auto.config.vocab_size, (1, rows), generator=g)
        calls.clear()
        with torch.no_grad():
            a = auto(ids).logits
            gemms = len(calls)
            c = compact(ids).logits
        assert a.dtype == torch.bfloat16
        # the kernels up to DECODE_ROWS rows, PyTorch's GEMM above
        assert gemms == (len(lin) if rows > ops.DECODE_ROWS else 0)
        torch.testing.assert_close(a.float(), c.float(), rtol=0.05, atol=0.05 * c.float().abs().max().item())
    x = torch.randn(37, lin[0].in_features).bfloat16()
    assert torch.equal(lin[0](x), torch.nn.functional.linear(x, lin[0].weight16))


@needs_kernel
def test_a_tied_embedding_and_head_share_one_16_bit_tensor(tokens, tmp_path):
    model = make_model("llama")  # a dense model: the MLPs' linears are narrowed too
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    _round_to(model, torch.bfloat16)
    n = narrow_model(model)
    assert isinstance(model.lm_head, Linear16) and isinstance(model.model.embed_tokens, Embedding16)
    assert model.lm_head.weight16.data_ptr() == model.model.embed_tokens.weight16.data_ptr()
    assert n == 7 * model.config.num_hidden_layers + 2


def test_weights_that_are_not_exactly_16_bit_stay_float32():
    w = torch.randn(16, 8)
    assert exact_narrow(w) is None
    assert exact_narrow(w.bfloat16().float()).dtype == torch.bfloat16
    # float16's extra mantissa bits: exact in float16, not in bfloat16
    h = (torch.randn(16, 8) * 0.1).half().float()
    assert not torch.equal(h.bfloat16().float(), h) and exact_narrow(h).dtype == torch.float16
    assert exact_narrow(w.double()) is None  # only float32 weights are narrowed
    model = make_model("llama")  # random float32 weights
    assert narrow_model(model) == 0 and not any(isinstance(m, (Linear16, Embedding16)) for m in model.modules())


def test_nothing_is_narrowed_without_the_kernels(tokens, tmp_path, monkeypatch):
    path = _saved(tmp_path, tokens)
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(narrow.kernels, "available", lambda: False)
    model = layershare.load(path)
    assert model.layershare_narrowed == 0
    assert not any(isinstance(m, (Linear16, Embedding16)) for m in model.modules())


@needs_kernel
def test_the_prefill_path_widens_a_slice_at_a_time(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 24, generator=g).bfloat16()
    b = torch.randn(50, generator=g)
    layer = Linear16(w, b)
    x = torch.randn(2, 9, 24, generator=g)  # 18 rows: the scratch path
    ref = x @ w.float().t() + b
    monkeypatch.setattr(narrow, "SCRATCH_FLOATS", 24 * 7)  # 7 rows of W per slice: 8 slices, the last short
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x[:, :4]), ref[:, :4], rtol=1e-6, atol=1e-6)  # 8 rows: the kernel


@needs_kernel
def test_a_narrowed_model_is_smaller_and_refuses_to_be_saved(tokens, tmp_path, monkeypatch):
    from layershare.runtime.forms import resident_bytes

    path = _saved(tmp_path, tokens)
    auto = layershare.load(path)
    held = {m.weight16.data_ptr(): m.weight16.numel() for m in auto.modules() if isinstance(m, (Linear16, Embedding16))}
    with monkeypatch.context() as m:
        m.setattr(narrow, "narrow_model", lambda model: 0)
        wide = layershare.load(path)
    assert wide.layershare_narrowed == 0
    # two bytes saved per narrowed weight, exactly: the kernels read a 16-bit weight whole (no
    # all-ones bitmask, no index: ops.all_kept)
    saved = resident_bytes(wide) - resident_bytes(auto)
    assert saved == 2 * sum(held.values())
    with pytest.raises(CheckpointError, match="narrowed to their exact 16-bit weights.*runtime='compact'"):
        save_compressed(auto, tmp_path / "again")
    assert not (tmp_path / "again").exists()


@needs_kernel
def test_from_pretrained_narrows_too_and_its_save_pretrained_refuses(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _saved(tmp_path, tokens)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # runtime "auto"
    assert hf.layershare_narrowed == 4 * hf.config.num_hidden_layers + 2
    ids = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = layershare.load(path, runtime="compact")(ids).logits
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(CheckpointError, match="narrowed"):
        hf.save_pretrained(tmp_path / "again")


@needs_kernel
def test_a_weight_tied_to_a_module_that_stays_wide_is_not_narrowed():
    """A head tied to an embedding subclass (Gemma-3's scaled one) stays float32: a 16-bit copy
    beside the embedding's float32 table would hold more, not less."""

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = make_model("llama")
    emb = model.model.embed_tokens
    model.model.embed_tokens = Scaled(emb.num_embeddings, emb.embedding_dim)
    model.lm_head.weight = model.model.embed_tokens.weight
    _round_to(model, torch.bfloat16)
    n = narrow_model(model)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is Scaled
    assert n == 7 * model.config.num_hidden_layers  # the blocks' linears only


@needs_kernel
def test_a_module_at_two_paths_is_replaced_at_both():
    model = _round_to(make_model("llama"), torch.bfloat16)
    shared = model.model.layers[0].self_attn.o_proj
    model.model.layers[1].self_attn.o_proj = shared  # one module, two paths
    narrow_model(model)
    a, b = model.model.layers[0].self_attn.o_proj, model.model.layers[1].self_attn.o_proj
    assert isinstance(a, Linear16) and a is b


@needs_kernel
def test_long_inputs_run_under_inference_mode_and_after_it():
    """A prompt widens a 16-bit weight into the thread's scratch buffer, made once per thread:
    made first under torch.inference_mode, it must still be writable outside it (it was not:
    `generate` under inference_mode, then a perplexity under no_grad, failed)."""
    import threading

    model = _round_to(make_model("llama"), torch.bfloat16)
    assert narrow_model(model) > 0
    ids = torch.randint(0, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    out = {}

    def run():  # a fresh thread: its first scratch buffer is made here, under inference_mode
        with torch.inference_mode():
            out["first"] = model(ids).logits.clone()
        with torch.no_grad():
            out["again"] = model(ids).logits

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert torch.equal(out["first"], out["again"])
