"""Images for calibration and evaluation: an image folder, the model's preprocessing, labels.

An image source is
  - a path to an ImageFolder-style directory: one sub-folder per class (class names sorted),
    every image file under it (png, jpg, jpeg, bmp, gif, webp, tif, tiff; sorted),
  - `fmnist:train` / `fmnist:test`: Fashion-MNIST, fetched from Debian's archive and decoded
    once into such a folder (assets.py).

Preprocessing comes from the model itself: `ImagePreprocessor.from_pretrained(model_dir)` wraps
the directory's transformers image processor (the PIL one when torchvision is absent), and
`ImagePreprocessor.from_timm_config(data_config)` reproduces timm's evaluation transform (resize
the shorter side to size / crop_pct, center crop, scale to [0, 1], normalize) with PIL and numpy.
Images are converted to "L" for a one-channel model and to "RGB" for a three-channel one.

An image that cannot be read is an error (a `DataError` naming the file), not skipped: a
silently smaller set would change what a calibration or an accuracy is measured on.

Folder classes are matched to the model's classes by name (`class_mapping`): case-insensitive,
then ignoring punctuation and spaces when that is unambiguous, or a folder named by the class's
integer id. A folder class the model does not know is an error.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from layershare.data.text import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ALIASES = {"fmnist:train": "train", "fmnist:test": "test"}


# ---- folders ------------------------------------------------------------------------------
class ImageFolder:
    """An ImageFolder-style directory: `root/CLASS/.../IMAGE`, classes and files sorted by name."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"image folder {str(self.root)!r} has no class sub-folders "
                            f"(expected {self.root}/CLASS/IMAGE files)")
        self.classes: list[str] = [p.name for p in class_dirs]
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for index, folder in enumerate(class_dirs):
            files = sorted(p for p in folder.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(folder).parts))
            if not files:
                empty.append(folder.name)
            self.samples.extend((p, index) for p in files)
        if not self.samples:
            raise DataError(f"image folder {str(self.root)!r} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
        if empty:
            raise DataError(f"image folder {str(self.root)!r}: class sub-folder(s) without images: "
                            f"{', '.join(empty)}")

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}: {len(self.samples):,} images, {len(self.classes)} classes)"


def image_folder(source: str | Path | ImageFolder) -> ImageFolder:
    """The folder behind an image source: a path, `fmnist:train`/`fmnist:test`, or an ImageFolder."""
    if isinstance(source, ImageFolder):
        return source
    src = str(source)
    if src.startswith("fmnist:"):
        if src not in ALIASES:
            raise DataError(f"unknown image source {src!r}; Fashion-MNIST sources: {', '.join(ALIASES)}")
        from layershare.data.assets import fashion_mnist_folder

        return ImageFolder(fashion_mnist_folder(ALIASES[src]))
    return ImageFolder(src)


