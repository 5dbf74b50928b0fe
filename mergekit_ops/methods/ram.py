"""ram and ramplus_tl (Reinforced Agent Merging): per entry, the models whose task vector moved it by
more than `epsilon` contribute; an entry moved by one model takes that delta, one moved by several
the mean of theirs; base + the sum. ramplus_tl scales each model's unique contributions by
1 + r * clip(rho, 0, alpha), rho = its shared count / its unique count over the tensor.
Element-wise, so streamed in chunks (ramplus_tl counts in a first pass)."""
from __future__ import annotations

import torch

from .job import TensorJob


def _moves(xs: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[list, list, torch.Tensor]:
    """A chunk's deltas (in the inputs' buffers), where each counts (|delta| > epsilon), and per
    entry how many models count."""
    deltas = [x.sub_(base) for x in xs]
    counted = [d.abs() > epsilon for d in deltas]
    return deltas, counted, torch.stack(counted).sum(0)


def _merge(job: TensorJob, unique_scales: list[float]) -> torch.Tensor:
    """base + sum_i d_i * [|d_i| > epsilon] * (unique_scales[i] where only model i moved the
    entry, else 1 / the number of models that did)."""
    epsilon = job.params["epsilon"]
    out = job.empty_output()

    def merge_chunk(sl, xs, base):
        deltas, counted, movers = _moves(xs, base, epsilon)
        unique, divisor = movers == 1, movers.clamp(min=1)
        for d, mask, scale in zip(deltas, counted, unique_scales):
            d.mul_(mask)
            if scale != 1:
                d.mul_(torch.where(unique, scale, 1.0))
            d.div_(divisor)
        mix = deltas[0]
        for d in deltas[1:]:
            mix += d
        job.store(out, sl, base.add_(mix))
    job.map_chunks(merge_chunk)
    return out.view(job.shape)


def merge_ram(job: TensorJob) -> torch.Tensor:
    return _merge(job, [1.0] * len(job.tensors))


def merge_ramplus_tl(job: TensorJob) -> torch.Tensor:
    epsilon, r, alpha = job.params["epsilon"], job.params["r"], job.params["alpha"]

    def chunk_counts(sl, xs, base):
        _, counted, movers = _moves(xs, base, epsilon)
        shared = movers > 1
        return [float(v) for c in counted for v in ((c & shared).sum(), (c & ~shared).sum())]
    totals = job.sum_chunks(chunk_counts, 2 * len(job.tensors))
    scales = []
    for shared, unique in zip(totals[0::2], totals[1::2]):
        # mergekit divides by max(unique, epsilon); a model with no unique entries has nothing to scale
        rho = shared / max(unique, epsilon) if unique else 0.0
        scales.append(1 + r * min(rho, alpha))  # clip(rho, 0, alpha), as rho >= 0
    return _merge(job, scales)
