"""Fine-tuning after compression ("global error minimisation" in the FiPS paper).

The whole compressed model is trained end to end to match the dense model (the teacher):
the loss is the KL divergence between the teacher's and the student's output distributions
at temperature T (times T^2, as in Hinton et al.), plus `label_weight` times the
cross-entropy on labels when labels are given (images). For causal LMs the KL is taken per
token. The sparsity pattern of every V is kept: packed projections are unpacked into a dense
V with a fixed 0/1 mask for training and packed again afterwards, so the stored size does not
change. Shared bases and atoms are trained once for all the layers that use them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from layershare.adapters import get_adapter
from layershare.compression.train import optimize
from layershare.modules.shared_basis import SharedBasisLinear
from layershare.runtime.forward import logits


class FinetuneError(ValueError):
    pass


class FinetuneDiverged(FinetuneError):
    """NaN or infinity in the losses or the trained tensors: nothing is saved (a failed check:
    the command line exits 1)."""

    exit_code = 1


@dataclass
class FinetuneStats:
    loss_before: float  # distillation loss (KL, plus labels if given) on the probe samples (the first inputs)
    loss_after: float
    steps: int
    seconds: float
    curve: list[float] = field(default_factory=list)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      labels: torch.Tensor | None = None, label_weight: float = 0.0) -> torch.Tensor:
    """T^2 KL(teacher || student) at temperature T, averaged over samples (tokens for LMs),
    plus label_weight x cross-entropy on labels."""
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    if labels is not None and label_weight > 0:
        kl = kl + label_weight * F.cross_entropy(s, labels.reshape(-1))
    return kl


def _make_trainable(model: nn.Module) -> list[SharedBasisLinear]:
    """Every frozen V to its training form (a dense V times a fixed 0/1 mask where it is sparse),
    and let every float tensor train."""
    unpacked = []
    for m in model.modules():
        if isinstance(m, SharedBasisLinear) and m.form != "train":
            m.to_form("train")
            unpacked.append(m)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return unpacked


def finetune(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None,
             steps: int = 200, batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.0,
             temperature: float = 1.0, label_weight: float = 0.0, seed: int = 0,
             device: str = "cpu", probe: int | None = None) -> FinetuneStats:
    """Distil `teacher` into the compressed `student` (in place) on `inputs` (token windows
    (N, T) or pixels (N, C, H, W)), `steps` AdamW steps of `batch_size` samples drawn without
    replacement (reshuffled each pass), cosine learning rate. The loss is reported on the
    first `probe` samples (default: one batch) before and after."""
    if steps < 1 or batch_size < 1:
        raise FinetuneError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if inputs.shape[0] < batch_size:
        raise FinetuneError(f"fine-tuning needs at least batch_size={batch_size} samples, got {inputs.shape[0]}")
    if labels is not None and labels.shape[0] != inputs.shape[0]:
        raise FinetuneError(f"{labels.shape[0]} labels for {inputs.shape[0]} inputs")
    adapter = get_adapter(student)
    if get_adapter(teacher).task != adapter.task:
        raise FinetuneError("teacher and student are different kinds of model")
    t0 = time.time()
    teacher.eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.to(device)
    unpacked = _make_trainable(student)
    params = [p for p in student.parameters() if p.requires_grad]
    n_probe = min(probe or batch_size, inputs.shape[0])
    probe_x = inputs[:n_probe].to(device)
    probe_y = labels[:n_probe].to(device) if labels is not None else None

    @torch.no_grad()
    def probe_loss() -> float:
        student.eval()
        loss = 0.0
        for i in range(0, n_probe, batch_size):
            x = probe_x[i:i + batch_size]
            y = probe_y[i:i + batch_size] if probe_y is not None else None
            loss += float(distillation_loss(logits(student, x, adapter), logits(teacher, x, adapter),
                                            temperature, y, label_weight)) * x.shape[0]
        return loss / n_probe

    gen = torch.Generator().manual_seed(seed)
    order = {"perm": torch.randperm(inputs.shape[0], generator=gen), "pos": 0}

    def loss_at(step: int) -> torch.Tensor:
        if order["pos"] + batch_size > inputs.shape[0]:
            order["perm"], order["pos"] = torch.randperm(inputs.shape[0], generator=gen), 0
        idx = order["perm"][order["pos"]:order["pos"] + batch_size]
        order["pos"] += batch_size
        x = inputs[idx].to(device)
        y = labels[idx].to(device) if labels is not None else None
        with torch.no_grad():
            t_logits = logits(teacher, x, adapter)
        return distillation_loss(logits(student, x, adapter), t_logits, temperature, y, label_weight)

    try:  # whatever happens, every V is packed again (a quantized model's codes are then stored again)
        before = probe_loss()
        if not math.isfinite(before):
            from layershare.evaluate.nonfinite import describe

            x = probe_x[:batch_size]
            for who, m in (("the teacher", teacher), ("the student", student)):
                if not torch.isfinite(logits(m, x, adapter)).all():
                    raise FinetuneDiverged(describe(m, (x,), {}, f"{who}'s logits on the first samples are not "
                                                                 f"finite"))
            raise FinetuneDiverged(f"the distillation loss on the first samples is {before} (the logits are finite; "
                                   f"temperature {temperature})")
        student.train()
        masked = [m for m in student.modules() if isinstance(m, SharedBasisLinear) and m.mask is not None]
        curve = optimize(params, steps, lr, loss_at, weight_decay=weight_decay, desc="finetune", leave=True,
                         after_step=lambda: [m.apply_mask() for m in masked])
    finally:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        for m in unpacked:  # the fixed mask keeps pruned entries at zero: the stored size is unchanged
            m.pack()
    after = probe_loss()
    bad = [n for n, t in student.state_dict(keep_vars=True).items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad or not math.isfinite(after) or not all(math.isfinite(v) for v in curve):
        step = next((i + 1 for i, v in enumerate(curve) if not math.isfinite(v)), None)
        why = [f"the loss is not finite from step {step}" if step else f"the loss after it is {after}"]
        if bad:
            why.append(f"NaN or infinity in {len(bad)} tensor(s): {', '.join(bad[:3])}")
        raise FinetuneDiverged(f"fine-tuning diverged ({'; '.join(why)}); nothing was saved: lower the learning "
                               f"rate ({lr})")
    return FinetuneStats(loss_before=before, loss_after=after, steps=len(curve), seconds=time.time() - t0,
                         curve=curve)
