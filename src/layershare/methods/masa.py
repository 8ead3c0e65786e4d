"""MASA, Matrix Atom Sharing in Attention (Zhussip et al., arXiv 2508.04581), post hoc.

For a group of blocks (default: all of them) and each attention projection type
separately (Q, K, V, O; GPT-2's fused QKV counts as one type), the group's L weight
matrices are treated as L samples of a matrix-valued variable and decomposed by matrix
PCA: the mean matrix plus the top S principal matrices are the shared atoms, and each
block keeps only its coefficients (its projection onto the atoms; 1 for the mean).
Stored per type and group: (S + 1) atoms + L (S + 1) coefficients (+ biases, per block),
against L dense matrices. The target ratio sets S (the same fraction of every type is
kept, to the nearest atom); no calibration data and no tuning are used.
Options (MASAConfig): `group_size` (blocks per group; default: all blocks), `groups`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layershare.adapters.base import Adapter, get_path, set_path
from layershare.compression.budget import BudgetError, GroupBudget, Plan, removal
from layershare.config import StageConfig, check_groups, make_groups, need
from layershare.methods.base import Group, WholeModelMethod
from layershare.modules.atoms import AtomLinear, MatrixAtoms
from layershare.modules.weights import weight_out_in


@dataclass
class MASAConfig(StageConfig):
    method = "masa"
    part = "attention"

    group_size: int | None = None  # blocks per group (None: all blocks in one group)
    groups: list[list[int]] | None = None  # explicit groups of block indices (overrides group_size)

    def validate(self) -> None:
        super().validate()
        need(self.group_size is None or self.group_size >= 1,
             f"{self.method}: group_size must be >= 1, got {self.group_size}")
        check_groups(self.method, self.groups)


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


class MASA(WholeModelMethod):
    """No calibration data and no tuning: each group's atoms come from its weights alone, so it
    needs no pass over the data (the whole-model driver: one call; SmolLM2-135M at 10%: 6 s,
    where the sequential driver's capture and group runs took 155 s; both on a shared machine)."""

    name = "masa"
    config_class = MASAConfig
    config: MASAConfig

    def linears(self, adapter: Adapter) -> dict[str, str]:
        if not adapter.attention:
            raise BudgetError(f"adapter {adapter.name!r} does not name the attention projections")
        return {t: "in" for t in adapter.attention}

    def groups(self, n_blocks: int) -> list[list[int]]:
        c = self.config
        return make_groups(n_blocks, c.group_size or n_blocks, c.groups, self.name)

    def _matrices(self, model: nn.Module, adapter: Adapter, blocks: list[int]) -> dict[str, list[nn.Module]]:
        layers = adapter.blocks(model)
        return {t: [get_path(layers[b], t) for b in blocks] for t in self.linears(adapter)}

    def n_atoms(self, L: int, m: int, keep: float) -> int:
        """Atoms (mean included) that keep `keep` of L dense (out x in = m) matrices."""
        return max(1, min(L - 1, int(round(keep * L * m / (m + L)))))

    def plan_model(self, model: nn.Module, adapter: Adapter, groups: list[list[int]], total: int,
                   bytes_per_param: int) -> Plan:
        c = self.config
        per_group = [self._matrices(model, adapter, g) for g in groups]
        attn = sum(m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                   for mats in per_group for ms in mats.values() for m in ms)
        removed = removal(self.name, c.ratio, c.ratio_of, self.part, attn, total)
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
            raise BudgetError(f"masa: ratio {c.ratio} is too small to remove even one atom per projection "
                              f"(groups of {[len(g) for g in groups]} blocks)")
        return plan

    @torch.no_grad()
    def compress(self, model: nn.Module, adapter: Adapter, batches, plan: Plan, ctx) -> dict:
        groups = self.groups(len(adapter.blocks(model)))
        errors = {}
        for g, (blocks, budget) in enumerate(zip(groups, plan.groups)):
            if len(blocks) < 2:  # nothing to share with: kept dense
                continue
            group = Group.of(model, adapter, g, blocks, self.linears(adapter))
            per = len(group.paths) // len(group.blocks)
            for t in range(per):
                idx = list(range(t, len(group.paths), per))  # this type's linear in every block
                mats = [weight_out_in(group.modules[j]).float() for j in idx]
                atoms, coef = matrix_pca(mats, budget.ranks[t] - 1)
                store = MatrixAtoms(atoms.to(mats[0].dtype).contiguous()).requires_grad_(False)
                ctx.store.add(g, f"t{t}", store)
                num = den = 0.0
                for j, c, w in zip(idx, coef, mats):
                    m = group.modules[j]
                    bias = m.bias.detach().clone() if getattr(m, "bias", None) is not None else None
                    layer = AtomLinear(store, c.to(w.dtype), bias).requires_grad_(False)
                    num += float((layer.weight - w).pow(2).sum())
                    den += float(w.pow(2).sum())
                    set_path(model, group.paths[j], layer)
                errors[f"group {g} {group.kinds[t]}"] = num / max(den, 1e-30)
        return {"weight_rel_err": errors}
