"""Measuring a model: perplexity (perplexity.py), image top-1/top-5 (vision.py), zero-shot tasks
through lm-evaluation-harness (lm_eval.py, tasks.py). The verbs below are the public ones
(`layershare.evaluate_perplexity`, ...); each imports only what its measure needs. A non-finite
output is an error (NonFiniteResult, evaluate/nonfinite.py), never a NaN measure."""
from __future__ import annotations

import torch
from torch import nn


def evaluate_perplexity(model: nn.Module, tokenizer, text, seqlen: int | None = None,
                        max_windows: int | None = None):
    """Perplexity over the whole text (a source for data.read_text, or a 1-D tensor of token ids);
    see evaluate/perplexity.py for the protocol."""
    from layershare.data.text import read_text, tokenize
    from layershare.evaluate.nonfinite import watch
    from layershare.evaluate.perplexity import perplexity

    ids = text.flatten() if isinstance(text, torch.Tensor) else tokenize(tokenizer, read_text(text))
    with watch(model):  # NaN or infinite logits raise NonFiniteResult naming the first such module
        return perplexity(model, ids, seqlen=seqlen, max_windows=max_windows)


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8):
    """Zero-shot accuracy through lm-evaluation-harness (`pip install layershare[eval]`): the local
    Austen suite (evaluate/tasks.py) or any lm-eval task name. Returns a list of
    evaluate.lm_eval.TaskResult, one per task; see evaluate/lm_eval.py."""
    from layershare.evaluate.lm_eval import run_tasks

    return run_tasks(model, tokenizer, list(tasks), limit=limit, batch_size=batch_size)


def evaluate_accuracy(model: nn.Module, processor, images, batch_size: int = 256, max_images: int | None = None):
    """Top-1 / top-5 on an image folder (class sub-folders, or "fmnist:test"); see evaluate/vision.py."""
    from layershare.evaluate.nonfinite import watch
    from layershare.evaluate.vision import accuracy

    with watch(model):
        return accuracy(model, images, processor, batch_size=batch_size, max_images=max_images)
