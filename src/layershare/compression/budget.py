"""Target compression ratio -> rank and number of nonzeros per group.

Everything stored is counted: the shared basis U (d x r) once per group, the nonzeros of
every V_i, and the bitmask that says where they are (r x h_i bits per V_i), converted to
parameter-equivalents at the storage dtype (a bit is 1/(8*bytes) of a parameter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from layershare.config import PARTS


class BudgetError(ValueError):
    pass


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class GroupShape:
    """The MLP matrices of one group in d x h form: d and the list of h_i."""

    d: int
    hs: tuple[int, ...]
    n_bias: int = 0  # bias entries of the group's linears (kept dense)
    roles: tuple[str, ...] = ()  # "in"/"out" per matrix (which side of d x h reads the input)
    kinds: tuple[str, ...] = ()  # per matrix, its name within its block ("mlp.up_proj"): its type

    @property
    def H(self) -> int:
        return sum(self.hs)

    @property
    def dense(self) -> int:
        return self.d * self.H + self.n_bias


@dataclass(frozen=True)
class GroupBudget:
    rank: int
    nnz: int  # nonzeros of all V_i of the group together
    stored: float  # parameter-equivalents: d*r + nnz + bitmask + biases
    dense: int
    v_size: int  # rank * H: entries of all V_i before pruning
    ranks: tuple[int, ...] | None = None  # per matrix, for methods that factorise each on its own

    @property
    def density(self) -> float:
        return self.nnz / self.v_size


def mask_params(rank: int, H: int, bytes_per_param: int) -> float:
    """Bitmask over all V_i of a group, in parameter-equivalents (0 for dense V: bytes_per_param=0)."""
    return rank * H / (8 * bytes_per_param) if bytes_per_param else 0.0


def stored_params(shape: GroupShape, rank: int, nnz: int, bytes_per_param: int) -> float:
    return shape.d * rank + nnz + mask_params(rank, shape.H, bytes_per_param) + shape.n_bias


def solve_dense(shape: GroupShape, keep: float, rank: int | None = None) -> GroupBudget:
    """Rank of a dense factorisation U (d x r), V (r x H) that keeps `keep` of the parameters
    (or the given rank)."""
    if rank is None:
        rank = int((keep * shape.dense - shape.n_bias) // (shape.d + shape.H))
    if rank < 1:
        raise BudgetError(f"a matrix group with d={shape.d}, H={shape.H} cannot keep {keep:.1%} of its "
                          f"parameters: not even rank 1 fits")
    return GroupBudget(rank=rank, nnz=rank * shape.H, stored=stored_params(shape, rank, rank * shape.H, 0),
                       dense=shape.dense, v_size=rank * shape.H)


def solve_group(shape: GroupShape, keep: float, density: float, bytes_per_param: int) -> GroupBudget:
    """Largest rank whose storage at `density` fits keep * dense, then the nnz that hits it exactly
    (with one rank more when even a dense V of that rank would fall short)."""
    target = keep * shape.dense - shape.n_bias
    per_rank = shape.d + shape.H * density + mask_params(1, shape.H, bytes_per_param)
    rank = int(target // per_rank)
    if rank < 1:
        raise BudgetError(
            f"a group with d={shape.d}, H={shape.H} cannot keep {keep:.1%} of its MLP parameters "
            f"at V density {density:.2f}: not even rank 1 fits"
        )
    nnz = int(round(target - shape.d * rank - mask_params(rank, shape.H, bytes_per_param)))
    if nnz > rank * shape.H:  # dense V cannot absorb the remainder: one more rank, slightly sparser V
        rank += 1
        nnz = int(round(target - shape.d * rank - mask_params(rank, shape.H, bytes_per_param)))
    nnz = max(1, min(nnz, rank * shape.H))
    return GroupBudget(rank=rank, nnz=nnz, stored=stored_params(shape, rank, nnz, bytes_per_param),
                       dense=shape.dense, v_size=rank * shape.H)


def solve_nm(shape: GroupShape, keep: float, n: int, m: int, bytes_per_param: int) -> GroupBudget:
    """Largest rank (a multiple of m) whose storage with exactly n of every m entries of V kept
    fits keep * dense: the nonzeros are fixed by the pattern, so the group keeps slightly less
    than asked (at most m ranks' worth)."""
    target = keep * shape.dense - shape.n_bias
    per_rank = shape.d + shape.H * n / m + mask_params(1, shape.H, bytes_per_param)
    rank = int(target // per_rank) // m * m
    if rank < m:
        raise BudgetError(f"a group with d={shape.d}, H={shape.H} cannot keep {keep:.1%} of its MLP parameters "
                          f"with an {n}:{m} V: not even rank {m} fits")
    nnz = rank * shape.H * n // m
    return GroupBudget(rank=rank, nnz=nnz, stored=stored_params(shape, rank, nnz, bytes_per_param),
                       dense=shape.dense, v_size=rank * shape.H)


def solve_pattern(shape: GroupShape, keep: float, pattern: str, density: float, bytes_per_param: int) -> GroupBudget:
    """The group's budget for V's sparsity pattern: "unstructured" (at `density`), "N:M", or
    "none" (a dense V: no bitmask)."""
    if pattern == "none":
        return solve_dense(shape, keep)
    if pattern == "unstructured":
        return solve_group(shape, keep, density, bytes_per_param)
    n, m = parse_nm(pattern)
    return solve_nm(shape, keep, n, m, bytes_per_param)


def parse_nm(pattern: str) -> tuple[int, int]:
    n, m = (int(v) for v in pattern.split(":"))
    return n, m


@dataclass(frozen=True)
class Plan:
    keep: float  # fraction of MLP parameters each group keeps
    groups: tuple[GroupBudget, ...]
    total_params: int
    mlp_params: int  # parameters of the part the method compresses (the MLPs; the attention for masa)
    target_removed: int

    @property
    def removed(self) -> float:
        return sum(g.dense - g.stored for g in self.groups)

    @property
    def model_ratio(self) -> float:
        return self.removed / self.total_params

    @property
    def mlp_ratio(self) -> float:
        return self.removed / self.mlp_params


def out_of_range(method: str, ratio: float, of: str, why: str, lo: float, hi: float,
                 lo_inclusive: bool = False) -> BudgetError:
    """The one message for an unreachable ratio: what, why, and the feasible range."""
    low = f"{lo:.3f} <= ratio" if lo_inclusive else f"{lo:.3f} < ratio"
    return BudgetError(f"{method}: compression ratio {ratio} of the {of}'s parameters cannot be reached: {why}; "
                       f"the feasible range is {low} < {hi:.3f}")


def removal(method: str, ratio: float, of: str, part: str, part_params: int, total_params: int) -> float:
    """Parameters to remove for `ratio` of the `of`'s parameters ("model" or the `part` the
    method compresses, which holds `part_params`): the feasibility check every method uses."""
    what = PARTS[part]
    if of not in ("model", part):
        raise BudgetError(f"{method} compresses {what}: ratio_of must be 'model' or {part!r}, got {of!r}")
    base = total_params if of == "model" else part_params
    hi = part_params / base
    if not 0 < ratio < hi:
        raise out_of_range(method, ratio, of, f"only {what} are compressed, and they hold {part_params:,} of "
                                              f"{total_params:,} parameters", 0.0, hi)
    return ratio * base


def keep_fraction(shapes: list[GroupShape], total_params: int, ratio: float, of: str, part: str = "mlp",
                  method: str = "fips") -> float:
    """Fraction of its dense parameters every group keeps so that `ratio` is removed (`part`:
    what the method compresses, "mlp" or "attention")."""
    part_params = sum(s.dense for s in shapes)
    return 1.0 - removal(method, ratio, of, part, part_params, total_params) / part_params


def make_plan(shapes: list[GroupShape], total_params: int, keep: float, budgets) -> Plan:
    mlp = sum(s.dense for s in shapes)
    return Plan(keep=keep, groups=tuple(budgets), total_params=total_params, mlp_params=mlp,
                target_removed=int(math.floor((1 - keep) * mlp)))


def width_density(shapes: list[GroupShape], keep: float, bytes_per_param: int, lo: float, hi: float) -> float:
    """The V density at which the groups' rank equals their width d (the budget spent on
    d x d of U and the rest on V's nonzeros and bitmask, summed over the groups), clipped to
    [lo, hi]: below d a group buys rank with sparsity, above d extra rank adds little (the
    whole input space is spanned already)."""
    nnz = sum(keep * s.dense - s.n_bias - s.d * s.d - mask_params(s.d, s.H, bytes_per_param) for s in shapes)
    entries = sum(s.d * s.H for s in shapes)
    return min(hi, max(lo, nnz / entries))


def plan(shapes: list[GroupShape], total_params: int, ratio: float, of: str, density: float,
         bytes_per_param: int, method: str = "fips", pattern: str = "unstructured") -> Plan:
    """Split a target ratio (of the whole model's or of the MLPs' parameters) over the groups.

    Every group keeps the same fraction of its dense MLP parameters, so the total hits the
    target up to rounding of ranks (nnz absorbs the remainder exactly).
    """
    if not 0 < density <= 1:
        raise BudgetError(f"density must be in (0, 1], got {density}")
    keep = keep_fraction(shapes, total_params, ratio, of, method=method)
    return make_plan(shapes, total_params, keep,
                     [solve_pattern(s, keep, pattern, density, bytes_per_param) for s in shapes])


def allocated_keeps(shapes: list[GroupShape], keep: float, weights: list[float], method: str = "fips") -> list[float]:
    """The fraction each group keeps when the removal is split by `weights` (one per group,
    relative: group g removes a share of the stage's parameters proportional to weights[g] times
    its dense size), the total removal that of `keep` for every group."""
    if len(weights) != len(shapes):
        raise BudgetError(f"{method}: allocation has {len(weights)} weights for {len(shapes)} groups")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise BudgetError(f"{method}: allocation weights must be positive, got {list(weights)}")
    dense = [s.dense for s in shapes]
    scale = (1 - keep) * sum(dense) / sum(w * n for w, n in zip(weights, dense))
    keeps = [1 - w * scale for w in weights]
    if not all(0 < k < 1 for k in keeps):
        bad = [i + 1 for i, k in enumerate(keeps) if not 0 < k < 1]
        raise BudgetError(f"{method}: allocation {list(weights)} would make groups {bad} keep "
                          f"{', '.join(f'{keeps[i - 1]:.1%}' for i in bad)} of their parameters (each must keep "
                          "between 0% and 100%)")
    return keeps


def fixed_rank_plan(shapes: list[GroupShape], total_params: int, rank: int, density: float,
                    bytes_per_param: int) -> Plan:
    """Every group at the given rank and V density (no target ratio; density 1 with
    bytes_per_param 0: a dense V, no bitmask)."""
    groups = []
    for s in shapes:
        nnz = rank * s.H if density >= 1 else max(1, int(round(density * rank * s.H)))
        groups.append(GroupBudget(rank=rank, nnz=nnz, stored=stored_params(s, rank, nnz, bytes_per_param),
                                  dense=s.dense, v_size=rank * s.H))
    mlp = sum(s.dense for s in shapes)
    removed = sum(g.dense - g.stored for g in groups)
    return Plan(keep=1 - removed / mlp, groups=tuple(groups), total_params=total_params, mlp_params=mlp,
                target_removed=int(removed))


def split_ratio(model: nn.Module, ratio: float) -> tuple[float, float]:
    """The (MLP, attention) shares of a whole-model `ratio` that remove the same fraction of
    each part's weights (as the Basis Sharing paper compresses every matrix at one ratio); the
    weights of the linears only, biases not counted."""
    from layershare.adapters import get_adapter, get_path

    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    mlp, attn = (sum(get_path(b, n).weight.numel() for b in blocks for n in names)
                 for names in (adapter.linears, adapter.attention))
    return ratio * mlp / (mlp + attn), ratio * attn / (mlp + attn)
