"""Vision Transformers: HF ViT/DeiT (and timm where it imports), the block objective, fine-tuning."""
import copy

import pytest
import torch
import transformers as tf
from conftest import make_model, small_recipe

import layershare
from layershare.adapters import get_adapter
from layershare.compression.distill import distillation_loss
from layershare.compression.objectives import Objective
from layershare.config import RecipeError
from layershare.modules.shared_basis import SharedBasisLinear

VISION = ["vit", "deit"]


def make_vit(kind: str = "vit", seed: int = 0, layers: int = 4, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=128,
               image_size=16, patch_size=4, num_channels=3, num_labels=5, **kw)
    model = (tf.ViTForImageClassification(tf.ViTConfig(**cfg)) if kind == "vit"
             else tf.DeiTForImageClassification(tf.DeiTConfig(**cfg)))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def pixels():
    return torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def vit_recipe(method: str = "fips", **kw):
    base = dict(nsamples=32, **({"batch_tokens": 17 * 8} if method == "fips" else {}))
    base.update(kw)
    return small_recipe(method, **base)


@pytest.mark.parametrize("kind", VISION)
def test_adapter_finds_vit_blocks(kind):
    model = make_vit(kind)
    adapter = get_adapter(model)
    assert adapter.task == "image-classification" and adapter.objective == "block"
    assert len(adapter.blocks(model)) == 4
    assert [type(m).__name__ for m in adapter.mlp_linears(adapter.blocks(model)[0]).values()] == ["Linear"] * 2


@pytest.mark.parametrize("kind", VISION)
def test_full_rank_without_sparsity_reproduces_dense_logits(kind, pixels):
    model = make_vit(kind)
    with torch.no_grad():
        dense = model(pixel_values=pixels[:4]).logits
    res = layershare.compress(model, vit_recipe(sparsity=0.0, rank=32), data=pixels)
    assert sum(isinstance(m, SharedBasisLinear) for m in model.modules()) == 8
    with torch.no_grad():
        comp = model(pixel_values=pixels[:4]).logits
    torch.testing.assert_close(comp, dense, atol=2e-5, rtol=1e-5)
    assert all(g.stats.rel_err_before < 1e-10 for g in res.report.groups)


@pytest.mark.parametrize("ratio", [0.2, 0.33, 0.45])
def test_budget_hits_target_and_saved_bytes_agree(ratio, pixels, tmp_path):
    model = make_vit("deit")
    dense = sum(p.numel() for p in model.parameters())
    res = layershare.compress(model, vit_recipe(ratio=ratio), data=pixels, output_dir=tmp_path / "out")
    removed = res.sizes.dense_params - res.sizes.param_equivalents
    assert abs(removed - ratio * dense) <= 0.01 * dense
    on_disk = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert res.sizes.weight_bytes <= on_disk <= res.sizes.weight_bytes + 32_000


def test_block_objective_tunes_each_block_to_the_dense_block_output(pixels):
    """Block objective: inputs and targets are whole blocks (tokens kept together), and tuning
    lowers every group's error."""
    from layershare.compression.capture import arguments_independent, capture_inputs, run_group

    model = make_vit("vit")
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    assert arguments_independent(model, blocks, pixels[:8], "cpu", adapter)  # the capture may skip the blocks
    cap = capture_inputs(model, blocks, [pixels[:8], pixels[8:16]], "cpu", adapter)
    X, Y, out = run_group(blocks, [0, 1], cap, adapter, "cpu", record=True, objective=Objective("block", adapter))
    assert X[0].shape == (16, 17, 32) and Y[1].shape == (16, 17, 32)
    torch.testing.assert_close(X[1], Y[0])  # block 1 is fed block 0's dense output
    torch.testing.assert_close(torch.cat(out), Y[1])
    res = layershare.compress(model, vit_recipe(ratio=0.3, steps=30, lr=1e-3), data=pixels)
    assert all(g.stats.rel_err_after < g.stats.rel_err_before for g in res.report.groups)


@pytest.mark.parametrize("kind", VISION)
def test_save_load_identical_logits(kind, pixels, tmp_path):
    model = make_vit(kind)
    layershare.compress(model, vit_recipe(ratio=0.3), data=pixels, output_dir=tmp_path / "out")
    loaded = layershare.load(tmp_path / "out", runtime="compact")
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits,
                                   atol=0, rtol=0)


def test_block_objective_is_refused_for_causal_lms(tokens):
    with pytest.raises(RecipeError, match="objective 'block'"):
        layershare.compress(make_model("llama"), small_recipe(objective="block"), data=tokens)


def test_methods_that_need_a_language_model_are_refused_for_vit(pixels):
    with pytest.raises(RecipeError, match="ffn-merge.*causal-lm"):
        layershare.compress(make_vit(), vit_recipe(method="ffn-merge", ratio=0.2), data=pixels)


