"""Global magnitude pruning of the V matrices of one group: static, or gradual (GMP).

Gradual follows Zhu & Gupta's cubic ramp, as the official FiPS code does through its
GMP sparsifier: the number of kept entries goes from `n_init` to `n_final` as
    n(t) = n_final + (n_init - n_final) * (1 - t / t_end)^3,   t <= t_end,
updated every `every` steps, ranking |V| jointly over all V_i of the group. Pruned entries
stay pruned (no regrowth); after t_end the mask is fixed at exactly `n_final` nonzeros.

With an N:M pattern (`nm=(n, m)`: in every m consecutive entries along the input axis of each
V's linear, the rank axis r for up/gate and the h axis for down, n are kept) the same ramp
moves whole m-groups to N:M: at each update the groups whose pruning costs the least score
(the sum of their m - n smallest) are made N:M, those already N:M first, until the group
count the ramp asks for; at the end every m-group holds exactly n nonzeros.

The ranking is by |V| (the paper's) or, with `ActivationScore`, by |V| times how much one unit
of that entry moves the MLP's output on calibration data (`Recipe.prune_score = "activation"`).
"""
from __future__ import annotations

import torch

from layershare.adapters.base import IN
from layershare.modules.shared_basis import SharedBasisLinear


class ActivationScore:
    """Per-entry weights that put every V entry of a group in the same unit: the RMS change of
    its block's MLP output when the entry is zeroed (Wanda's |W| * ||x|| carried through the
    shared basis). With G_x the MLP input's second moment and G_h the down projection's:
      down (h -> d, z = V h, y = U z):   |V_kj| * ||U[:, k]|| * sqrt(G_h[j, j])
      up/gate (d -> h, p = (x U) V):     |V_kj| * sqrt((U^T G_x U)[k, k]) * c_j,
    where c_j = ||(U V_down)[:, j]|| * sqrt(G_h[j, j] / E[p_j^2]) carries a change of p_j
    through the gating (first order, as if dh_j / h_j = dp_j / p_j) and the down projection.
    Recomputed from the current U and V at every mask update; G_x and G_h are the dense
    model's statistics. A block without a down projection in the group gets c_j = 1.
    """

    def __init__(self, layers: list[SharedBasisLinear], stats: list[torch.Tensor], blocks: list[int]):
        """stats: `statistics(roles, grams)` of the layers' dense second moments."""
        self.layers, self.blocks = layers, blocks
        self.grams = stats

    @staticmethod
    def statistics(roles: list[str], grams: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the score keeps of each linear's input second moment, in float32: G_x (d x d) for
        up/gate, only the diagonal of G_h (h, not h x h) for a down projection."""
        return [g.to(torch.float32) if role == IN else g.diagonal().to(torch.float32).clone()
                for role, g in zip(roles, grams)]

    @torch.no_grad()
    def __call__(self):
        """The weights of each layer's entries (one r x h tensor per layer, made as it is asked for)."""
        U = self.layers[0].basis.U.detach()
        if self.grams[0].device != U.device:  # the layers run on another device than the statistics
            self.grams = [g.to(U.device) for g in self.grams]
        tail = {}  # block -> (column norms of the dense down weight, sqrt(G_h diag))
        for layer, G, block in zip(self.layers, self.grams, self.blocks):
            if layer.role != IN:
                tail[block] = ((U @ layer.masked_V()).norm(dim=0), G.clamp_min(0).sqrt())
        Ms = {}  # U^T G_x U per block (its up and gate read the same input)
        for layer, G, block in zip(self.layers, self.grams, self.blocks):
            if layer.role != IN:
                yield U.norm(dim=0)[:, None] * tail[block][1][None, :]
                continue
            if block not in Ms:
                Ms[block] = U.t() @ G @ U
            M = Ms[block]
            V = layer.masked_V()
            row = M.diagonal().clamp_min(0).sqrt()[:, None]
            if block in tail:
                col_norm, h_rms = tail[block]
                pre_ms = (V * (M @ V)).sum(dim=0).clamp_min(1e-12)
                col = col_norm * h_rms / pre_ms.sqrt()
            else:
                col = torch.ones(V.shape[1], device=V.device, dtype=V.dtype)
            del V
            yield row * col[None, :]


SAMPLE = 65536  # entries of the strided sample that brackets the k-th largest (kth_largest)


def kth_largest(scores: torch.Tensor, k: int) -> int:
    """The k-th largest entry of a float32 vector of scores >= 0 (or the -1 of pruned entries), as
    its int32 bit pattern (the same order as the floats for these values).

    A strided sample of SAMPLE entries brackets the k-th largest between two of its order
    statistics (a margin of four binomial standard deviations); two comparisons of the vector
    check the bracket and `kthvalue` of the entries inside it (a small fraction) gives the exact
    answer. If the bracket misses (a sample unlike the whole), a binary search on counts, one
    comparison of the vector per bit, gives it. No sort, top-k or index list of the vector's
    size: 3 passes instead of 31 (a 6M-entry group on 2 cores: 33 ms instead of 150 ms)."""
    bits = scores.view(torch.int32)
    n = bits.numel()
    if 0 < k <= n and n > 4 * SAMPLE:
        sample = bits[:: n // SAMPLE]
        m = sample.numel()
        pos = k * m / n  # the k-th largest's expected rank in the sample
        margin = 4 * (pos * max(0.0, 1 - pos / m)) ** 0.5 + 16
        ranked = sample.sort(descending=True).values
        top, bottom = int(pos - margin), int(pos + margin) + 1
        hi = int(ranked[top - 1]) if top >= 1 else int(bits.max())
        lo = int(ranked[bottom - 1]) if bottom <= m else int(bits.min())
        if lo < 0:  # the bracket reaches the pruned entries (-1): keep them out of it
            if int(torch.count_nonzero(bits >= 0)) < k:  # fewer scored entries than k: pruned ones stay
                return int(bits.min())
            lo = 0
        above = int(torch.count_nonzero(bits > hi))
        inside = bits[(bits >= lo) & (bits <= hi)]
        if above < k <= above + inside.numel():
            return int(inside.kthvalue(inside.numel() - (k - above) + 1).values)
    lo, hi = 0, int(bits.max())
    if int(torch.count_nonzero(bits >= 0)) < k:  # fewer scored entries than k: some pruned ones stay
        lo = int(bits.min())
    while lo < hi:  # the largest t with at least k entries >= t
        mid = (lo + hi + 1) // 2
        if int(torch.count_nonzero(bits >= mid)) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def top_k_masks(scores: torch.Tensor, k: int, shapes: list) -> list[torch.Tensor]:
    """Bool masks (one per shape, laid end to end in `scores`) of the k largest scores; among
    scores equal to the k-th, the first in order."""
    if k <= 0:
        return [torch.zeros(s, dtype=torch.bool, device=scores.device) for s in shapes]
    t = kth_largest(scores, k)
    bits = scores.view(torch.int32)
    ties = k - int(torch.count_nonzero(bits > t))
    masks, offset = [], 0
    for shape in shapes:
        n = shape[0] * shape[1]
        part = bits[offset:offset + n]
        mask = part > t
        if ties > 0:
            at = torch.nonzero(part == t).flatten()[:ties]
            mask[at] = True
            ties -= at.numel()
        masks.append(mask.view(shape))
        offset += n
    return masks


def nm_view(t: torch.Tensor, role: str, m: int) -> torch.Tensor:
    """V (r x h) as (groups, m): m consecutive entries along its linear's input axis (r for a
    d -> h layer, whose weight is V^T; h for h -> d, whose weight is V)."""
    r, h = t.shape
    if role == IN:
        return t.view(r // m, m, h).permute(0, 2, 1).reshape(-1, m)
    return t.reshape(r * h // m, m)


def nm_unview(g: torch.Tensor, role: str, m: int, shape) -> torch.Tensor:
    r, h = shape
    if role == IN:
        return g.view(r // m, h, m).permute(0, 2, 1).reshape(r, h)
    return g.reshape(r, h)


def is_nm(V: torch.Tensor, role: str, n: int, m: int) -> bool:
    """Whether every m-group along the input axis of V's linear has at most n nonzeros."""
    return bool(((nm_view(V != 0, role, m)).sum(1) <= n).all())


class GroupPruner:
    def __init__(self, layers: list[SharedBasisLinear], n_final: int, schedule: str, steps: int,
                 every: int = 10, end: float = 0.75, initial_density: float = 1.0,
                 score: ActivationScore | None = None, nm: tuple[int, int] | None = None):
        self.layers = layers
        self.nm = nm
        self.score = score
        self.total = sum(layer.V.numel() for layer in layers)
        self.n_final = n_final
        self.n_init = max(n_final, int(round(initial_density * self.total)))
        self.schedule = schedule
        self.every = every
        self.end = end
        self.retime(steps)
        self._zero_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # apply_masks' multipliers

    def retime(self, steps: int) -> None:
        """Spread the gradual schedule over `steps` tuning steps (the group's, when reconstruct
        gives it fewer than the config's: the mask still becomes final at `end` of them)."""
        self.t_end = max(1, int(self.end * steps)) if self.schedule == "gradual" and steps > 0 else 0

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero each V outside its mask (after an optimiser step moved pruned entries, and after
        each update). On the CPU V is multiplied by a 0/1 tensor in V's dtype, made once per mask
        and dropped with the pruner: a product with the bool mask itself converts every element on
        the way (one 642 x 1536 V at one thread: 1.3-1.6 ms against 0.36 ms; a bfloat16 0/1 tensor,
        half the bytes, 0.64 ms), and this runs after every step. The same zeros either way."""
        for i, layer in enumerate(self.layers):
            mask = layer.mask
            if mask is None:
                continue
            if layer.V.device.type != "cpu":
                layer.apply_mask()
                continue
            held = self._zero_out.get(i)
            if held is None or held[0] is not mask or held[1].dtype != layer.V.dtype:
                held = self._zero_out[i] = (mask, mask.to(layer.V.dtype))
            layer.V.mul_(held[1])

    def target(self, t: int) -> int:
        if t >= self.t_end:
            return self.n_final
        frac = (1 - t / self.t_end) ** 3
        return int(round(self.n_final + (self.n_init - self.n_final) * frac))

    def due(self, t: int) -> bool:
        return t == 0 or (t <= self.t_end and t % self.every == 0)

    @torch.no_grad()
    def prune_to(self, keep: int) -> None:
        weights = self.score() if self.score is not None else iter([None] * len(self.layers))
        if self.nm is not None:
            per_layer = [layer.masked_V().abs() if w is None else layer.masked_V().abs() * w
                         for layer, w in zip(self.layers, weights)]
            return self._prune_nm(keep, per_layer)
        # one flat score vector, filled layer by layer (a group's V entries are the largest tensors
        # of a compression: no per-layer list, concatenation, index list or masked copy beside it)
        scores = torch.empty(self.total, dtype=self.layers[0].V.dtype, device=self.layers[0].V.device)
        offset = 0
        for layer, w in zip(self.layers, weights):
            n = layer.V.numel()
            part = scores[offset:offset + n].view_as(layer.V)
            torch.abs(layer.masked_V(), out=part)
            if w is not None:
                part.mul_(w)
                del w
            if layer.mask is not None:  # already-pruned entries never come back
                part.masked_fill_(~layer.mask, -1.0)
            offset += n
        for layer, mask in zip(self.layers, top_k_masks(scores, keep, [l.V.shape for l in self.layers])):
            layer.mask = mask
            layer.sparse = True
        self.apply_masks()

    def _prune_nm(self, keep: int, per_layer: list[torch.Tensor]) -> None:
        n, m = self.nm
        groups = [nm_view(s, layer.role, m) for s, layer in zip(per_layer, self.layers)]  # (G, m) each
        masks = [nm_view(layer.mask, layer.role, m) if layer.mask is not None else torch.ones_like(g)
                 for layer, g in zip(self.layers, groups)]
        total_groups = sum(g.shape[0] for g in groups)
        want = min(total_groups, int(round((self.total - keep) / (m - n))))  # m-groups made N:M
        cost = torch.cat([torch.where(mk.sum(1) <= n, -1.0, g.sort(dim=1).values[:, :m - n].sum(1))
                          for g, mk in zip(groups, masks)])
        chosen = torch.zeros(total_groups, dtype=torch.bool, device=cost.device)
        chosen[torch.topk(cost, want, largest=False, sorted=False).indices] = True
        offset = 0
        for layer, g, mk in zip(self.layers, groups, masks):
            sel = chosen[offset:offset + g.shape[0]]
            top = torch.zeros_like(g).scatter_(1, torch.topk(g.masked_fill(mk == 0, -1.0), n, dim=1).indices, 1.0)
            new = torch.where(sel[:, None], top * mk, mk)
            layer.mask = nm_unview(new, layer.role, m, layer.V.shape) > 0
            layer.sparse = True
            offset += g.shape[0]
        self.apply_masks()

    def step(self, t: int) -> None:
        if self.due(t):
            keep = self.target(t)
            current = self.total if self.layers[0].mask is None else int(sum(l.mask.sum() for l in self.layers))
            if keep < current:  # (nothing to prune yet: no all-true masks)
                self.prune_to(keep)

    def finish(self) -> None:
        """Make the mask final (exactly n_final nonzeros), whatever the step count was."""
        self.prune_to(self.n_final)
