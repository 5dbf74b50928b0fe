"""passthrough: copy one model's tensors (frankenmerges stack layer ranges with `slices`)."""
from __future__ import annotations

import torch

from .job import TensorJob


def merge_passthrough(job: TensorJob) -> torch.Tensor:
    scale = job.model_params[0]["scale"]
    x = job.convert(job.tensors[0])
    return x * scale if scale is not None else x
