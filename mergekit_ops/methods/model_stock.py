"""model_stock: interpolate between the base and the mean of the fine-tunes by their agreement."""
from __future__ import annotations

import itertools

import torch

from .base import Method, Param, TensorJob


def merge_model_stock(job: TensorJob) -> torch.Tensor:
    """t = N*cos / (1 + (N-1)*cos), cos the mean pairwise cosine of the offsets (per row if filter_wise)."""
    base = job.base
    if job.params["filter_wise"]:
        offsets = [(x - base).reshape(-1, base.shape[-1]) if base.dim() else (x - base).reshape(1, 1)
                   for x in job.tensors]
    else:
        offsets = [(x - base).reshape(1, -1) for x in job.tensors]
    cos = torch.stack([
        ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-6)).clamp(-1, 1)
        for a, b in itertools.combinations(offsets, 2)
    ]).mean(0)
    n = len(offsets)
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), n * cos / denom)
    t = t.reshape(*base.shape[:-1], 1) if job.params["filter_wise"] and base.dim() else t.reshape(())
    mean = torch.stack(job.tensors).mean(0)
    return t * mean + (1 - t) * base


METHOD = Method(
    "model_stock", merge_model_stock,
    params=(Param("filter_wise", False, bool),),
    base="required", min_models=2,
    doc="Model Stock: interpolate from the base towards the mean of the models by their agreement.",
)
