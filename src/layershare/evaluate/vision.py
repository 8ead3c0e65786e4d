"""Top-1 / top-5 accuracy of an image classifier on an image folder (or `fmnist:test`).

Every image of the source is scored once (or a class-stratified `max_images` of them), after
the model's own preprocessing. Folder classes are mapped to the model's class ids by name
against `model.config.id2label` (images.class_mapping); a model without a config (timm), or
whose labels are only the generic LABEL_i, is taken to use the folder's class order. Top-5 is
top-min(5, classes). The protocol is printed with every number.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from layershare.data.images import (
    ImagePreprocessor,
    evaluation_batches,
    evaluation_indices,
    image_folder,
)
from layershare.data.text import DataError
from layershare.runtime.forward import logits as model_logits


@dataclass
class Accuracy:
    top1: float
    top5: float
    n: int
    protocol: str

    def __str__(self) -> str:
        return f"top-1 {100 * self.top1:.2f}%  top-5 {100 * self.top5:.2f}% over {self.protocol}"


def model_id2label(model) -> dict[int, str] | None:
    """The model's class names by id, or None when it has none worth matching (no config, LABEL_i)."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    labels = {int(k): str(v) for k, v in id2label.items()}
    if all(re.fullmatch(rf"LABEL_{k}", v) for k, v in labels.items()):
        return None
    return labels


@torch.no_grad()
def accuracy(model, source, preprocessor: ImagePreprocessor, batch_size: int = 256,
             max_images: int | None = None, call=None, desc: str = "accuracy") -> Accuracy:
    call = call or model_logits
    folder = image_folder(source)
    id2label = model_id2label(model)
    indices = evaluation_indices(folder, max_images)
    n = len(indices)
    param = next(model.parameters())
    device, dtype = param.device, (param.dtype if param.is_floating_point() else torch.float32)
    model.eval()
    hit1 = hit5 = 0
    k = None
    batches = evaluation_batches(folder, preprocessor, batch_size, id2label=id2label, max_images=max_images)
    with tqdm(total=n, desc=desc, leave=False, dynamic_ncols=True) as bar:
        for pixels, labels in batches:
            logits = call(model, pixels.to(device=device, dtype=dtype))
            if logits.ndim != 2 or logits.shape[0] != len(labels):
                raise DataError(f"the model gave logits of shape {tuple(logits.shape)} for {len(labels)} images")
            if id2label is None and logits.shape[1] < len(folder.classes):
                raise DataError(f"the folder has {len(folder.classes)} classes but the model only "
                                f"{logits.shape[1]} outputs (and no class names to match them by)")
            k = min(5, logits.shape[1])
            top = logits.float().topk(k, dim=-1).indices.cpu()
            hit1 += int((top[:, 0] == labels).sum())
            hit5 += int((top == labels[:, None]).any(dim=-1).sum())
            bar.update(len(labels))
    which = f"all {n:,} images" if n == len(folder) else f"{n:,} of {len(folder):,} images (class-stratified, seed 0)"
    labels_how = "labels matched by name to model.config.id2label" if id2label is not None else "labels in folder class order"
    topk = "top-5" if k == 5 else f"top-5 is top-{k}"
    protocol = (f"{which} of {folder.root} ({len(folder.classes)} classes; {labels_how}; {topk}); "
                f"preprocessing: {preprocessor.description}")
    return Accuracy(top1=hit1 / n, top5=hit5 / n, n=n, protocol=protocol)
