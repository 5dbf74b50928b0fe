"""The generalized task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

One routine: d_i = x_i - base; sparsify d_i; D_i = w_i * d_i; optional sign consensus keeps only
entries agreeing with sign(sum_i D_i) (a zero sum counts as +); mix = sum of kept D_i, divided by
the kept weights when `normalize`; result base + lambda * mix. The methods differ only in the
sparsifier, the consensus and the defaults of normalize/rescale (mergekit 0.1.5's).

Options mergekit lacks: `trim_scope: model` ranks magnitudes over the whole model (the TIES
paper) instead of per tensor; `rescale: inverse_density` divides survivors by density (the DARE
paper) instead of matching the L1 norm (mergekit; `true` means l1, `false` none).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..chunks import scratch
from ..select import below
from .job import TensorJob
from .sparsify import Bernoulli, Della, Magnitude, Sparsifier, Window, set_l1_scales

@dataclass(frozen=True)
class Sparsify:
    """How a method sparsifies: build(job, input index, model params, rescale mode) gives one
    input's Sparsifier. Chunked builds use the pool chunk by chunk, one input after another; a
    whole-tensor build (DELLA's ranking) cannot, so inputs are built side by side instead."""

    build: Callable[[TensorJob, int, dict, str], Sparsifier]
    whole_tensor: bool = False


def generalized_merge(job: TensorJob, sparsify: Sparsify | None, consensus: bool) -> torch.Tensor:
    """Streams the tensor in chunks: sparsifiers make their passes first, then one pass merges,
    chunks side by side."""
    if not job.tensors:
        return job.convert(job.base)
    mode = job.params["rescale"]
    weights = [p["weight"] for p in job.model_params]
    build = lambda ip: sparsify.build(job, *ip, mode) if sparsify else Sparsifier()  # noqa: E731
    inputs = list(enumerate(job.model_params))
    sparse = job.map(build, inputs) if sparsify and sparsify.whole_tensor else [build(ip) for ip in inputs]
    normalize, lam = job.params["normalize"], job.params["lambda"]
    total_weight = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if not consensus and not any(s.sparsifies for s in sparse):
        # linear in the inputs: base + c * sum(w_i * (x_i - base)) in the fewest passes
        c = lam / total_weight if normalize else lam
        return job.weighted_sum([c * w for w in weights], 1 - c * sum(weights))
    set_l1_scales(job, sparse)
    out = job.empty_output()

    def merge_chunk(sl, xs, base):
        deltas = [s.apply(sl, x.sub_(base), w) for s, x, w in zip(sparse, xs, weights)]
        scale = lam
        if consensus and normalize:
            sign, divisor = (b[:base.numel()] for b in scratch(2, base.dtype, base.device, "election"))
            sign.copy_(deltas[0])
            for d in deltas[1:]:
                sign += d
            # the elected sign; a zero sum counts as + (a -0.0 sum means every delta is zero, so none agrees)
            unit_signs(sign)
            # the agreeing parts (|d| where d has the elected sign, else 0) are summed into the first
            # delta's buffer, and the zero test reuses the sign's: three slice buffers fewer to keep
            # in cache (on a GPU, 64 MB each). add_(0.0): a sum from +0.0 turns a -0.0 into +0.0
            mix = deltas[0].mul_(sign).clamp_(min=0).add_(0.0)
            torch.sign(mix, out=divisor).mul_(weights[0])
            for d, w in zip(deltas[1:], weights[1:]):
                agreeing = d.mul_(sign).clamp_(min=0)
                mix += agreeing
                divisor.add_(agreeing.sign_(), alpha=w)
            mix *= sign
            mix /= ones_where_zero(divisor, spare=sign)
        elif consensus:
            mix, scale = agreeing_sum(deltas), lam / 2
        else:
            mix = deltas[0]
            for d in deltas[1:]:
                mix += d
            if normalize:
                mix /= total_weight
        job.store(out, sl, base.add_(mix, alpha=scale))

    job.map_chunks(merge_chunk)
    return out.view(job.shape)


INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
ONE_BITS = {dtype: int(torch.tensor(1.0, dtype=dtype).view(INT_VIEWS[dtype.itemsize]))
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def unit_signs(x: torch.Tensor) -> torch.Tensor:
    """copysign(1, x) in place, by bits: x's sign bit over the bits of 1.0 (copysign with a
    tensor of ones was slower, measured in docs/benchmarks.md, and copied the ones to the device per
    slice)."""
    ints = x.view(INT_VIEWS[x.element_size()])
    ints.bitwise_and_(-1 << (8 * x.element_size() - 1)).bitwise_or_(ONE_BITS[x.dtype])
    return x


def ones_where_zero(x: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """x (a chunk) with its zeros, of either sign, replaced by 1, in place: its bits without the
    sign bit are below 1 exactly at +-0 (a float comparison and masked_fill cost more, measured in
    docs/benchmarks.md).
    spare: a buffer like x whose contents may be overwritten."""
    ints = x.view(INT_VIEWS[x.element_size()])
    magnitude = torch.bitwise_and(ints, (1 << (8 * x.element_size() - 1)) - 1, out=spare.view(ints.dtype))
    return x.add_(spare.copy_(below(magnitude, 1)))


def agreeing_sum(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Twice the sum of the entries whose sign agrees with the total's (a zero total counts as +;
    -0.0 only when every delta is zero): T + copysign(A, T) with T = sum d_i and A = sum |d_i|,
    since an agreeing entry adds |d| to both and a disagreeing one cancels. Half the passes of
    masking each delta; the deltas are overwritten."""
    total = scratch(1, deltas[0].dtype, deltas[0].device, "agreeing")[0][:deltas[0].numel()].copy_(deltas[0])
    for d in deltas[1:]:
        total += d
    magnitude = deltas[0].abs_()
    for d in deltas[1:]:
        magnitude += d.abs_()
    return total.add_(torch.copysign(magnitude, total, out=magnitude))


def _magnitude(job, i, p, mode):
    if p["density"] >= 1 and "trim_k" not in job.extra:
        return Sparsifier()
    k = job.extra.get("trim_k", {}).get(i)  # trim_scope: model gives this tensor's share of the global k
    return Magnitude(job, i, p["density"], mode, k) if p["density"] < 1 or k is not None else Sparsifier()


def _bernoulli(job, i, p, mode):
    return Bernoulli(job, i, p["density"], mode) if p["density"] < 1 else Sparsifier()


def _breadcrumbs(job, i, p, mode):
    return Window(job, i, p["density"], p["gamma"], mode) if p["density"] < 1 else Sparsifier()


def _della(job, i, p, mode):
    return Della(job, i, p["density"], p["epsilon"], mode) if p["density"] < 1 else Sparsifier()


MAGNITUDE, BERNOULLI, BREADCRUMBS = Sparsify(_magnitude), Sparsify(_bernoulli), Sparsify(_breadcrumbs)
DELLA = Sparsify(_della, whole_tensor=True)


# the family's members: a sparsifier, and whether signs are elected (parameters and defaults:
# methods/__init__.py)
merge_task_arithmetic = partial(generalized_merge, sparsify=None, consensus=False)
merge_ties = partial(generalized_merge, sparsify=MAGNITUDE, consensus=True)
merge_dare_linear = partial(generalized_merge, sparsify=BERNOULLI, consensus=False)
merge_dare_ties = partial(generalized_merge, sparsify=BERNOULLI, consensus=True)
merge_breadcrumbs = partial(generalized_merge, sparsify=BREADCRUMBS, consensus=False)
merge_breadcrumbs_ties = partial(generalized_merge, sparsify=BREADCRUMBS, consensus=True)
merge_della = partial(generalized_merge, sparsify=DELLA, consensus=True)
merge_della_linear = partial(generalized_merge, sparsify=DELLA, consensus=False)