@pytest.mark.parametrize("method", ["basis-sharing", "svd-llm"])
def test_peers_run_on_vit(method, pixels, tmp_path):
    model = make_vit("deit")
    res = layershare.compress(model, vit_recipe(method=method, ratio=0.2), data=pixels, output_dir=tmp_path / "o")
    assert abs(res.sizes.ratio - 0.2) < 0.01
    loaded = layershare.load(tmp_path / "o", runtime="compact")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_finetune_lowers_distillation_loss_and_keeps_the_size(pixels):
    from layershare.checkpoint.sizes import measure
    from layershare.compression.distill import finetune

    teacher = make_vit("vit")
    student = copy.deepcopy(teacher)
    layershare.compress(student, vit_recipe(ratio=0.4, sparsity=0.5), data=pixels)  # rank below the width: room to recover
    nnz = [m.nnz() for m in student.modules() if isinstance(m, SharedBasisLinear)]
    size = measure(student, 1, 4).param_equivalents
    stats = finetune(student, teacher, pixels, torch.randint(0, 5, (32,)), steps=40, batch_size=8, lr=1e-3)
    assert stats.loss_after < 0.7 * stats.loss_before
    assert [m.nnz() for m in student.modules() if isinstance(m, SharedBasisLinear)] <= nnz
    assert all(m.packed for m in student.modules() if isinstance(m, SharedBasisLinear))
    assert measure(student, 1, 4).param_equivalents <= size


def test_finetune_works_for_causal_lms(tokens):
    from layershare.compression.distill import finetune

    teacher = make_model("llama")
    student = copy.deepcopy(teacher)
    layershare.compress(student, small_recipe(ratio=0.3), data=tokens)
    stats = finetune(student, teacher, tokens[:1024].view(32, 32), steps=30, batch_size=8, lr=1e-4)
    assert stats.loss_after < 0.8 * stats.loss_before


def test_distillation_loss_is_zero_for_identical_logits_and_adds_label_cross_entropy():
    z = torch.randn(4, 7, 11)
    assert float(distillation_loss(z, z, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(z, z + torch.randn_like(z))) > 0
    labels = torch.randint(0, 11, (4, 7))
    ce = torch.nn.functional.cross_entropy(z.reshape(-1, 11), labels.reshape(-1))
    assert float(distillation_loss(z, z, labels=labels, label_weight=0.5)) == pytest.approx(0.5 * float(ce), rel=1e-5)


@pytest.mark.parametrize("name,d,depth", [("deit-tiny", 192, 12), ("deit-small", 384, 12), ("deit-base", 768, 12)])
@pytest.mark.parametrize("ratio", [0.2, 0.33, 0.45])
def test_deit_shapes_budget_from_configs(name, d, depth, ratio):
    """The DeiT-Tiny/Small/Base shapes (random weights, built on the meta device): the plan for a
    whole-model ratio hits it within 1%."""
    from accelerate import init_empty_weights

    cfg = tf.DeiTConfig(hidden_size=d, num_hidden_layers=depth, num_attention_heads=d // 64,
                        intermediate_size=4 * d, image_size=224, patch_size=16, num_labels=1000)
    with init_empty_weights():
        model = tf.DeiTForImageClassification(cfg)
    (stage,) = layershare.plan(model, layershare.Recipe.of("fips", ratio=ratio))
    assert stage.plan.model_ratio == pytest.approx(ratio, abs=0.01)
    assert len(stage.groups) == depth // 2


def _timm():
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - timm needs torchvision, which does not work beside the CPU torch
        pytest.skip(f"timm cannot be imported here ({type(e).__name__}: {e}); install the [timm] extra")
    return timm


def test_timm_vit_full_rank_and_save_load(pixels, tmp_path):
    timm = _timm()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=4, num_heads=2, num_classes=5).eval()
    with torch.no_grad():
        dense = model(pixels[:4])
    layershare.compress(model, vit_recipe(sparsity=0.0, rank=32), data=pixels)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels[:4]), dense, atol=2e-5, rtol=1e-5)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=4, num_heads=2, num_classes=5).eval()
    res = layershare.compress(model, vit_recipe(ratio=0.3), data=pixels, output_dir=tmp_path / "t")
    assert abs(res.sizes.ratio - 0.3) < 0.01
    loaded = layershare.load(tmp_path / "t", runtime="compact")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), model(pixels), atol=0, rtol=0)


