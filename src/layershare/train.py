"""The one training loop: AdamW with a cosine learning rate, for block-wise reconstruction
(reconstruct.py) and end-to-end distillation (distill.py). The caller says what a step's loss
is and what happens before each step (a mask update); the loop owns the optimiser, the
schedule and the progress bar."""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm


def optimize(params: list[torch.nn.Parameter], steps: int, lr: float, loss_at: Callable[[int], torch.Tensor],
             weight_decay: float = 0.0, min_lr: float = 0.0, before_step: Callable[[int], None] | None = None,
             desc: str = "train", leave: bool = False) -> list[float]:
    """`steps` AdamW steps on `loss_at(t)`; the learning rate falls from `lr` to `min_lr * lr`
    along a half cosine. Returns the loss of every step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    curve: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=leave, dynamic_ncols=True)
    for t in bar:
        if before_step is not None:
            before_step(t)
        loss = loss_at(t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
        if t % 10 == 0:
            bar.set_postfix(loss=f"{curve[-1]:.3g}")
    return curve
