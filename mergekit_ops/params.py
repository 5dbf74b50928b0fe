"""Parameter values as recipes write them: scalar, gradient list, or filter list.

A gradient `[a, b, c]` is sampled piecewise-linearly at t = layer / (layers - 1) within a slice;
tensors outside the layer stack (embeddings, final norm, lm_head) take t = 0, the first value.
A filter list `[{filter: mlp, value: ...}, {value: ...}]` picks the first entry whose filter is a
substring of the tensor name; an entry without `filter`, or with `filter: "*"`, matches everything.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import RecipeError


def check_value(value: Any, source: str, key: str) -> None:
    """Reject malformed parameter values at load time, before any tensor is read."""
    if isinstance(value, list):
        if not value:
            raise RecipeError("empty list is not a parameter value", source, key)
        if all(isinstance(v, dict) for v in value):
            for i, entry in enumerate(value):
                extra = set(entry) - {"filter", "value"}
                if "value" not in entry or extra:
                    raise RecipeError(
                        "filter-list entries need 'value' and optionally 'filter' (got keys "
                        f"{sorted(entry)})", source, f"{key}[{i}]")
                if "filter" in entry and not isinstance(entry["filter"], str):
                    raise RecipeError("'filter' must be a string", source, f"{key}[{i}].filter")
                check_value(entry["value"], source, f"{key}[{i}].value")
            return
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RecipeError(f"gradient entries must be numbers, got {v!r}", source, f"{key}[{i}]")
        return
    if isinstance(value, dict):
        raise RecipeError("a parameter value is a scalar, a gradient list or a filter list, not a mapping",
                          source, key)


def resolve(value: Any, tensor_name: str, t: float) -> Any:
    """The scalar a parameter takes for one tensor at relative layer position t in [0, 1]."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for entry in value:
            if entry.get("filter") in (None, "*") or entry["filter"] in tensor_name:  # "*": all, as mergekit
                return resolve(entry["value"], tensor_name, t)
        return None
    if isinstance(value, list):
        if len(value) == 1:
            return value[0]
        scaled = min(max(t, 0.0), 1.0) * (len(value) - 1)
        lo = min(int(math.floor(scaled)), len(value) - 2)
        frac = scaled - lo
        return value[lo] * (1 - frac) + value[lo + 1] * frac
    return value


def values_in(value: Any) -> list:
    """Every scalar a parameter value can take, for range checks at load time."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [v for entry in value for v in values_in(entry["value"])]
    if isinstance(value, list):
        return list(value)
    return [value]
