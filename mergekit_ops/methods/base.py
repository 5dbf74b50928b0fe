"""What a merge method declares: its parameters, its base-model contract, and where its code is.

Torch-free: recipes are checked against these declarations without importing torch (compose
checks every recipe on each `dvc repro`); a method's code is imported when it first merges.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A recipe parameter: its type, default (REQUIRED if none) and an optional range check."""

    name: str
    default: Any = REQUIRED
    kind: type = float
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    choices: tuple = ()
    aliases: tuple[tuple[Any, Any], ...] = ()  # accepted spellings, e.g. (True, "l1") for mergekit's booleans

    def coerce(self, value: Any) -> Any:
        """Convert a resolved scalar to this parameter's type, or raise TypeError/ValueError."""
        if value is None:
            return None
        for alias, meaning in self.aliases:
            if value is alias or (type(value) is type(alias) and value == alias):
                return meaning
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"expected true/false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"expected a number, got {value!r}")
            if self.kind is int and float(value) != int(value):
                raise TypeError(f"expected an integer, got {value!r}")
            return self.kind(value)
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}")
        return value


def in_range(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v):
        if v is None:
            return None
        if (v <= lo if lo_open else v < lo) or v > hi:
            return f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}"
        return None
    return check


@dataclass(frozen=True)
class Method:
    """A registered merge method and its input contract."""

    name: str
    implementation: str  # "module:name" in this package: the (TensorJob) -> merged tensor function
    params: tuple[Param, ...] = ()
    model_params: tuple[Param, ...] = ()
    base: str = "optional"  # "required" | "optional" | "input" (the base is merged like any other model)
    min_models: int = 1  # non-base inputs
    max_models: int | None = None
    doc: str = ""
    check: Callable[[dict[str, Any], list[dict[str, Any]]], str | None] | None = None  # per-tensor values
    # "module:name" of a function gathering whole-model statistics before merging:
    # (tasks, load, recipe source) -> {tensor: extra}
    preparation: str | None = None
    seeded: bool = False  # draws random numbers: the seed is part of what it builds

    @property
    def merge(self) -> Callable:
        """The implementation, imported on first use."""
        return _load(self.implementation)

    @property
    def prepare(self) -> Callable | None:
        return _load(self.preparation) if self.preparation else None

    def param(self, name: str, per_model: bool) -> Param | None:
        for p in self.model_params if per_model else self.params:
            if p.name == name:
                return p
        return None


@lru_cache(maxsize=None)
def _load(ref: str) -> Callable:
    module, function = ref.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)
