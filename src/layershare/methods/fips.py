"""FiPS: Fine-grained Parameter Sharing (Üyük et al., arXiv 2411.09816).

For a group of adjacent blocks, every MLP weight is written in d x h form and all are
concatenated along h: W = [W_1 | ... | W_m] (d x H). Its SVD W = U S Vt gives the shared
basis U[:, :r] and V = S Vt[:r] (r x H), sliced back into per-matrix V_i, so W_i ~ U V_i.
V is pruned globally over the group (static, or gradual GMP), ranked by |V| (the paper's,
`prune_score="magnitude"`) or, by default, by the MLP-output change each entry causes on
calibration data (`"activation"`, not in the paper; sparsity.ActivationScore), and U, V_i (and
biases) are tuned so each compressed MLP reproduces the dense MLP's output on calibration inputs.
When the budget asks for r > min(d, H), U is padded with zero columns and V with copies
of its top rows divided by tau = 32, as the official code does.

`FiPSConfig.init = "whitened"` (not in the paper) starts from the SVD of the data-whitened
weights instead: every d x h block is multiplied on the d side by L_x^T (L_x L_x^T = the
pooled second moment of the group's MLP inputs) and the blocks whose h side is their input
(down/fc2) on the right by their own L_h; U = L_x^-T U' and V_i = V'_i L_h^-1 undo it. For
up/gate this is SVD-LLM's truncation-aware whitening with one metric shared by the group
(Basis Sharing's); for down the h side gets its own input metric and the d side (its output)
the group's input metric, an approximation that keeps U shared.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from layershare.adapters.base import IN, Adapter
from layershare.compression.budget import (
    BudgetError,
    GroupBudget,
    GroupShape,
    Plan,
    allocated_keeps,
    fixed_rank_plan,
    keep_fraction,
    make_plan,
    parse_nm,
    plan,
    solve_pattern,
    width_density,
)
from layershare.compression.objectives import resolve_objective
from layershare.compression.sparsity import ActivationScore, GroupPruner
from layershare.config import GroupedConfig, need
from layershare.methods.base import Compressed, Group, GroupMethod, Needs
from layershare.methods.lowrank import cholesky
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.modules.weights import weight_dxh


@dataclass
class FiPSConfig(GroupedConfig):
    """FiPS's options (besides ratio, ratio_of, group_size, groups, propagate)."""

    method = "fips"

    # V's sparsity pattern: "unstructured" (the paper's: any `sparsity`), N:M ("2:4", "1:4": n of
    # every m entries along the input axis of each V's linear), "none" (a dense V: no bitmask, the
    # rank takes the whole budget; what runs fastest: docs/runtime.md), or "auto": "unstructured"
    # when `sparsity` is given, else AUTO_PATTERN
    pattern: Literal["auto", "unstructured", "2:4", "1:4", "none"] = "auto"
    # fraction of V entries pruned (the budget solver then picks the rank); unset: for "unstructured"
    # the sparsity at which the rank equals the model width d (budget.width_density), within
    # AUTO_SPARSITY; fixed by the others (1 - n/m, 0 for "none")
    sparsity: Optional[float] = None
    schedule: Literal["gradual", "static"] = "gradual"  # GMP's cubic ramp, or the final mask from the init
    prune_every: int = 10  # steps between mask updates (gradual)
    prune_end: float = 0.75  # fraction of the steps after which the mask is final (gradual)
    # rank V entries by the MLP-output error their removal causes, estimated from activation
    # statistics ("activation", the default, not in the paper; sparsity.py) or by |V| ("magnitude",
    # the paper's). Validation ppl at 20%: Gemma-3-270M 267.3 vs 343.5, SmolLM2-135M 30.44 vs 31.84
    prune_score: Literal["magnitude", "activation"] = "activation"
    # optimiser steps per group (0: init only; the most a group takes, see full_steps_error).
    # Validation ppl at 20%, every group these steps: SmolLM2-135M 29.37 at 400, 29.43 at 320,
    # 29.50 at 280 (8.3 min instead of 10-11); Gemma-3-270M 91.2 at 400, 99.6 at 280
    steps: int = 400
    # a group whose one-shot error e (its init's relative error at the final mask) is below this
    # tunes for steps * max(min_steps_fraction, e / full_steps_error) steps; None: every group
    # `steps`. One-shot errors at 20%: SmolLM2-135M's groups 0.0001-0.063 (mostly 0.7 x 400 steps),
    # Gemma-3-270M's 0.072-0.32 (all 400: the fewer steps cost it 9%, SmolLM2 under 1%)
    full_steps_error: Optional[float] = 0.07
    min_steps_fraction: float = 0.7
    # "whitened" (SVD of the data-whitened weights; the default: Gemma-3-270M at 20% validation
    # ppl 343 vs 405 for "svd") or "svd" (of the raw weights, the paper's)
    init: Literal["whitened", "svd"] = "whitened"
    lr: float = 1e-3  # chosen on a validation book (Mansfield Park): 1e-4 -> ppl 37.4, 1e-3 -> 34.5 at 20%
    weight_decay: float = 0.0
    batch_tokens: int = 1024  # tokens per optimiser step
    # the dtype of the tuning's matrix products (torch.autocast; parameters, Adam and the loss stay
    # float32): "auto" = bfloat16 where the device computes it in hardware (a CPU with AVX512-BF16
    # or AMX, a CUDA GPU with bfloat16), else float32
    tune_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    loss: Literal["mse", "nmse"] = "mse"  # "nmse": each block's error divided by its output energy
    objective: Literal["auto", "mlp", "residual", "block"] = "auto"  # what the tuning matches (objectives.py)
    train_basis: bool = True  # tune the shared basis U too (else only V)
    # rescale U's columns and V's rows to equal norms before tuning (balance(); the products, the
    # pruning score and the mask are unchanged, AdamW's steps are not); not in the paper
    balance: bool = True
    # quantization-aware tuning: U and V pass through fake quantization (straight-through) on the grid
    # a following quantization stage stores (`--bits B --quant qat` sets these and that stage)
    qat_bits: Optional[int] = None
    qat_group_size: int = 128
    qat_symmetric: bool = False  # the quantization stage's default grid (QuantConfig.symmetric)
    # how the removal is split over the groups (the stage's total unchanged): "uniform", every group
    # removes the same fraction of its parameters; "error", by the rise of the model's loss when each
    # group alone is compressed one-shot, measured before any group is (compression/allocate.py); or one positive weight per group
    # (group g removes a share proportional to weight g times its size). With the width rule each
    # group gets its own sparsity (rank at d)
    allocation: Union[Literal["uniform", "error"], list[float]] = "uniform"

    def validate(self) -> None:
        super().validate()
        m = self.method
        if self.sparsity is not None:
            need(0 <= self.sparsity < 1, f"{m}: sparsity must be in [0, 1), got {self.sparsity}")
            fixed = {"none": 0.0, "2:4": 0.5, "1:4": 0.75}.get(self.pattern)
            need(fixed is None or abs(self.sparsity - fixed) < 1e-9,
                 f"{m}: pattern {self.pattern!r} fixes the sparsity at {fixed}; got sparsity {self.sparsity} "
                 f"(leave it unset, or use pattern 'unstructured')")
        need(self.steps >= 0, f"{m}: steps must be >= 0, got {self.steps}")
        need(self.full_steps_error is None or self.full_steps_error > 0,
             f"{m}: full_steps_error must be > 0 (or None: every group `steps`), got {self.full_steps_error}")
        need(0 < self.min_steps_fraction <= 1, f"{m}: min_steps_fraction must be in (0, 1], got {self.min_steps_fraction}")
        need(self.prune_every >= 1, f"{m}: prune_every must be >= 1, got {self.prune_every}")
        need(0 < self.prune_end <= 1, f"{m}: prune_end must be in (0, 1], got {self.prune_end}")
        need(self.batch_tokens >= 1, f"{m}: batch_tokens must be >= 1, got {self.batch_tokens}")
        need(self.lr > 0, f"{m}: lr must be > 0, got {self.lr}")
        if self.qat_bits is not None:
            from layershare.quant.grid import QuantSpec

            need(self.qat_bits in (2, 3, 4, 8), f"{m}: qat_bits must be one of 2, 3, 4, 8, got {self.qat_bits}")
            need(self.qat_group_size >= 1, f"{m}: qat_group_size must be >= 1, got {self.qat_group_size}")
            QuantSpec(self.qat_bits, self.qat_group_size, self.qat_symmetric)


    @property
    def resolved_pattern(self) -> str:
        if self.pattern != "auto":
            return self.pattern
        return "unstructured" if self.sparsity is not None else AUTO_PATTERN

    @property
    def density(self) -> float | None:
        """Fraction of V's entries kept (None: unstructured at the width rule's density, which
        depends on the budget: FiPS.plan)."""
        p = self.resolved_pattern
        if p == "unstructured":
            return None if self.sparsity is None else 1.0 - self.sparsity
        if p == "none":
            return 1.0
        n, m = parse_nm(p)
        return n / m


