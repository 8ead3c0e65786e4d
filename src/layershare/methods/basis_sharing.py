"""Basis Sharing (Wang et al., arXiv 2410.03765), on the MLPs.

Within a group of adjacent blocks (default pairs), the linears that read the block's
hidden state (up and gate; fc1) are concatenated along their outputs and factorised by one
whitened SVD: the whitening is the Cholesky factor of the pooled input second moment of the
group's blocks, so the shared basis U minimises the output error on all of them. Each layer
keeps its own coefficients V_i. The linears that write the hidden state (down; fc2) are
compressed per layer with SVD-LLM, as in the paper. Every part keeps the same fraction of its
parameters. No sparsity, no tuning.
"""
from __future__ import annotations

import torch

from ..adapters.base import IN
from ..budget import GroupBudget, GroupShape, Plan, keep_fraction, make_plan, solve_dense
from ..modules.shared_basis import SharedBasis, SharedBasisLinear
from ..modules.weights import weight_dxh
from ..recipe import Recipe
from .base import Compressed, Group, Method
from .lowrank import lowrank_linear, to_basis, whitened_factors


class BasisSharing(Method):
    name = "basis-sharing"
    tunable = False
    needs_gram = True

    def plan(self, shapes: list[GroupShape], total_params: int, recipe: Recipe) -> Plan:
        rank = recipe.extra.get("rank")  # explicit rank: the ratio is whatever it comes to
        keep = 1.0 if rank else keep_fraction(shapes, total_params, recipe.ratio, recipe.ratio_of)
        return make_plan(shapes, total_params, keep, [self._budget(s, keep, rank) for s in shapes])

    def _budget(self, shape: GroupShape, keep: float, rank: int | None) -> GroupBudget:
        roles = shape.roles
        shared = GroupShape(shape.d, tuple(h for h, r in zip(shape.hs, roles) if r == IN))
        s = solve_dense(shared, keep, rank)
        ranks, stored = [], s.stored
        for h, r in zip(shape.hs, roles):
            if r == IN:
                ranks.append(s.rank)
            else:
                o = solve_dense(GroupShape(shape.d, (h,)), keep, rank)
                ranks.append(o.rank)
                stored += o.stored
        return GroupBudget(rank=s.rank, nnz=sum(rk * h for rk, h in zip(ranks, shape.hs)),
                           stored=stored + shape.n_bias, dense=shape.dense,
                           v_size=sum(rk * h for rk, h in zip(ranks, shape.hs)), ranks=tuple(ranks))

    def init(self, group: Group, budget: GroupBudget, recipe: Recipe) -> Compressed:
        modules, shared = {}, {}
        ins = [j for j, r in enumerate(group.roles) if r == IN]
        mats = [weight_dxh(group.modules[j], IN).float() for j in ins]
        pooled = sum(group.grams[group.paths[j]] for j in ins)
        A, B = whitened_factors(torch.cat(mats, dim=1), pooled, budget.ranks[ins[0]])
        U, V = to_basis(A, B, IN, mats[0].dtype)
        basis = SharedBasis(U)
        shared[str(group.index)] = basis
        for j, Vj in zip(ins, torch.split(V, [m.shape[1] for m in mats], dim=1)):
            m = group.modules[j]
            bias = m.bias.detach().clone().float() if getattr(m, "bias", None) is not None else None
            modules[group.paths[j]] = SharedBasisLinear(basis, Vj.contiguous(), IN, bias)
        for j, (path, m, role) in enumerate(zip(group.paths, group.modules, group.roles)):
            if role != IN:
                b, layer = lowrank_linear(m, role, budget.ranks[j], group.grams[path])
                modules[path] = layer
                shared[f"{group.index}_{j}"] = b
        return Compressed(modules=modules, shared=shared)

    def materialize(self, compressed: Compressed) -> None:
        for m in list(compressed.modules.values()) + list(compressed.shared.values()):
            m.requires_grad_(False)
