"""nearswap: take the other model's value where it is near the base, keep the base elsewhere."""
from __future__ import annotations

import torch

from .base import Method, Param, TensorJob


def merge_nearswap(job: TensorJob) -> torch.Tensor:
    out = job.empty_output()

    def merge_chunk(sl, xs, base):
        w = (job.params["t"] / (base - xs[0]).abs().clamp_min(1e-6)).clamp_(0, 1)
        out[sl] = torch.lerp(base, xs[0], w)
    job.map_chunks(merge_chunk)
    return out.view(job.shape)


METHOD = Method(
    "nearswap", merge_nearswap,
    params=(Param("t", kind=float),),
    base="required", min_models=1, max_models=1,
    doc="Interpolate towards the other model by clamp(t / |base - x|, 0, 1) per element.",
)
