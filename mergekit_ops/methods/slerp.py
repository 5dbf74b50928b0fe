"""slerp: spherical interpolation between the base (t=0) and one other model (t=1)."""
from __future__ import annotations

import math

import torch

from .job import TensorJob

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, sq0: float, sq1: float, dot: float) -> tuple[float, float]:
    """Coefficients of (v0, v1) from the squared norms and dot product of the flattened tensors.

    The angle is that of the unit vectors (norms at or below 1e-8 count as 1); the raw tensors
    are interpolated. Nearly colinear inputs (|cos| > 0.9995) fall back to linear interpolation.
    """
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cos = dot / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
    cos = min(max(cos, -1.0), 1.0)
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin(theta * (1 - t)) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


def merge_slerp(job: TensorJob) -> torch.Tensor:
    """Two streamed passes: norms and dot product (float64 sums), then the interpolation."""
    sq0, sq1, dot = job.sum_chunks(lambda sl, xs, base: (float(torch.dot(base, base)), float(torch.dot(xs[0], xs[0])),
                                                         float(torch.dot(base, xs[0]))), 3)
    c0, c1 = slerp_coefficients(job.params["t"], sq0, sq1, dot)
    return job.weighted_sum([c1], c0)
