"""Basis Sharing (Wang et al., arXiv 2410.03765).

Within a group of adjacent blocks (default pairs), the matrices of one type that read the
block's hidden state (up, gate; fc1 — or Q, K, V for `basis-sharing-attention`) are
concatenated along their outputs across the group's blocks and factorised by one whitened
SVD: the whitening is the Cholesky factor of that type's pooled input second moment, so the
shared basis U minimises the output error on all of the group's blocks. Each layer keeps its
own coefficients V_i; every type has its own basis, as in the official code. The linears that
write the hidden state (down, fc2; O) are compressed per layer with SVD-LLM, as in the paper.
Every part keeps the same fraction of its parameters. No sparsity, no tuning.

At recipe ratios >= 0.4 (or with `update=True`) the paper's closed-form
coefficient update follows: the shared basis stays, each layer's coefficients are re-solved
by least squares on the inputs the compressed model feeds it (earlier groups already
compressed), V_i = (U^T G_i U)^-1 U^T G_i W_i with G_i that layer's own input second moment
(the official code pools the group's inputs; each layer's own moment minimises each layer's
error, and the V_i are independent); the per-layer SVD-LLM parts get SVD-LLM's update.

`joint_basis=True` shares one basis among all the input-side types of the
group (up and gate together; they read the same input), our variant: on SmolLM2-135M at 20%
it measured better than the paper's per-type bases (test perplexity 97.9 against 111.2).

`basis-sharing` compresses the MLPs; `basis-sharing-attention` the attention projections
(Q, K, V shared, O per layer), alone or as the attention stage of a recipe
(a recipe whose stages are basis-sharing-attention and an MLP method): both together are the
paper's whole method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layershare.adapters.base import IN, OUT, Adapter
from layershare.compression.budget import (
    BudgetError,
    GroupBudget,
    GroupShape,
    Plan,
    keep_fraction,
    make_plan,
    solve_dense,
)
from layershare.config import GroupedConfig
from layershare.methods.base import Compressed, Group, GroupMethod, Needs
from layershare.methods.lowrank import (
    lowrank_linear,
    refit_output,
    to_basis,
    whitened_factors,
)
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.modules.weights import weight_dxh

UPDATE_FROM = 0.4  # the paper updates the coefficients from 40% compression on


def shared_kinds(shape_or_group, joint: bool = False) -> dict[str, list[int]]:
    """Indices of the input-side matrices of each type (they share one basis), in order; with
    `joint`, all of them in one."""
    kinds: dict[str, list[int]] = {}
    for j, (role, kind) in enumerate(zip(shape_or_group.roles, shape_or_group.kinds)):
        if role == IN:
            kinds.setdefault("joint" if joint else kind, []).append(j)
    return kinds


@dataclass
class BasisSharingConfig(GroupedConfig):
    method = "basis-sharing"

    update: bool | None = None  # the closed-form coefficient update (None: from ratio 0.4 on, as the paper)
    joint_basis: bool = False  # one basis for all input-side types of a group (up and gate together)


@dataclass
class BasisSharingAttentionConfig(BasisSharingConfig):
    method = "basis-sharing-attention"
    part = "attention"


class BasisSharing(GroupMethod):
    name = "basis-sharing"
    config_class = BasisSharingConfig
    config: BasisSharingConfig

    def needs(self) -> Needs:
        c = self.config
        return Needs(grams=True, update_grams=bool(c.ratio >= UPDATE_FROM if c.update is None else c.update))

    def plan(self, shapes: list[GroupShape], total_params: int, bytes_per_param: int) -> Plan:
        c = self.config
        rank = c.rank  # explicit rank: the ratio is whatever it comes to
        keep = 1.0 if rank else keep_fraction(shapes, total_params, c.ratio, c.ratio_of, self.part, self.name)
        return make_plan(shapes, total_params, keep, [self._budget(s, keep, rank, c.joint_basis) for s in shapes])

    def _budget(self, shape: GroupShape, keep: float, rank: int | None, joint: bool = False) -> GroupBudget:
        """One rank per part (a shared basis and its coefficients, or one per-layer linear), each
        keeping `keep` of its parameters; the rounding remainder of the group goes to extra ranks
        (largest parts first), so the group keeps `keep` of its parameters to within one rank."""
        parts = list(shared_kinds(shape, joint).values()) + [[j] for j, r in enumerate(shape.roles) if r != IN]
        costs = [shape.d + sum(shape.hs[j] for j in idx) for idx in parts]  # parameters per rank
        if rank is not None:
            part_ranks = [int(rank)] * len(parts)
        else:
            part_ranks = [solve_dense(GroupShape(shape.d, tuple(shape.hs[j] for j in idx)), keep).rank for idx in parts]
            left = keep * shape.dense - shape.n_bias - sum(r * c for r, c in zip(part_ranks, costs))
            for p in sorted(range(len(parts)), key=lambda p: -costs[p]):
                extra = int(left // costs[p])
                part_ranks[p] += extra
                left -= extra * costs[p]
        ranks = [0] * len(shape.hs)
        for idx, r in zip(parts, part_ranks):
            for j in idx:
                ranks[j] = r
        size = sum(rk * h for rk, h in zip(ranks, shape.hs))
        stored = float(sum(r * c for r, c in zip(part_ranks, costs)) + shape.n_bias)
        return GroupBudget(rank=max(ranks), nnz=size, stored=stored, dense=shape.dense, v_size=size,
                           ranks=tuple(ranks))

    def init(self, group: Group, budget: GroupBudget) -> Compressed:
        modules, shared = {}, {}
        updates = group.update_grams
        joint = self.config.joint_basis
        device = group.stats_device  # the factorizations run beside the statistics
        for t, idx in enumerate(shared_kinds(group, joint).values()):
            mats = [weight_dxh(group.modules[j], IN, device).float() for j in idx]
            pooled = sum(group.grams[group.paths[j]] for j in idx)
            A, B = whitened_factors(torch.cat(mats, dim=1), pooled, budget.ranks[idx[0]])
            U, V = to_basis(A, B, IN, mats[0].dtype)
            Vs = torch.split(V, [m.shape[1] for m in mats], dim=1)
            if updates is not None:
                Vs = [refit_output(A, W, updates[group.paths[j]]).to(V.dtype) for j, W in zip(idx, mats)]
            basis = SharedBasis(U)
            shared[f"b{t}"] = basis
            for j, Vj in zip(idx, Vs):
                m = group.modules[j]
                bias = m.bias.detach().clone().float() if getattr(m, "bias", None) is not None else None
                modules[group.paths[j]] = SharedBasisLinear(basis, Vj.contiguous(), IN, bias)
        for j, (path, m, role) in enumerate(zip(group.paths, group.modules, group.roles)):
            if role != IN:
                b, layer = lowrank_linear(m, role, budget.ranks[j], group.grams[path],
                                          updates[path] if updates is not None else None)
                modules[path] = layer
                shared[f"l{j}"] = b
        return Compressed(modules=modules, shared=shared)


class BasisSharingAttention(BasisSharing):
    """Basis Sharing on the attention projections: Q, K, V (or a fused QKV) each share a basis
    across the group's blocks, O is compressed per layer with SVD-LLM."""

    name = "basis-sharing-attention"
    config_class = BasisSharingAttentionConfig

    def linears(self, adapter: Adapter) -> dict[str, str]:
        names = adapter.attention
        if not names:
            raise BudgetError(f"adapter {adapter.name!r} does not name the attention projections")
        return {n: (OUT if i == len(names) - 1 else IN) for i, n in enumerate(names)}  # the last one is O
