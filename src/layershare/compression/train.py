"""The one training loop: AdamW with a cosine learning rate, for block-wise reconstruction
(reconstruct.py) and end-to-end distillation (distill.py). The caller says what a step's loss
is and what happens before and after each step (mask updates); the loop owns the optimiser, the
schedule and the progress bar.

Memory: each parameter is updated as soon as its gradient is complete, inside the backward
(PyTorch's "optimizer step in backward" pattern: one fused AdamW per parameter, run by a
post-accumulate-grad hook, the gradient freed right after), so at most one parameter's
gradient is alive at a time and the step makes no temporaries; what stays between steps is the
parameters and Adam's two moments. AdamW is elementwise: the same update as one optimiser
stepping all parameters after the backward.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from layershare.hardware import native_bf16


def compute_dtype(requested: str, device: str | torch.device) -> torch.dtype | None:
    """The dtype the tuning's matrix products run in (torch.autocast), or None for float32:
    "auto" is bfloat16 where the device has it in hardware (native_bf16), else float32."""
    if requested == "float32" or (requested == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


def optimize(params: list[torch.nn.Parameter], steps: int, lr: float, loss_at: Callable[[int], torch.Tensor],
             weight_decay: float = 0.0, min_lr: float = 0.0, before_step: Callable[[int], None] | None = None,
             after_step: Callable[[], None] | None = None, desc: str = "train", leave: bool = False,
             read_every: int = 10) -> list[float]:
    """`steps` AdamW steps on `loss_at(t)`; the learning rate falls from `lr` to `min_lr * lr`
    along a half cosine. Returns the loss of every step. The losses stay on their device and are
    read every `read_every` steps (when the progress bar shows the latest) and after the last:
    on a GPU the host does not wait for every step."""

    def schedule(t: int) -> float:
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))

    opts = {}
    for p in params:
        fused = p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.float16,
                                                                   torch.bfloat16)
        opts[p] = torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay, fused=fused or None)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in opts.values()]

    def step_now(p: torch.Tensor) -> None:
        opts[p].step()
        # the fused kernel changes p in place without telling autograd: say so (what a cache keyed
        # on the version, SharedBasis.project's, and autograd's own checks rely on)
        torch.autograd.graph.increment_version(p)
        opts[p].zero_grad(set_to_none=True)

    handles = [p.register_post_accumulate_grad_hook(step_now) for p in params]
    curve: list[float] = []
    unread: list[torch.Tensor] = []  # the losses of the steps since the last read
    bar = tqdm(range(steps), desc=desc, leave=leave, dynamic_ncols=True)
    try:
        for t in bar:
            if before_step is not None:
                before_step(t)
            loss = loss_at(t)
            loss.backward()  # every parameter is stepped by its hook
            if after_step is not None:
                after_step()
            for s in scheds:
                s.step()
            unread.append(loss.detach())
            if t % read_every == 0 or t == steps - 1:
                curve.extend(torch.stack(unread).tolist())
                unread.clear()
                bar.set_postfix(loss=f"{curve[-1]:.3g}")
    finally:
        for h in handles:
            h.remove()
    return curve
