"""slerp: spherical interpolation between the base (t=0) and one other model (t=1)."""
from __future__ import annotations

import math

import torch

from .base import Method, Param, TensorJob, in_range

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Angle from the unit vectors of the flattened tensors; the raw tensors are interpolated.

    Nearly colinear inputs (|cos| > 0.9995) fall back to linear interpolation.
    """
    n0, n1 = float(v0.norm()), float(v1.norm())
    dot = float((v0 / (n0 if n0 > EPS else 1.0) * (v1 / (n1 if n1 > EPS else 1.0))).sum())
    dot = min(max(dot, -1.0), 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, t)
    theta = math.acos(dot)
    s0 = math.sin(theta * (1 - t)) / math.sin(theta)
    s1 = math.sin(theta * t) / math.sin(theta)
    return v0 * s0 + v1 * s1


def merge_slerp(job: TensorJob) -> torch.Tensor:
    return slerp(job.params["t"], job.base, job.tensors[0])


METHOD = Method(
    "slerp", merge_slerp,
    params=(Param("t", kind=float, check=in_range(0.0, 1.0)),),
    base="required", min_models=1, max_models=1,
    doc="Spherical interpolation of two models; t=0 gives the base, t=1 the other.",
)
