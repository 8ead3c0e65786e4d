"""Global magnitude pruning of the V matrices of one group: static, or gradual (GMP).

Gradual follows Zhu & Gupta's cubic ramp, as the official FiPS code does through its
GMP sparsifier: the number of kept entries goes from `n_init` to `n_final` as
    n(t) = n_final + (n_init - n_final) * (1 - t / t_end)^3,   t <= t_end,
updated every `every` steps, ranking |V| jointly over all V_i of the group. Pruned entries
stay pruned (no regrowth); after t_end the mask is fixed at exactly `n_final` nonzeros.
"""
from __future__ import annotations

import torch

from .modules.shared_basis import SharedBasisLinear


class GroupPruner:
    def __init__(self, layers: list[SharedBasisLinear], n_final: int, schedule: str, steps: int,
                 every: int = 10, end: float = 0.75, initial_density: float = 1.0):
        self.layers = layers
        self.total = sum(layer.V.numel() for layer in layers)
        self.n_final = n_final
        self.n_init = max(n_final, int(round(initial_density * self.total)))
        self.schedule = schedule
        self.every = every
        self.t_end = max(1, int(end * steps)) if schedule == "gradual" and steps > 0 else 0

    def target(self, t: int) -> int:
        if t >= self.t_end:
            return self.n_final
        frac = (1 - t / self.t_end) ** 3
        return int(round(self.n_final + (self.n_init - self.n_final) * frac))

    def due(self, t: int) -> bool:
        return t == 0 or (t <= self.t_end and t % self.every == 0)

    @torch.no_grad()
    def prune_to(self, keep: int) -> None:
        scores = torch.cat([layer.masked_V().abs().flatten() for layer in self.layers])
        if self.layers[0].mask is not None:  # already-pruned entries never come back
            scores = torch.where(torch.cat([l.mask.flatten() for l in self.layers]) > 0, scores, -1.0)
        flat = torch.zeros_like(scores)
        flat[torch.topk(scores, keep, sorted=False).indices] = 1.0
        offset = 0
        for layer in self.layers:
            n = layer.V.numel()
            layer.mask = flat[offset:offset + n].view_as(layer.V).clone()
            layer.V.mul_(layer.mask)
            offset += n

    def step(self, t: int) -> None:
        if self.due(t):
            keep = self.target(t)
            current = None if self.layers[0].mask is None else int(sum(l.mask.sum() for l in self.layers))
            if current is None or keep < current:
                self.prune_to(keep)

    def finish(self) -> None:
        """Make the mask final (exactly n_final nonzeros), whatever the step count was."""
        self.prune_to(self.n_final)
