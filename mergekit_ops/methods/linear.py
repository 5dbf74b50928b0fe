"""linear (model soups): sum(w_i * x_i) / sum(w_i)."""
from __future__ import annotations

import torch

from .job import TensorJob


def merge_linear(job: TensorJob) -> torch.Tensor:
    weights = [p["weight"] for p in job.model_params]
    scale = 1.0 / sum(weights) if job.params["normalize"] else 1.0
    return job.weighted_sum([w * scale for w in weights])
