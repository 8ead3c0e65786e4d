"""Image folders, preprocessing, stratified sampling, label mapping and top-1/top-5 accuracy.

Tiny synthetic images written with PIL to tmp_path; tiny ViTs built from configs (no downloads).
"""
from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from layershare.data import assets as assets
from layershare.data.images import (
    ImageFolder,
    ImagePreprocessor,
    calibration_images,
    class_mapping,
    evaluation_batches,
    image_folder,
    load_image,
    stratified_indices,
)
from layershare.data.text import DataError
from layershare.evaluate.vision import accuracy


def write_image(path, size=(12, 10), mode="RGB", seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def folder(tmp_path):
    """bird: 2 images, cat: 4 (one in a nested folder, one .JPG), dog: 3; plus files to ignore."""
    root = tmp_path / "images"
    seed = 0
    for cls, names in {"cat": ["b.png", "a.png", "sub/c.bmp", "d.JPG"], "dog": ["x.png", "y.gif", "z.webp"],
                       "bird": ["1.tiff", "2.jpeg"]}.items():
        for name in names:
            seed += 1
            write_image(root / cls / name, seed=seed)
    (root / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "dog" / ".hidden" / "h.png")
    write_image(root / "loose.png")  # not in a class folder
    return root


def tiny_vit(num_channels: int, id2label: dict[int, str], seed: int = 0):
    torch.manual_seed(seed)
    config = tf.ViTConfig(image_size=8, patch_size=4, num_channels=num_channels, hidden_size=16,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          num_labels=len(id2label), id2label=id2label,
                          label2id={v: k for k, v in id2label.items()})
    model = tf.ViTForImageClassification(config).eval()
    with torch.no_grad():  # random init predicts nearly one class for every image; spread the logits
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return model


def save_vit(model, path, mean):
    old = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    try:
        processor = tf.ViTImageProcessor(do_resize=True, size={"height": 8, "width": 8}, image_mean=mean,
                                         image_std=[0.5] * len(mean))
    finally:
        tf.logging.set_verbosity(old)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ---- folders ------------------------------------------------------------------------------
def test_image_folder_scans_classes_and_images_sorted(folder):
    f = ImageFolder(folder)
    assert f.classes == ["bird", "cat", "dog"]
    rel = [(p.relative_to(folder).as_posix(), label) for p, label in f.samples]
    assert rel == [("bird/1.tiff", 0), ("bird/2.jpeg", 0),
                   ("cat/a.png", 1), ("cat/b.png", 1), ("cat/d.JPG", 1), ("cat/sub/c.bmp", 1),
                   ("dog/x.png", 2), ("dog/y.gif", 2), ("dog/z.webp", 2)]
    assert f.labels == [0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_empty_folders_are_errors_naming_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders") as e:
        ImageFolder(empty)
    assert str(empty) in str(e.value)
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images") as e:
        ImageFolder(no_images)
    assert str(no_images) in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def test_unreadable_image_is_an_error_naming_the_file(folder):
    bad = folder / "cat" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png") as e:
        load_image(bad)
    assert str(bad) in str(e.value)
    pre = ImagePreprocessor.from_timm_config({"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    with pytest.raises(DataError, match="broken.png"):
        list(evaluation_batches(folder, pre, batch_size=4))


def test_fmnist_alias_resolves_to_cached_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSHARE_CACHE", str(tmp_path))
    write_image(tmp_path / "fashion-mnist" / "test" / "Bag" / "00001.png", mode="L")
    assert image_folder("fmnist:test").root == tmp_path / "fashion-mnist" / "test"
    with pytest.raises(DataError, match="fmnist:train"):
        image_folder("fmnist:validation")
    with pytest.raises(assets.AssetError, match="train_fmnist_vit.py"):
        assets.fmnist_vit_dir()


def test_fashion_mnist_folder_decodes_idx_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSHARE_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 1, 0, 5, 3, 2, 4, 6, 7, 8, 9], dtype=np.uint8)

    def idx(name, array):
        header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        (raw / name).write_bytes(gzip.compress(header + array.tobytes()))

    for split, (img_name, lab_name) in assets.FMNIST_FILES.items():
        idx(img_name, images)
        idx(lab_name, labels)
    monkeypatch.setattr(assets, "_fmnist_raw", lambda: raw)
    root = assets.fashion_mnist_folder("test")
    assert root == tmp_path / "cache" / "fashion-mnist" / "test"
    assert sorted(p.name for p in root.iterdir()) == sorted(assets.FMNIST_CLASSES)  # no temporary left
    assert sorted(p.name for p in (root / "Ankle_boot").iterdir()) == ["00001.png", "00011.png"]
    assert np.array_equal(np.asarray(Image.open(root / "Ankle_boot" / "00011.png")), images[11])
    assert Counter(ImageFolder(root).labels) == Counter(
        sorted(assets.FMNIST_CLASSES).index(assets.FMNIST_CLASSES[y]) for y in labels)


# ---- sampling and labels -----------------------------------------------------------------
def test_stratified_indices_balance_and_determinism():
    labels = [0] * 30 + [1] * 30 + [2] * 30
    chosen = stratified_indices(labels, 12, seed=3)
    assert len(set(chosen)) == 12
    assert Counter(labels[i] for i in chosen) == {0: 4, 1: 4, 2: 4}
    assert chosen == stratified_indices(labels, 12, seed=3)
    assert chosen != stratified_indices(labels, 12, seed=4)
    # a small class gives what it has; the others share the rest as evenly as possible
    uneven = [0] * 10 + [1] * 2 + [2] * 10
    counts = Counter(uneven[i] for i in stratified_indices(uneven, 13, seed=0))
    assert counts[1] == 2 and sorted([counts[0], counts[2]]) == [5, 6]
    assert sorted(stratified_indices(uneven, 22, seed=0)) == list(range(22))
    with pytest.raises(DataError, match="only 22"):
        stratified_indices(uneven, 23, seed=0)


def test_class_mapping_by_name_id_and_mismatch_error():
    id2label = {0: "T-shirt/top", 1: "Trouser", 2: "Bag"}
    assert class_mapping(["bag", "T-shirt_top", "TROUSER"], id2label) == [2, 0, 1]
    assert class_mapping(["2", "0"], {"0": "a", "1": "b", "2": "c"}) == [2, 0]
    with pytest.raises(DataError) as e:
        class_mapping(["Bag", "Sneaker", "Coat"], id2label)
    message = str(e.value)
    assert "'Sneaker'" in message and "'Coat'" in message and "'Bag'" not in message.split("labels")[0]
    assert all(repr(label) in message for label in id2label.values())


# ---- preprocessing ------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_preprocessing_shapes_and_values(tmp_path, channels):
    images = [Image.new("RGB", (12, 10), (255, 255, 255)), Image.new("L", (9, 9), 255)]
    model_dir = save_vit(tiny_vit(channels, {0: "a", 1: "b"}), tmp_path / "vit", mean=[0.5] * channels)
    hf = ImagePreprocessor.from_pretrained(model_dir)
    assert hf.num_channels == channels and hf.mode == ("L" if channels == 1 else "RGB")
    pixels = hf(images)
    assert pixels.shape == (2, channels, 8, 8) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.ones_like(pixels), atol=1e-5)  # white: (1 - 0.5) / 0.5
    timm = ImagePreprocessor.from_timm_config({"input_size": (channels, 6, 6), "mean": [0.25] * channels,
                                               "std": [0.5] * channels, "interpolation": "bicubic",
                                               "crop_pct": 0.75})
    pixels = timm(images)
    assert pixels.shape == (2, channels, 6, 6)
    assert torch.allclose(pixels, torch.full_like(pixels, 1.5), atol=1e-5)  # (1 - 0.25) / 0.5


def test_timm_preprocessing_resizes_shorter_side_then_center_crops():
    # 8 wide, 4 high; columns 0..7 hold 0, 10, ..., 70. crop_pct 1: no resize, crop 4x4 from column 2
    arr = np.tile(np.arange(8, dtype=np.uint8) * 10, (4, 1))
    pre = ImagePreprocessor.from_timm_config({"input_size": (1, 4, 4), "mean": [0.0], "std": [1.0],
                                              "interpolation": "nearest", "crop_pct": 1.0})
    pixels = pre([Image.fromarray(arr)])
    assert torch.allclose(pixels[0, 0], torch.tensor(arr[:, 2:6] / 255.0, dtype=torch.float32))


# ---- calibration and accuracy -------------------------------------------------------------
def test_calibration_images_are_stratified_batches(folder):
    pre = ImagePreprocessor.from_timm_config({"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    batches = calibration_images(folder, pre, n=6, seed=0, batch_size=4)
    assert [b.shape for b in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]
    with pytest.raises(DataError, match="only 9"):
        calibration_images(folder, pre, n=10, seed=0, batch_size=4)


def test_accuracy_matches_hand_computed_argmax(folder, tmp_path):
    # the model's class order differs from the folder's: labels must be mapped by name
    id2label = {0: "dog", 1: "Bird", 2: "cat", 3: "fish", 4: "cow", 5: "hen", 6: "ant"}
    model = tiny_vit(3, id2label, seed=1)
    pre = ImagePreprocessor.from_pretrained(save_vit(model, tmp_path / "vit", mean=[0.5, 0.4, 0.3]))
    f = ImageFolder(folder)
    to_model = {"bird": 1, "cat": 2, "dog": 0}
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=pre([load_image(p)])).logits for p, _ in f.samples])
    truth = torch.tensor([to_model[f.classes[label]] for _, label in f.samples])
    expected = (logits.argmax(-1) == truth).float().mean().item()
    assert len(set(logits.argmax(-1).tolist())) > 1  # the check is not of a constant predictor
    top5_expected = (logits.topk(5, dim=-1).indices == truth[:, None]).any(-1).float().mean().item()
    result = accuracy(model, folder, pre, batch_size=4)
    assert result.n == 9
    assert result.top1 == pytest.approx(expected)
    assert result.top5 == pytest.approx(top5_expected)
    assert "all 9 images" in result.protocol and "id2label" in result.protocol and "top-5)" in result.protocol
    # a timm-style model (no config, returns a tensor) uses the folder's class order
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    with torch.no_grad():
        plain_logits = torch.cat([plain(pre([load_image(p)])) for p, _ in f.samples])
    plain_expected = (plain_logits.argmax(-1) == torch.tensor(f.labels)).float().mean().item()
    plain_result = accuracy(plain, folder, pre, batch_size=5)
    assert plain_result.top1 == pytest.approx(plain_expected)
    assert "folder class order" in plain_result.protocol
    subset = accuracy(model, folder, pre, max_images=6)
    assert subset.n == 6 and "6 of 9 images" in subset.protocol


def test_preprocessing_saves_and_loads_back(tmp_path):
    images = [Image.fromarray(np.random.default_rng(0).integers(0, 256, (11, 13, 3), dtype=np.uint8))]
    model_dir = save_vit(tiny_vit(3, {0: "a", 1: "b"}), tmp_path / "vit", mean=[0.5, 0.4, 0.3])
    timm = ImagePreprocessor.from_timm_config({"input_size": (3, 8, 8), "mean": (0.5, 0.4, 0.3),
                                               "std": (0.2, 0.3, 0.4), "interpolation": "bicubic", "crop_pct": 0.875})
    for pre, where in [(ImagePreprocessor.from_pretrained(model_dir), tmp_path / "hf"), (timm, tmp_path / "timm")]:
        where.mkdir()
        if where.name == "hf":
            tiny_vit(3, {0: "a", 1: "b"}).config.save_pretrained(where)  # num_channels lives in config.json
        pre.save_pretrained(where)
        again = ImagePreprocessor.load(where)
        assert again.num_channels == 3 and torch.equal(again(images), pre(images))
    with pytest.raises(DataError, match="preprocessor_config.json"):
        ImagePreprocessor.load(tmp_path)