def load_image(path: str | Path, mode: str | None = None):
    """The image at `path` as a PIL image (converted to `mode`); a DataError naming the file if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode and img.mode != mode else img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {str(path)!r}: {e}") from e


# ---- preprocessing ------------------------------------------------------------------------
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at ERROR (no "ViTImageProcessor requires torchvision ... falling back" warning)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


class ImagePreprocessor:
    """PIL images -> float tensor (N, C, H, W), as the model was trained to see them.

    Build it with `from_pretrained(model_dir)` (the directory's transformers image processor)
    or `from_timm_config(data_config)` (timm's evaluation transform, PIL + numpy only).
    """

    def __init__(self, fn, num_channels: int, description: str):
        if num_channels not in (1, 3):
            raise DataError(f"only 1- or 3-channel models are supported, this one has {num_channels} channels")
        self._fn = fn
        self.num_channels = num_channels
        self.mode = "L" if num_channels == 1 else "RGB"
        self.description = description

    def __call__(self, images: Sequence) -> torch.Tensor:
        if len(images) == 0:
            raise DataError("no images to preprocess")
        images = [img if img.mode == self.mode else img.convert(self.mode) for img in images]
        pixels = self._fn(images)
        if pixels.ndim != 4 or pixels.shape[1] != self.num_channels:
            raise DataError(f"preprocessing ({self.description}) gave pixels of shape {tuple(pixels.shape)}, "
                            f"expected (N, {self.num_channels}, H, W)")
        return pixels.float()

    def __repr__(self) -> str:
        return f"ImagePreprocessor({self.description})"

    def save_pretrained(self, folder: str | Path) -> None:
        """Write what rebuilds it beside a saved model: the transformers processor's
        preprocessor_config.json, or timm's data config (timm_data_config.json)."""
        saver = getattr(self, "_saver", None)
        if saver is None:
            raise DataError(f"{self!r} was not built by from_pretrained/from_timm_config and cannot be saved")
        saver(folder)

    @classmethod
    def load(cls, folder: str | Path) -> "ImagePreprocessor":
        """What save_pretrained wrote: a transformers processor, or a timm data config."""
        folder = Path(folder)
        if (folder / TIMM_CONFIG).is_file():
            return cls.from_timm_config(json.loads((folder / TIMM_CONFIG).read_text()))
        return cls.from_pretrained(folder)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ImagePreprocessor":
        """The image processor saved with a transformers model (preprocessor_config.json)."""
        from transformers import AutoConfig, AutoImageProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "preprocessor_config.json").is_file():
            raise DataError(f"{str(model_dir)!r} has no preprocessor_config.json: the model's image "
                            "preprocessing is unknown (save its image processor with save_pretrained)")
        with _quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
            config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False) if (model_dir / "config.json").is_file() else None
        channels = getattr(config, "num_channels", None)
        if channels is None:
            mean = getattr(processor, "image_mean", None)
            channels = len(mean) if isinstance(mean, (list, tuple)) else 3
        channels = int(channels)
        from transformers.image_utils import ChannelDimension

        def run(images):
            arrays = [np.asarray(img).reshape(img.height, img.width, channels) for img in images]
            with _quiet_transformers():
                out = processor(arrays, return_tensors="pt", input_data_format=ChannelDimension.LAST)
            return out["pixel_values"]

        parts = [type(processor).__name__]
        if getattr(processor, "do_resize", False):
            parts.append(f"resize {dict(processor.size)}")
        if getattr(processor, "do_center_crop", False):
            parts.append(f"center crop {dict(processor.crop_size)}")
        if getattr(processor, "do_rescale", False):
            parts.append(f"rescale x{processor.rescale_factor:.6g}")
        if getattr(processor, "do_normalize", False):
            parts.append(f"normalize mean {_fmt(processor.image_mean)} std {_fmt(processor.image_std)}")
        pre = cls(run, channels, f"{', '.join(parts)}; {channels} channel(s); from {model_dir}")
        pre._saver = processor.save_pretrained
        return pre

    @classmethod
    def from_timm_config(cls, data_config: Mapping) -> "ImagePreprocessor":
        """timm's evaluation transform from `timm.data.resolve_data_config(...)`'s dict.

        Keys: input_size (C, H, W), mean, std, interpolation (bilinear, bicubic, ...),
        crop_pct. The shorter side is resized to floor(size / crop_pct) (a non-square input is
        resized to floor(H / crop_pct) x floor(W / crop_pct)), then center-cropped to (H, W).
        """
        missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
        if missing:
            raise DataError(f"timm data config lacks {', '.join(missing)} (has {', '.join(map(str, data_config))})")
        channels, height, width = (int(v) for v in data_config["input_size"])
        mean = np.asarray(data_config["mean"], dtype=np.float32).reshape(-1)
        std = np.asarray(data_config["std"], dtype=np.float32).reshape(-1)
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise DataError(f"timm data config: mean {mean.tolist()} / std {std.tolist()} do not fit {channels} channels")
        interpolation = str(data_config.get("interpolation", "bilinear")).lower()
        if interpolation not in _PIL_RESAMPLE:
            raise DataError(f"unknown interpolation {interpolation!r}; known: {', '.join(_PIL_RESAMPLE)}")
        resample = _PIL_RESAMPLE[interpolation]
        crop_pct = float(data_config.get("crop_pct") or 1.0)
        if height == width:
            scale = math.floor(height / crop_pct)
        else:
            scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        mean_, std_ = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)

        def one(img):
            w, h = img.size
            if isinstance(scale, int):  # torchvision Resize(int): shorter side to `scale`, aspect kept
                if w <= h:
                    size = (scale, int(scale * h / w))
                else:
                    size = (int(scale * w / h), scale)
            else:
                size = (scale[1], scale[0])
            if size != (w, h):
                img = img.resize(size, resample=resample)
            w, h = img.size
            if w < width or h < height:
                raise DataError(f"image of {w}x{h} after resizing is smaller than the crop {width}x{height}")
            top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
            img = img.crop((left, top, left + width, top + height))
            arr = np.asarray(img, dtype=np.float32).reshape(height, width, channels).transpose(2, 0, 1) / 255.0
            return (arr - mean_) / std_

        def run(images):
            return torch.from_numpy(np.stack([one(img) for img in images]).astype(np.float32))

        desc = (f"timm eval transform: resize {scale} ({interpolation}), center crop {height}x{width}, "
                f"scale to [0, 1], normalize mean {_fmt(mean)} std {_fmt(std)}; {channels} channel(s)")
        pre = cls(run, channels, desc)
        config = {k: (list(v) if isinstance(v, (tuple, np.ndarray)) else v) for k, v in data_config.items()}
        pre._saver = lambda folder: (Path(folder) / TIMM_CONFIG).write_text(json.dumps(config, indent=2, default=str))
        return pre


TIMM_CONFIG = "timm_data_config.json"


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in np.asarray(values).reshape(-1)) + "]"


