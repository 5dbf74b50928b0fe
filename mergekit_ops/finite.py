"""NaN/Inf checks of merged tensors: an error must name the tensor, before anything is written."""
from __future__ import annotations

import math
from concurrent.futures import Executor

import torch

from .chunks import CHUNK

MIN_MAX_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # aminmax's CPU kernels


def part_is_finite(part: torch.Tensor) -> bool:
    """No NaN or Inf in a CPU tensor: its minimum and maximum are finite (both propagate NaN).
    One read-only pass, much faster than isfinite().all(), which writes a mask first (measured:
    docs/benchmarks.md)."""
    if part.dtype not in MIN_MAX_DTYPES:
        return not part.is_floating_point() or bool(torch.isfinite(part).all())
    if part.numel() == 0:
        return True
    low, high = torch.aminmax(part)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def all_finite(t: torch.Tensor, pool: Executor | None = None) -> bool:
    """No NaN or Inf in t: on the CPU chunk by chunk (on the pool if given); on a GPU one pass with
    one wait for its answer."""
    if t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    flat = t.reshape(-1)
    starts = range(0, flat.numel(), CHUNK)
    clean = lambda start: part_is_finite(flat[start:start + CHUNK])  # noqa: E731
    return all(pool.map(clean, starts) if pool is not None else map(clean, starts))