@pytest.fixture
def vit_dir_and_images(tmp_path):
    """A tiny ViT saved with its image processor, and an image folder of its 5 classes."""
    import numpy as np
    from PIL import Image

    labels = ["ant", "bee", "cat", "dog", "elk"]
    model = make_vit("vit")
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {v: k for k, v in enumerate(labels)}
    model.save_pretrained(tmp_path / "vit")
    tf.ViTImageProcessor(do_resize=True, size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(tmp_path / "vit")
    rng = np.random.default_rng(0)
    for c, name in enumerate(labels):
        for i in range(8):
            (tmp_path / "img" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{i}.png")
    return tmp_path / "vit", tmp_path / "img"


def test_cli_compress_eval_finetune_on_images(vit_dir_and_images, tmp_path, capsys):
    from layershare.cli import main

    vit, images = vit_dir_and_images
    out, ft = tmp_path / "c", tmp_path / "ft"
    assert main(["compress", str(vit), "--task", "image-classification", "--ratio", "0.3", "--calib", str(images),
                 "--nsamples", "20", "--steps", "5", "--output", str(out), "--eval-images", str(images)]) == 0
    text = capsys.readouterr().out
    import json

    meta = json.loads((out / "layershare.json").read_text())
    assert meta["sizes"]["ratio"] == pytest.approx(0.3, abs=0.01)
    assert f"{meta['sizes']['ratio']:.2%} fewer" in text  # the printed ratio is the measured one
    # the recorded and printed top-1 are those of the reloaded directory, and of the dense model
    prep = layershare.load_preprocessing(out)
    comp = layershare.evaluate_accuracy(layershare.load(out), prep, str(images))
    dense = layershare.evaluate_accuracy(layershare.load_model(str(vit))[0], prep, str(images))
    assert (meta["eval"]["top1"], meta["eval"]["dense_top1"]) == (comp.top1, dense.top1)
    assert f"top-1 on {images}: dense {dense.top1:.2%} -> compressed {comp.top1:.2%}" in text
    assert main(["eval", str(out), "--images", str(images)]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["finetune", str(out), "--data", str(images), "--steps", "10", "--batch-size", "8",
                 "--lr", "1e-3", "--output", str(ft)]) == 0
    text = capsys.readouterr().out
    assert "distillation loss" in text
    assert main(["info", str(ft)]) == 0
    assert "fine-tuned on" in capsys.readouterr().out
    # the fine-tuned directory is as small as the compressed one
    assert abs((ft / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size) < 4096


def test_cli_refuses_text_evaluation_for_an_image_model(vit_dir_and_images, tmp_path, capsys):
    from layershare.cli import main

    vit, images = vit_dir_and_images
    (tmp_path / "x.txt").write_text("some text " * 100)
    assert main(["compress", str(vit), "--calib", str(images), "--eval-text", str(tmp_path / "x.txt"),
                 "--output", str(tmp_path / "c")]) == 2
    assert "--eval-images" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_transformers4_vit_layout_is_recognised():
    """transformers < 5 kept ViT blocks at vit.encoder.layer with intermediate.dense / output.dense
    (the residual added inside `output`); a module tree of that shape gets the legacy adapter."""
    from types import SimpleNamespace

    from torch import nn

    from layershare.adapters.vit import VIT_LEGACY

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.intermediate_act_fn = nn.Linear(8, 32), nn.GELU()

    class Output(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(32, 8)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.intermediate, self.output = Intermediate(), Output()

    class Legacy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="vit")
            self.vit = nn.Module()
            self.vit.encoder = nn.Module()
            self.vit.encoder.layer = nn.ModuleList([Layer(), Layer()])

    model = Legacy()
    adapter = get_adapter(model)
    assert adapter is VIT_LEGACY
    block = adapter.blocks(model)[1]
    x = torch.randn(3, 8)
    expected = block.output.dense(torch.nn.functional.gelu(block.intermediate.dense(x)))
    torch.testing.assert_close(adapter.mlp_forward(block, x), expected)
    assert get_adapter(make_vit()).name == "vit"


def test_api_finetune_trains_where_the_model_is_unless_told(tokens, monkeypatch):
    """layershare.finetune passes the student's device to the training loop (it used to train on
    the CPU whatever the model's device), and an explicit device overrides it."""
    import layershare.compression.distill as distill

    seen = []
    monkeypatch.setattr(distill, "finetune", lambda *a, **kw: seen.append(kw["device"]) or distill.FinetuneStats(
        loss_before=1.0, loss_after=1.0, steps=1, seconds=0.0, curve=[1.0]))
    teacher = make_model("llama")
    student = copy.deepcopy(teacher).to("meta")  # a device other than the CPU, without a GPU
    layershare.finetune(student, teacher, tokens[:1024].view(1, -1), steps=1, batch_size=1, seqlen=32)
    layershare.finetune(student, teacher, tokens[:1024].view(1, -1), steps=1, batch_size=1, seqlen=32, device="cpu")
    assert seen == ["meta", "cpu"]