# what pattern="auto" builds when no sparsity is given: see docs/runtime.md
AUTO_PATTERN = "unstructured"
# the range of the sparsity chosen by the width rule (sparsity unset): docs/analysis.md
AUTO_SPARSITY = (0.4, 0.8)
# allocation="error": each group removes between these multiples of the uniform fraction
ALLOCATION_RANGE = (0.5, 2.0)


def auto_density(shapes: list[GroupShape], keep: float, bytes_per_param: int) -> float:
    """V's density when no sparsity is given: the width rule's, within AUTO_SPARSITY."""
    lo, hi = AUTO_SPARSITY
    return width_density(shapes, keep, bytes_per_param, 1.0 - hi, 1.0 - lo)

PAD_TAU = 32.0


def _top_basis(G: torch.Tensor, k: int) -> torch.Tensor:
    """The top k eigenvectors (d x k, float64, descending) of the symmetric d x d matrix G."""
    evals, U = torch.linalg.eigh(G)
    return U.flip(1)[:, :k]


def _project(P: torch.Tensor, mats: list[torch.Tensor], rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """V_i = P^T W_i (float64, one at a time, stored in `dtype`), padded to `rank` rows: when the
    budget asks for more rank than the matrices have, the rest of V repeats its top rows / PAD_TAU."""
    k = P.shape[1]
    out = []
    for m in mats:
        V = P.t() @ m.double()
        if rank > k:
            V = torch.cat([V, V[torch.arange(rank - k, device=V.device) % k] / PAD_TAU], dim=0)
        out.append(V.to(dtype).contiguous())
        del V
    return out


def _pad(U: torch.Tensor, rank: int) -> torch.Tensor:
    """U with zero columns up to `rank` (their V rows are the padding above)."""
    return torch.cat([U, U.new_zeros(U.shape[0], rank - U.shape[1])], dim=1) if rank > U.shape[1] else U


def shared_svd(mats: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U (d x rank) and the per-matrix V_i (rank x h_i) of the concatenated matrices [W_1 ... W_n]:
    U the top eigenvectors of sum_i W_i W_i^T (d x d, float64), V_i = U^T W_i (the truncated SVD;
    d x d and one matrix at a time, never the d x sum(h_i) concatenation and its SVD's copies)."""
    dtype, d = mats[0].dtype, mats[0].shape[0]
    G = torch.zeros(d, d, dtype=torch.float64, device=mats[0].device)
    for m in mats:
        m64 = m.double()
        G.addmm_(m64, m64.t())
        del m64
    U = _top_basis(G, min(d, sum(m.shape[1] for m in mats), rank))
    del G
    Vs = _project(U, mats, rank, dtype)
    return _pad(U, rank).to(dtype).contiguous(), Vs


def whitened_shared_svd(mats: list[torch.Tensor], roles: list[str], grams: list[torch.Tensor | None],
                        rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """shared_svd of the whitened blocks, mapped back (see the module docstring), without any
    h x h factor: with W'_i = L_x^T W_i L_i (L_i L_i^T = G_i, a down projection's input moment;
    L_i = I for up/gate), sum_i W'_i W'_i^T = L_x^T (sum_i W_i G_i W_i^T) L_x, whose top
    eigenvectors are U'; then U = L_x^-T U' and V_i = V'_i L_i^-1 = U'^T L_x^T W_i (L_i cancels).
    `grams` is emptied as it goes (an h x h float64 moment is freed once used)."""
    dtype, d = mats[0].dtype, mats[0].shape[0]
    Lx = cholesky(sum(g for g, r in zip(grams, roles) if r == IN))
    S = torch.zeros(d, d, dtype=torch.float64, device=Lx.device)
    for i, (m, r) in enumerate(zip(mats, roles)):
        m64 = m.double()
        S.addmm_(m64 if r == IN else m64 @ grams[i].double(), m64.t())
        grams[i] = None
        del m64
    grams.clear()
    U = _top_basis(Lx.t() @ S @ Lx, min(d, sum(m.shape[1] for m in mats), rank))
    del S
    Vs = _project(Lx @ U, mats, rank, dtype)
    U = torch.linalg.solve_triangular(Lx.t(), U, upper=True)  # L_x^-T U'
    return _pad(U, rank).to(dtype).contiguous(), Vs


def balance(U: torch.Tensor, Vs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U D and D^-1 V_i with D diagonal such that every column of U and the matching row of
    [V_1 ... V_n] have the same norm (the products U V_i unchanged; zero columns left as they are)."""
    col = U.double().norm(dim=0)
    row = torch.zeros_like(col)
    for V in Vs:
        row += V.double().pow(2).sum(dim=1)
    row = row.sqrt()
    scale = torch.where((col > 0) & (row > 0), (row / col.clamp_min(1e-300)).sqrt(), torch.ones_like(col))
    U = (U.double() * scale).to(U.dtype).contiguous()
    Vs = [(V.double() / scale[:, None]).to(V.dtype).contiguous() for V in Vs]
    return U, Vs


class FiPS(GroupMethod):
    name = "fips"
    config_class = FiPSConfig
    config: FiPSConfig

    def needs(self) -> Needs:
        c = self.config
        return Needs(grams=c.init == "whitened" or c.prune_score == "activation", tuning=True,
                     probe=c.allocation == "error")

    def probe_plans(self, model, adapter: Adapter, groups: list[list[int]], total_params: int,
                    bytes_per_param: int) -> list[Plan]:
        """The plans a sensitivity probe compresses every group at (allocate.py): uniform at the
        ratio, and uniform at PROBE_STEP of it."""
        from layershare.compression.allocate import PROBE_STEP

        uniform = dataclasses.replace(self.config, allocation="uniform")
        lower = dataclasses.replace(uniform, ratio=uniform.ratio * PROBE_STEP)
        return [FiPS(c).plan_model(model, adapter, groups, total_params, bytes_per_param) for c in (uniform, lower)]

    def allocate(self, model, adapter: Adapter, groups: list[list[int]], total_params: int, bytes_per_param: int,
                 plans: list[Plan], errors: list[list[float]]) -> Plan | None:
        """The plan whose per-group removal minimises the summed loss increases the probe measured at
        `plans` (`errors`; log-linear in the removed fraction, one slope: allocate.split_by_error),
        each group removing between half and twice the uniform fraction. None when no group's loss
        grows with removal (nothing to split by)."""
        from layershare.compression.allocate import common_slope, split_by_error

        removed = [[1 - g.stored / g.dense for g in p.groups] for p in plans]
        slope = common_slope(errors, [list(r) for r in zip(*removed)])
        if slope is None:
            return None
        split = split_by_error(removed[0], [g.dense for g in plans[0].groups], [e[0] for e in errors], slope,
                               ALLOCATION_RANGE[0], ALLOCATION_RANGE[1])
        weights = [r / r0 for r, r0 in zip(split, removed[0])]
        return FiPS(dataclasses.replace(self.config, allocation=weights)).plan_model(
            model, adapter, groups, total_params, bytes_per_param)

    def objective(self, adapter: Adapter):
        return resolve_objective(self.config.objective, adapter)

    def plan(self, shapes: list[GroupShape], total_params: int, bytes_per_param: int) -> Plan:
        c = self.config
        pattern = c.resolved_pattern
        if pattern not in ("unstructured", "none"):
            n, m = parse_nm(pattern)
            bad = [h for s in shapes for h, role in zip(s.hs, s.roles) if role != IN and h % m]
            if bad or (c.rank and c.rank % m):
                raise BudgetError(f"{self.name}: pattern {pattern} needs the rank and the MLP width of every "
                                  f"down projection to be multiples of {m} (rank {c.rank}, widths {sorted(set(bad))})")
        density = c.density
        allocated = isinstance(c.allocation, list)
        if c.rank and c.allocation != "uniform":
            raise BudgetError(f"{self.name}: allocation splits a ratio over the groups; with an explicit rank "
                              "there is none (unset one of them)")
        if allocated:
            keep = keep_fraction(shapes, total_params, c.ratio, c.ratio_of, method=self.name)
            keeps = allocated_keeps(shapes, keep, list(c.allocation), self.name)
            return make_plan(shapes, total_params, keep, [
                solve_pattern(s, k, pattern, density if density is not None else auto_density([s], k, bytes_per_param),
                              bytes_per_param)
                for s, k in zip(shapes, keeps)])
        if c.rank:  # explicit rank: the ratio is whatever it comes to
            return fixed_rank_plan(shapes, total_params, c.rank, 0.5 if density is None else density,
                                   0 if pattern == "none" else bytes_per_param)
        if density is None:
            keep = keep_fraction(shapes, total_params, c.ratio, c.ratio_of, method=self.name)
            density = auto_density(shapes, keep, bytes_per_param)
        return plan(shapes, total_params, c.ratio, c.ratio_of, density, bytes_per_param, self.name, pattern)

    def init(self, group: Group, budget: GroupBudget) -> Compressed:
        c = self.config
        # everything below runs where the statistics are (the recipe's device), in float64
        device = group.stats_device
        mats = [weight_dxh(m, role, device).float() for m, role in zip(group.modules, group.roles)]
        pattern = c.resolved_pattern
        stats = None  # what the activation score keeps of the second moments (a down projection's diagonal)
        if c.prune_score == "activation" and pattern != "none":
            stats = ActivationScore.statistics(group.roles, [group.grams[p] for p in group.paths])
        if c.init == "whitened":
            # the init frees the group's second moments as it goes (an h x h float64 one is a group's
            # largest tensor): nothing else reads them after init
            grams = [group.grams.pop(p) for p in group.paths]
            U, Vs = whitened_shared_svd(mats, group.roles, grams, budget.rank)
        else:
            U, Vs = shared_svd(mats, budget.rank)
        del mats
        if c.balance:
            U, Vs = balance(U, Vs)
        basis = SharedBasis(U)
        layers = {}
        for path, m, role, V in zip(group.paths, group.modules, group.roles, Vs):
            bias = m.bias.detach().clone().float() if getattr(m, "bias", None) is not None else None
            layers[path] = SharedBasisLinear(basis, V, role, bias)
        params = [basis.U] + [p for layer in layers.values() for p in (layer.V, layer.bias) if p is not None]
        basis.U.requires_grad_(c.train_basis)
        if c.qat_bits is not None:
            from layershare.quant.grid import QuantSpec

            basis.fake_quant = QuantSpec(c.qat_bits, c.qat_group_size, c.qat_symmetric)
            basis.fake_quant_input_first = any(layer.role == IN for layer in layers.values())
            for layer in layers.values():
                layer.fake_quant = basis.fake_quant
        if pattern == "none":
            return Compressed(modules=layers, shared={"basis": basis}, params=params, pruner=None)
        score = ActivationScore(list(layers.values()), stats, group.block_of()) if stats is not None else None
        pruner = GroupPruner(list(layers.values()), budget.nnz, c.schedule, c.steps,
                             every=c.prune_every, end=c.prune_end, score=score,
                             nm=None if pattern == "unstructured" else parse_nm(pattern))
        return Compressed(modules=layers, shared={"basis": basis}, params=params, pruner=pruner)

    def materialize(self, compressed: Compressed) -> None:
        if compressed.pruner is not None:
            compressed.pruner.finish()
        compressed.shared["basis"].forget()
        compressed.shared["basis"].fake_quant = None  # the quantization stage stores the same grid
        for layer in compressed.modules.values():
            layer.fake_quant = None
            layer.pack()
        for shared in compressed.shared.values():
            for p in shared.parameters():
                p.requires_grad_(False)
