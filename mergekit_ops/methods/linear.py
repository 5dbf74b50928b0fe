"""linear (model soups): sum(w_i * x_i) / sum(w_i)."""
from __future__ import annotations

import torch

from .base import Method, Param, TensorJob, scratch


def merge_linear(job: TensorJob) -> torch.Tensor:
    weights = [p["weight"] for p in job.model_params]
    scale = 1.0 / sum(weights) if job.params["normalize"] else 1.0
    out = job.empty_output()

    def merge_chunk(sl, xs):
        acc = scratch(1, job.compute_dtype, out.device)[0][:sl.stop - sl.start].copy_(xs[0]).mul_(weights[0] * scale)
        for w, x in zip(weights[1:], xs[1:]):
            acc.add_(x, alpha=w * scale)  # mixed dtypes: converted inside the kernel, no copy pass
        out[sl] = acc
    job.map(lambda c: merge_chunk(*c), job.stored_chunks())
    return out.view(job.shape)


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
