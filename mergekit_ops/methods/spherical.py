"""Spherical means beyond two-model slerp: nuslerp, multislerp and karcher."""
from __future__ import annotations

import torch

from ..errors import MergeError
from .job import TensorJob


def _pairwise_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of each vector along the last dim; colinear vectors (1 - cos^2 <= 1e-16) are lerped."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    theta = cos.acos()
    sin = theta.sin()
    colinear = (1 - cos * cos) <= 1e-16
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    slerped = ((theta * (1 - t)).sin() * v0 + (theta * t).sin() * v1) / safe
    return torch.where(colinear, (1 - t) * v0 + t * v1, slerped)


def merge_nuslerp(job: TensorJob) -> torch.Tensor:
    """Two models, t = w1 / (w0 + w1); with a base, slerp the task vectors and add the base back."""
    w0, w1 = (p["weight"] for p in job.model_params)
    t = w1 / (w0 + w1) if abs(w0 + w1) >= 1e-6 else 0.5
    (v0, v1), base = job.full()
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    shape = v0.shape
    if job.params["nuslerp_flatten"]:
        out = _pairwise_slerp(t, v0.reshape(-1), v1.reshape(-1))
    elif job.params["nuslerp_row_wise"] and v0.dim() > 1:
        out = _pairwise_slerp(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = _pairwise_slerp(t, v0, v1)
    out = out.reshape(shape)
    return out + base if base is not None else out


def merge_multislerp(job: TensorJob) -> torch.Tensor:
    """Weighted mean direction on the sphere (one tangent-space step), scaled by the mean norm."""
    xs, base = job.full()
    if len(xs) == 1:
        return xs[0]
    eps = job.params["eps"]
    vecs = [(x - base if base is not None else x).reshape(-1) for x in xs]
    weights = [p["weight"] for p in job.model_params]
    if job.params["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    norms = [v.norm() for v in vecs]
    units = [v / (n + eps) for v, n in zip(vecs, norms)]
    mean = sum(w * u for w, u in zip(weights, units))
    if mean.norm() < eps:
        if len(vecs) != 2:
            raise MergeError(f"tensor '{job.name}': the weighted sum of directions is zero; multislerp is undefined")
        out = weights[0] * vecs[0] + weights[1] * vecs[1]
    else:
        mean = mean / mean.norm()
        tangent = sum(w * (u - (u * mean).sum() * mean) for w, u in zip(weights, units))
        step = tangent.norm() + eps
        out = (mean * step.cos() + tangent * (step.sin() / step)) * sum(w * n for w, n in zip(weights, norms))
    out = out.reshape(job.shape)
    return out + base if base is not None else out


def merge_karcher(job: TensorJob) -> torch.Tensor:
    """Riemannian (Karcher) mean of the unit vectors, equal weights, rescaled by the mean norm.

    Every step stays a tensor op in the compute dtype, in mergekit's order: near the fixed point an
    angle rounds to 0 or to acos' float32 floor (~3e-4), and the `theta < tol` skip then decides
    which inputs pull, so a step taken in double (or a dot summed in another order) can land on a
    different fixed point than mergekit's, ~1e-4 away.
    """
    max_iter, tol = job.params["max_iter"], job.params["tol"]
    vecs = [x.reshape(-1) for x in job.full()[0]]
    if len(vecs) == 1:
        return vecs[0].reshape(job.shape)
    norms = [torch.linalg.vector_norm(v) for v in vecs]
    valid = [v / n for v, n in zip(vecs, norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(vecs[0]).reshape(job.shape)
    share = 1.0 / len(vecs)
    alpha = share / sum(share for _ in valid)
    mean = torch.zeros_like(valid[0])
    for u in valid:
        mean += alpha * u
    m_norm = torch.linalg.vector_norm(mean)
    mean = valid[0].clone() if m_norm.item() < tol else mean / m_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in valid:
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        t_norm = torch.linalg.vector_norm(tangent)
        if t_norm.item() < tol:
            break
        mean = torch.cos(t_norm) * mean + torch.sin(t_norm) * (tangent / t_norm)
        m_norm = torch.linalg.vector_norm(mean)
        if m_norm.item() > tol:
            mean = mean / m_norm
    scale = sum(share * n for n in norms)
    return (scale * mean).reshape(job.shape)
