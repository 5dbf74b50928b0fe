"""nearswap: take the other model's value where it is near the base, keep the base elsewhere."""
from __future__ import annotations

import torch

from .job import TensorJob


def merge_nearswap(job: TensorJob) -> torch.Tensor:
    out = job.empty_output()

    def merge_chunk(sl, xs, base):
        w = (job.params["t"] / (base - xs[0]).abs().clamp_min(1e-6)).clamp_(0, 1)
        job.store(out, sl, torch.lerp(base, xs[0], w))
    job.map_chunks(merge_chunk)
    return out.view(job.shape)