# ---- sampling and labels -----------------------------------------------------------------
def stratified_indices(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """`n` indices into `labels`, spread over the classes as evenly as possible.

    Every class gets n // k images (k classes) and the remainder goes one each to classes
    drawn with `seed`; a class with too few images gives what it has and the rest is shared
    among the others. Images within a class are drawn with `seed`; the result is shuffled
    with `seed` (so batches mix classes) and is the same for the same labels, n and seed.
    """
    if n <= 0:
        raise DataError(f"need a positive number of images, got {n}")
    if n > len(labels):
        raise DataError(f"asked for {n:,} images but the source has only {len(labels):,}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    classes = sorted(by_class)
    quota = dict.fromkeys(classes, 0)
    while (left := n - sum(quota.values())) > 0:
        open_ = [c for c in classes if quota[c] < len(by_class[c])]
        share = left // len(open_)
        if share == 0:
            for c in rng.sample(open_, left):
                quota[c] += 1
        else:
            for c in open_:
                quota[c] = min(len(by_class[c]), quota[c] + share)
    chosen = []
    for c in classes:
        chosen.extend(rng.sample(by_class[c], quota[c]))
    rng.shuffle(chosen)
    return chosen


def _loose(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.casefold())


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def class_mapping(folder_classes: Sequence[str], id2label: Mapping) -> list[int]:
    """For each folder class, the model's class id of the same name.

    A folder class matches a label case-insensitively, else ignoring everything but letters and
    digits (when that is unambiguous), else when the folder is named by the label's integer id.
    Any folder class left unmatched (or matching several labels) is a DataError that lists the
    unmatched classes and the model's labels.
    """
    labels = {int(k): str(v) for k, v in id2label.items()}
    exact: dict[str, list[int]] = {}
    loose: dict[str, list[int]] = {}
    for i, name in sorted(labels.items()):
        exact.setdefault(name.casefold().strip(), []).append(i)
        loose.setdefault(_loose(name), []).append(i)
    mapping, unmatched, ambiguous = [], [], []
    for name in folder_classes:
        ids = exact.get(name.casefold().strip()) or (loose.get(_loose(name)) if _loose(name) else None)
        if not ids and name.strip().isdigit() and int(name) in labels:
            ids = [int(name)]
        if not ids:
            unmatched.append(name)
        elif len(ids) > 1:
            ambiguous.append(f"{name!r} -> ids {ids}")
        else:
            mapping.append(ids[0])
    if unmatched or ambiguous:
        model_labels = [labels[i] for i in sorted(labels)]
        problems = []
        if unmatched:
            problems.append(f"folder classes with no model label: {_preview(unmatched)}")
        if ambiguous:
            problems.append(f"folder classes matching several model labels: {'; '.join(ambiguous)}")
        raise DataError(f"{'; '.join(problems)}. The model's labels ({len(model_labels)}): {_preview(model_labels)}")
    return mapping


# ---- batches ------------------------------------------------------------------------------
def _pixels(folder: ImageFolder, indices: Sequence[int], preprocessor: ImagePreprocessor) -> torch.Tensor:
    return preprocessor([load_image(folder.samples[i][0], preprocessor.mode) for i in indices])


def calibration_images(source, preprocessor: ImagePreprocessor, n: int, seed: int = 0,
                       batch_size: int = 32) -> list[torch.Tensor]:
    """`n` images of `source`, stratified over its classes (`stratified_indices`), as pixel batches."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    folder = image_folder(source)
    chosen = stratified_indices(folder.labels, n, seed)
    starts = range(0, len(chosen), batch_size)
    return [_pixels(folder, chosen[i:i + batch_size], preprocessor)
            for i in tqdm(starts, desc="calibration images", leave=False, dynamic_ncols=True)]


def evaluation_indices(folder: ImageFolder, max_images: int | None = None, seed: int = 0) -> list[int]:
    """Every image of the folder, or a stratified `max_images` of them (in folder order)."""
    if max_images is None or max_images >= len(folder):
        return list(range(len(folder)))
    return sorted(stratified_indices(folder.labels, max_images, seed))


def evaluation_batches(source, preprocessor: ImagePreprocessor, batch_size: int = 256,
                       id2label: Mapping | None = None, max_images: int | None = None,
                       seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, labels) batches over `source`; labels are the model's class ids.

    With `id2label` the folder classes are mapped by name (`class_mapping`); without it the
    folder's class order is the model's. `max_images` takes a stratified subset (`seed`).
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    folder = image_folder(source)
    to_model = class_mapping(folder.classes, id2label) if id2label is not None else list(range(len(folder.classes)))
    indices = evaluation_indices(folder, max_images, seed)
    for i in range(0, len(indices), batch_size):
        chunk = indices[i:i + batch_size]
        labels = torch.tensor([to_model[folder.samples[j][1]] for j in chunk], dtype=torch.long)
        yield _pixels(folder, chunk, preprocessor), labels
