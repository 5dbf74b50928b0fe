"""arcee_fusion: keep the other model's changes where they matter most, the base elsewhere.

importance = |x - base| * KL(softmax(x) || softmax(base)) of the row (last dim, with mergekit's
1e-8 added to both distributions); a change is kept where its importance >= median + 1.5 IQR of
the tensor's importances; result base + delta * mask. Whole-tensor (row softmax, quantiles).
"""
from __future__ import annotations

import torch

from ..chunks import CHUNK
from .job import TensorJob

SMOOTHING = 1e-8  # mergekit's, added to both distributions before the log


def merge_arcee_fusion(job: TensorJob) -> torch.Tensor:
    (x,), base = job.full()
    if not x.numel():  # no quantiles to take (mergekit fails on an empty tensor)
        return base
    delta = x - base
    importance = delta.abs().mul_(row_kl(job, x, base))
    q1, median, q3 = quartiles(importance)
    return base + delta * (importance >= median + 1.5 * (q3 - q1))


def row_kl(job: TensorJob, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) || softmax(base)) per row, shaped to broadcast over the rows, in the compute
    dtype as mergekit computes it. A fine-tune's KL is tiny, a sum of nearly cancelling terms, so
    float32 rounding makes ~10% of it and decides entries at the threshold: it is computed on the
    CPU on every device (as DARE's draws are), in blocks of rows to keep the copies small."""
    width = x.shape[-1] if x.dim() else 1
    rows_x, rows_base = x.reshape(-1, width), base.reshape(-1, width)
    step = max(1, CHUNK // width)

    def block(start: int) -> torch.Tensor:
        p = torch.softmax(rows_x[start:start + step].cpu(), dim=-1).add_(SMOOTHING)
        q = torch.softmax(rows_base[start:start + step].cpu(), dim=-1).add_(SMOOTHING)
        return (p * (p / q).log_()).sum(-1)
    kl = torch.cat(job.map(block, range(0, rows_x.shape[0], step))).to(x.device)
    return kl.reshape(x.shape[:-1] + (1,)) if x.dim() else kl.reshape(())


def quartiles(values: torch.Tensor) -> list[torch.Tensor]:
    """The order statistics at floor(q * (n - 1)) for q = 1/4, 1/2, 3/4, as mergekit picks them,
    of every entry: mergekit takes them from a random sample of 1M entries for larger tensors."""
    flat = values.reshape(-1)
    last = flat.numel() - 1
    return [flat.kthvalue(k + 1).values for k in (last // 4, last // 2, 3 * last // 4)]
