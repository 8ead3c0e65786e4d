"""MASA, Matrix Atom Sharing in Attention (Zhussip et al., arXiv 2508.04581), post hoc.

For a group of blocks (default: all of them) and each attention projection type
separately (Q, K, V, O; GPT-2's fused QKV counts as one type), the group's L weight
matrices are treated as L samples of a matrix-valued variable and decomposed by matrix
PCA: the mean matrix plus the top S principal matrices are the shared atoms, and each
block keeps only its coefficients (its projection onto the atoms; 1 for the mean).
Stored per type and group: (S + 1) atoms + L (S + 1) coefficients (+ biases, per block),
against L dense matrices. The target ratio sets S (the same fraction of every type is
kept, to the nearest atom); no calibration data and no tuning are used.
Options in `Recipe.extra`: `group_size` (blocks per group; default: all blocks).
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters.base import Adapter, get_path, set_path
from ..budget import BudgetError, GroupBudget, Plan
from ..modules.atoms import AtomLinear, MatrixAtoms
from ..modules.weights import weight_out_in
from ..recipe import Recipe, make_groups
from .base import Compressed, Group, Method


def matrix_pca(mats: list[torch.Tensor], n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Atoms (1 + S x out x in: the mean, then the top principal matrices) and coefficients
    (L x 1 + S) with mats[l] ~ sum_k coef[l, k] atoms[k] (the best such fit in Frobenius norm)."""
    L = len(mats)
    shape = mats[0].shape
    M = torch.stack([m.double().flatten() for m in mats])  # L x m
    mean = M.mean(0)
    U, S, Vt = torch.linalg.svd(M - mean, full_matrices=False)
    k = min(n_components, Vt.shape[0])
    atoms = torch.cat([mean[None], Vt[:k]]).view(1 + k, *shape)
    coef = torch.cat([torch.ones(L, 1, dtype=M.dtype), U[:, :k] * S[:k]], dim=1)
    return atoms, coef


class MASA(Method):
    name = "masa"
    tunable = False
    whole_model = True
    scope = "attention"

    def groups(self, n_blocks: int, recipe: Recipe) -> list[list[int]]:
        if recipe.groups is not None:
            return make_groups(n_blocks, recipe)
        size = int(recipe.extra.get("group_size", n_blocks))
        return [list(range(i, min(i + size, n_blocks))) for i in range(0, n_blocks, size)]

    def _matrices(self, model: nn.Module, adapter: Adapter, blocks: list[int]) -> dict[str, list[nn.Module]]:
        if not adapter.attention:
            raise BudgetError(f"adapter {adapter.name!r} does not name the attention projections")
        layers = adapter.blocks(model)
        return {t: [get_path(layers[b], t) for b in blocks] for t in adapter.attention}

    def n_atoms(self, L: int, m: int, keep: float) -> int:
        """Atoms (mean included) that keep `keep` of L dense (out x in = m) matrices."""
        return max(1, min(L - 1, int(round(keep * L * m / (m + L)))))

    def plan_model(self, model: nn.Module, adapter: Adapter, groups: list[list[int]], total: int,
                   recipe: Recipe) -> Plan:
        if recipe.ratio_of == "mlp":
            raise BudgetError("masa compresses the attention: give the ratio of the 'model' or of the 'attention'")
        per_group = [self._matrices(model, adapter, g) for g in groups]
        attn = sum(m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                   for mats in per_group for ms in mats.values() for m in ms)
        removed = recipe.ratio * (total if recipe.ratio_of == "model" else attn)
        if removed >= attn:
            raise BudgetError(
                f"compression ratio {recipe.ratio} of the {recipe.ratio_of}'s parameters cannot be reached: masa "
                f"compresses the attention projections, which hold {attn:,} of {total:,} parameters; the feasible "
                f"range is 0 < ratio < {attn / (total if recipe.ratio_of == 'model' else attn):.3f}")
        keep = 1 - removed / attn
        budgets = []
        for g, mats in zip(groups, per_group):
            L, stored, dense, atoms = len(g), 0.0, 0, []
            for ms in mats.values():
                m = ms[0].weight.numel()
                bias = sum(x.bias.numel() for x in ms if getattr(x, "bias", None) is not None)
                k = self.n_atoms(L, m, keep) if L > 1 else 1
                if L == 1:  # nothing to share with: kept dense
                    stored += m + bias
                else:
                    stored += k * m + L * k + bias
                dense += L * m + bias
                atoms.append(k)
            budgets.append(GroupBudget(rank=max(atoms), nnz=0, stored=stored, dense=dense, v_size=0,
                                       ranks=tuple(atoms)))
        plan = Plan(keep=keep, groups=tuple(budgets), total_params=total, mlp_params=attn,
                    target_removed=int(removed))
        if plan.removed <= 0:
            raise BudgetError(f"masa: ratio {recipe.ratio} is too small to remove even one atom per projection "
                              f"(groups of {[len(g) for g in groups]} blocks)")
        return plan

    @torch.no_grad()
    def compress_whole(self, model: nn.Module, adapter: Adapter, recipe: Recipe, batches, plan: Plan) -> dict:
        from ..pipeline import BASES_ATTR

        prefix = adapter.blocks_path(model)
        shared = getattr(model, BASES_ATTR)
        errors = {}
        for g, (blocks, budget) in enumerate(zip(self.groups(len(adapter.blocks(model)), recipe), plan.groups)):
            if len(blocks) < 2:
                continue
            for t, (name, modules) in enumerate(self._matrices(model, adapter, blocks).items()):
                mats = [weight_out_in(m).float() for m in modules]
                atoms, coef = matrix_pca(mats, budget.ranks[t] - 1)
                store = MatrixAtoms(atoms.to(mats[0].dtype).contiguous())
                shared[f"atoms{g}_{t}"] = store
                num = den = 0.0
                for b, m, c, w in zip(blocks, modules, coef, mats):
                    bias = m.bias.detach().clone() if getattr(m, "bias", None) is not None else None
                    layer = AtomLinear(store, c.to(w.dtype), bias).requires_grad_(False)
                    num += float((layer.weight - w).pow(2).sum())
                    den += float(w.pow(2).sum())
                    set_path(model, f"{prefix}.{b}.{name}", layer)
                store.requires_grad_(False)
                errors[f"group {g} {name}"] = num / max(den, 1e-30)
        return {"weight_rel_err": errors}

    def init(self, group: Group, budget: GroupBudget, recipe: Recipe) -> Compressed:
        raise NotImplementedError("masa compresses the whole model at once (compress_whole)")

    def materialize(self, compressed: Compressed) -> None:
        raise NotImplementedError
