"""Truncated SVD of every MLP linear, each on its own (the classic low-rank baseline),
and SVD-LLM (Wang et al., arXiv 2403.07378): the same, but truncation-aware — the SVD is
taken of the weight whitened by the Cholesky factor of its calibration inputs' second
moment, so truncation minimises the output error on those inputs.

Every linear keeps the same fraction of its parameters: rank = keep * d*h / (d + h).
No sparsity and no tuning (the factors are dense; nothing is stored but U and V).

`update=True` (SVDConfig) adds SVD-LLM's layer-wise closed-form update: the input-side
factor is kept and the output side re-solved by least squares on the inputs the compressed
model feeds the layer (its earlier groups already compressed), target the dense layer's output
on those inputs (methods/lowrank.refit_output). Default off, as in SVD-LLM's step 1
("whitening only"); with plain `svd` it is SVD-LLM's "update only".
"""
from __future__ import annotations

from dataclasses import dataclass

from layershare.compression.budget import (
    GroupBudget,
    GroupShape,
    Plan,
    keep_fraction,
    make_plan,
    solve_dense,
)
from layershare.config import GroupedConfig
from layershare.methods.base import Compressed, Group, GroupMethod, Needs
from layershare.methods.lowrank import lowrank_linear


@dataclass
class SVDConfig(GroupedConfig):
    method = "svd"

    update: bool = False  # SVD-LLM's closed-form update on the compressed model's inputs


@dataclass
class SVDLLMConfig(SVDConfig):
    method = "svd-llm"


def per_linear_budget(shape: GroupShape, keep: float, rank: int | None = None) -> GroupBudget:
    """One rank for every linear of the group (each its own d x h_i factorisation)."""
    parts = [solve_dense(GroupShape(shape.d, (h,)), keep, rank) for h in shape.hs]
    stored = sum(p.stored for p in parts) + shape.n_bias
    return GroupBudget(rank=parts[0].rank, nnz=sum(p.nnz for p in parts), stored=stored,
                       dense=shape.dense, v_size=sum(p.v_size for p in parts), ranks=tuple(p.rank for p in parts))


class SVD(GroupMethod):
    name = "svd"
    config_class = SVDConfig
    config: SVDConfig
    whiten = False

    def needs(self) -> Needs:
        return Needs(grams=self.whiten, update_grams=self.config.update)

    def plan(self, shapes: list[GroupShape], total_params: int, bytes_per_param: int) -> Plan:
        c = self.config
        keep = 1.0 if c.rank else keep_fraction(shapes, total_params, c.ratio, c.ratio_of, method=self.name)
        return make_plan(shapes, total_params, keep, [per_linear_budget(s, keep, c.rank) for s in shapes])

    def init(self, group: Group, budget: GroupBudget) -> Compressed:
        modules, shared = {}, {}
        for j, (path, m, role, rank) in enumerate(zip(group.paths, group.modules, group.roles, budget.ranks)):
            gram = group.grams[path] if self.whiten else None
            update = group.update_grams[path] if group.update_grams is not None else None
            basis, layer = lowrank_linear(m, role, rank, gram, update)
            modules[path] = layer
            shared[f"l{j}"] = basis
        return Compressed(modules=modules, shared=shared)


class SVDLLM(SVD):
    name = "svd-llm"
    config_class = SVDLLMConfig
    whiten = True
