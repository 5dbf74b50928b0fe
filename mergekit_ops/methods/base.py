"""What a merge method declares (parameters, base-model contract) and what it receives per tensor."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

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


@dataclass
class TensorJob:
    """One output tensor's inputs, in the compute dtype, with resolved parameters."""

    name: str
    tensors: list[torch.Tensor]  # the non-base inputs, recipe order
    base: torch.Tensor | None
    model_params: list[dict[str, Any]]  # one dict per entry of `tensors`
    params: dict[str, Any]
    seed: int = 0
    layer_t: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # whole-model statistics (trim_scope: model)

    def generator(self, index: int) -> torch.Generator:
        """A generator private to (seed, tensor, input): results never depend on scheduling."""
        digest = hashlib.blake2b(f"{self.seed}\0{self.name}\0{index}".encode(), digest_size=8).digest()
        device = self.tensors[0].device if self.tensors else torch.device("cpu")
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        return gen


@dataclass(frozen=True)
class Method:
    """A registered merge method and its input contract."""

    name: str
    merge: Callable[[TensorJob], torch.Tensor]
    params: tuple[Param, ...] = ()
    model_params: tuple[Param, ...] = ()
    base: str = "optional"  # "required" | "optional" | "input" (the base is merged like any other model)
    min_models: int = 1  # non-base inputs
    max_models: int | None = None
    random: bool = False
    doc: str = ""
    check: Callable[[dict[str, Any], list[dict[str, Any]]], str | None] | None = None  # per-tensor values
    # whole-model statistics gathered before merging: (tasks, load, recipe source) -> {tensor: extra}
    prepare: Callable[[list, Callable, str], dict[str, dict]] | None = None


    def param(self, name: str, per_model: bool) -> Param | None:
        for p in self.model_params if per_model else self.params:
            if p.name == name:
                return p
        return None
