"""Typed stage configs: the base every method's config derives from, and their validation.

A method's options are one dataclass in the method's own file (methods/fips.py holds
`FiPSConfig`). Every field is type-checked on construction from its annotation (`float`,
`int`, `bool`, `str`, `Literal[...]`, `X | None`, `list[...]`): a string where a number
belongs, 2.5 steps or `true` samples is an error that names the method and the field, and
so is an unknown key. `to_dict` / `from_dict` are the YAML form (with the method's name).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

PARTS = {"mlp": "the MLPs", "attention": "the attention projections", "weights": "every linear weight's precision"}


class RecipeError(ValueError):
    """A recipe or stage config that cannot be run: unknown key, wrong type, value out of range."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value, tp, where: str):
    """`value` checked against the annotation `tp` (an int is accepted as a float, a tuple as a
    list); raises RecipeError naming `where` otherwise."""
    origin = typing.get_origin(tp)

    def bad():
        return RecipeError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except RecipeError:
                continue
        raise bad()
    if origin is Literal:
        if isinstance(value, bool) or value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def check_fields(obj, label: str, skip: tuple[str, ...] = ()) -> None:
    """Type-check (and normalise) every dataclass field of `obj` but `skip` against its
    annotation; errors are prefixed with `label`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name not in skip:
            setattr(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f"{label}: {f.name}"))


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise RecipeError(msg)


@dataclass
class StageConfig:
    """What every method's config has: how much to remove, and of what.

    ratio: the fraction of parameters removed; ratio_of: of the whole model's parameters
    ("model") or of the part the method compresses (its `part`: "mlp" or "attention").
    """

    method: ClassVar[str] = ""
    part: ClassVar[str] = "mlp"  # what the method compresses (the ratio_of it accepts besides "model")
    sized_by: ClassVar[tuple[str, ...]] = ()  # fields that, when set, size the stage instead of the ratio

    ratio: float = 0.2
    ratio_of: Literal["model", "mlp", "attention"] = "model"

    def __post_init__(self) -> None:
        check_fields(self, self.method)
        self.validate()

    def validate(self) -> None:
        """Range checks; a subclass extends it (and calls super)."""
        need(0 < self.ratio < 1, f"{self.method}: ratio must be in (0, 1), got {self.ratio}")
        need(self.ratio_of in ("model", self.part),
             f"{self.method}: ratio_of must be 'model' or {self.part!r} (it compresses {PARTS[self.part]}), "
             f"got {self.ratio_of!r}")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        d = {k: v for k, v in d.items() if k != "method"}
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise RecipeError(f"{cls.method}: unknown option(s) {unknown}; its options: {', '.join(cls.field_names())}")
        return cls(**d)


@dataclass
class GroupedConfig(StageConfig):
    """A method that compresses groups of adjacent blocks, one group after another.

    group_size: blocks per group; groups: explicit groups of block indices (overrides
    group_size); propagate: the next group's inputs are the dense model's hidden states
    ("dense") or those of the model compressed so far ("compressed"); rank: one rank for every
    group's factors instead of the ratio.
    """

    group_size: int = 2
    groups: list[list[int]] | None = None
    propagate: Literal["dense", "compressed"] = "dense"
    rank: int | None = None  # an explicit rank instead of the ratio (the ratio is then whatever it comes to)
    sized_by: ClassVar[tuple[str, ...]] = ("rank",)

    def validate(self) -> None:
        super().validate()
        need(self.group_size >= 1, f"{self.method}: group_size must be >= 1, got {self.group_size}")
        need(self.rank is None or self.rank >= 1, f"{self.method}: rank must be >= 1, got {self.rank}")
        check_groups(self.method, self.groups)


def check_groups(method: str, groups: list[list[int]] | None) -> None:
    if groups is None:
        return
    flat = [i for g in groups for i in g]
    need(all(len(g) >= 1 for g in groups), f"{method}: every explicit group needs at least one block")
    need(len(flat) == len(set(flat)), f"{method}: explicit groups overlap: {groups}")
    need(all(i >= 0 for i in flat), f"{method}: block indices must be >= 0: {groups}")


def make_groups(n_blocks: int, group_size: int, groups: list[list[int]] | None = None,
                method: str = "") -> list[list[int]]:
    """Groups of adjacent blocks (the last one may be smaller), or the explicit groups."""
    if groups is not None:
        bad = [i for g in groups for i in g if not 0 <= i < n_blocks]
        if bad:
            raise RecipeError(f"{method}: explicit groups name blocks {bad}, but the model has blocks 0..{n_blocks - 1}")
        return [list(g) for g in groups]
    return [list(range(i, min(i + group_size, n_blocks))) for i in range(0, n_blocks, group_size)]
