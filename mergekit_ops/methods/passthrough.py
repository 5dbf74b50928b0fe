"""passthrough: copy one model's tensors (frankenmerges stack layer ranges with `slices`)."""
from __future__ import annotations

import torch

from .base import Method, Param, TensorJob


def merge_passthrough(job: TensorJob) -> torch.Tensor:
    scale = job.model_params[0]["scale"]
    x = job.convert(job.tensors[0])
    return x * scale if scale is not None else x


METHOD = Method(
    "passthrough", merge_passthrough,
    model_params=(Param("scale", None, float),),
    base="input", min_models=1, max_models=1,
    doc="Copy the single source's tensors, optionally scaled; with slices, stacks layer ranges.",
)
