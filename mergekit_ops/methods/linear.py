"""linear (model soups): sum(w_i * x_i) / sum(w_i)."""
from __future__ import annotations

import torch

from .base import Method, Param, TensorJob


def merge_linear(job: TensorJob) -> torch.Tensor:
    weights = [p["weight"] for p in job.model_params]
    scale = 1.0 / sum(weights) if job.params["normalize"] else 1.0
    return job.weighted_sum([w * scale for w in weights])


def check_linear(params: dict, model_params: list[dict]) -> str | None:
    if params["normalize"] and abs(sum(p["weight"] for p in model_params)) < 1e-8:
        return "the weights sum to 0, so normalize would divide by zero (set normalize: false)"
    return None


METHOD = Method(
    "linear", merge_linear,
    params=(Param("normalize", True, bool),),
    model_params=(Param("weight", kind=float),),
    base="input", min_models=1, check=check_linear,
    doc="Weighted average of the models (model soups).",
)
