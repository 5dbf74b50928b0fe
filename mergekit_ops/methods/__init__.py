"""Registry of merge methods by their mergekit names."""
from __future__ import annotations

from . import linear, model_stock, nearswap, passthrough, sce, slerp, spherical, task_arithmetic
from .base import Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in [linear.METHOD, slerp.METHOD, nearswap.METHOD, passthrough.METHOD, model_stock.METHOD, sce.METHOD,
              *spherical.METHODS, *task_arithmetic.METHODS]
}
