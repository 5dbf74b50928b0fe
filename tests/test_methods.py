"""Each merge method against a direct computation of its formula on fresh random tensors."""
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch

from mergekit_ops import chunks, select
from mergekit_ops.chunks import CHUNK
from mergekit_ops.methods import METHODS
from mergekit_ops.methods.base import REQUIRED
from mergekit_ops.methods import job as job_module
from mergekit_ops.methods.job import TensorJob
from mergekit_ops.methods.task_arithmetic import ones_where_zero, unit_signs

SHAPE = (12, 10)


def _job(method, tensors, base=None, model_params=None, **params):
    m = METHODS[method]
    full = {p.name: p.default for p in m.params}
    full.update(params)
    mp = []
    for i in range(len(tensors)):
        d = {p.name: p.default for p in m.model_params}
        d.update((model_params or [{}] * len(tensors))[i])
        mp.append(d)
    assert all(v is not REQUIRED for v in full.values())
    return TensorJob("model.layers.0.mlp.up_proj.weight", tensors, base, mp, full, seed=1234)


def _run(method, *args, **kwargs):
    return METHODS[method].merge(_job(method, *args, **kwargs))


def _inputs(n, scale=0.1):
    base = torch.randn(SHAPE)
    return base, [base + scale * torch.randn(SHAPE) for _ in range(n)]


def _close(a, b, tol=1e-5):
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()


def _stable_topk_mask(x, k):
    order = torch.sort(-x.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


def test_linear_is_weighted_mean(seed):
    _, xs = _inputs(3)
    w = torch.rand(3).tolist()
    out = _run("linear", xs, model_params=[{"weight": v} for v in w])
    _close(out, sum(wi * x for wi, x in zip(w, xs)) / sum(w))
    raw = _run("linear", xs, model_params=[{"weight": v} for v in w], normalize=False)
    _close(raw, sum(wi * x for wi, x in zip(w, xs)))


def test_linear_with_weights_one_zero_returns_first_exactly(seed):
    _, xs = _inputs(2)
    out = _run("linear", xs, model_params=[{"weight": 1.0}, {"weight": 0.0}])
    assert torch.equal(out, xs[0])


def _slerp_ref(t, a, b):
    ua, ub = a.reshape(-1) / a.norm(), b.reshape(-1) / b.norm()
    theta = torch.acos((ua @ ub).clamp(-1, 1)).item()
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def test_slerp_formula_and_endpoints(seed):
    a, b = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.rand(()).item()
    _close(_run("slerp", [b], a, t=t), _slerp_ref(t, a, b))
    _close(_run("slerp", [b], a, t=0.0), a, 1e-6)
    _close(_run("slerp", [b], a, t=1.0), b, 1e-6)


def test_slerp_falls_back_to_lerp_when_colinear(seed):
    a = torch.randn(SHAPE)
    b = 2.5 * a
    t = torch.rand(()).item()
    _close(_run("slerp", [b], a, t=t), (1 - t) * a + t * b)


def test_task_arithmetic_is_base_plus_weighted_deltas(seed):
    base, xs = _inputs(3)
    w = (torch.rand(3) * 2 - 1).tolist()  # negative weights negate a task
    lam = torch.rand(()).item() + 0.5
    out = _run("task_arithmetic", xs, base, [{"weight": v} for v in w], **{"lambda": lam})
    _close(out, base + lam * sum(wi * (x - base) for wi, x in zip(w, xs)))


def test_task_arithmetic_lambda_zero_returns_base(seed):
    base, xs = _inputs(2)
    assert torch.equal(_run("task_arithmetic", xs, base, [{"weight": 1.0}] * 2, **{"lambda": 0.0}), base)


def _ties_ref(base, xs, w, density, normalize=True, lam=1.0):
    deltas = []
    for x in xs:
        d = x - base
        k = int(density * d.numel())
        deltas.append(d * _stable_topk_mask(d, k))
    D = torch.stack([wi * d for wi, d in zip(w, deltas)])
    sign = torch.where(D.sum(0) >= 0, 1.0, -1.0)
    agree = D.sign() == sign
    W = torch.tensor(w).view(-1, 1, 1) * agree
    div = W.sum(0)
    div[div == 0] = 1
    return base + lam * (D * agree).sum(0) / (div if normalize else 1)


def test_ties_trims_elects_and_takes_disjoint_mean(seed):
    base, xs = _inputs(3)
    w = (torch.rand(3) + 0.2).tolist()
    density = torch.rand(()).item() * 0.8 + 0.1
    out = _run("ties", xs, base, [{"weight": v, "density": density} for v in w])
    _close(out, _ties_ref(base, xs, w, density))


def test_sign_consensus_without_normalize_adds_the_agreeing_deltas(seed):
    base, xs = _inputs(3)
    a, b = (torch.rand(2) + 0.2).tolist()
    w, lam = [a, a, b], torch.rand(()).item() + 0.5
    base[0, :3] = 0.0
    xs[0][0, 0], xs[1][0, 0], xs[2][0, 0] = 0.75, -0.75, 0.0  # the deltas sum to exactly 0: + is elected
    for x in xs:
        x[0, 1] = 0.0  # every delta is zero
        x[0, 2] = -0.0
    density = torch.rand(()).item() * 0.8 + 0.1
    out = _run("ties", xs, base, [{"weight": v, "density": density} for v in w], normalize=False, **{"lambda": lam})
    _close(out, _ties_ref(base, xs, w, density, normalize=False, lam=lam))
    full = _run("ties", xs, base, [{"weight": v, "density": 1.0} for v in w], normalize=False, **{"lambda": lam})
    assert full[0, 0].item() == pytest.approx(lam * a * 0.75, rel=1e-6) and full[0, 1] == 0 and full[0, 2] == 0


def test_ties_of_one_model_at_density_one_is_task_arithmetic(seed):
    base, xs = _inputs(1)
    w = torch.rand(()).item() + 0.1
    ties = _run("ties", xs, base, [{"weight": w, "density": 1.0}], normalize=False)
    _close(ties, _run("task_arithmetic", xs, base, [{"weight": w}]))


def test_dare_keeps_about_density_and_preserves_l1(seed):
    base = torch.zeros(200, 200)
    x = torch.randn(200, 200)
    density = 0.3
    out = _run("dare_linear", [x], base, [{"weight": 1.0, "density": density}])
    kept = out != 0
    assert abs(kept.float().mean().item() - density) < 0.02
    assert torch.allclose(out[kept], x[kept] * (x.abs().sum() / x[kept].abs().sum()), rtol=1e-5)
    inv = _run("dare_linear", [x], base, [{"weight": 1.0, "density": density}], rescale="inverse_density")
    assert torch.equal(inv != 0, kept)  # same draw: the generator depends on tensor and input only
    _close(inv[kept], x[kept] / density)


def test_dare_draw_is_reproducible_and_differs_per_input(seed):
    base = torch.zeros(50, 50)
    x = torch.randn(50, 50)
    a = _run("dare_linear", [x, x], base, [{"weight": 1.0, "density": 0.5}] * 2, normalize=False)
    b = _run("dare_linear", [x, x], base, [{"weight": 1.0, "density": 0.5}] * 2, normalize=False)
    assert torch.equal(a, b)
    single = _run("dare_linear", [x], base, [{"weight": 1.0, "density": 0.5}])
    assert not torch.equal(a, 2 * single)  # the two inputs got different masks


def test_dare_draws_come_from_the_stable_sfc64_stream(seed):
    """Masks are a function of numpy's raw SFC64 stream (which numpy keeps stable across
    versions and platforms): an entry is kept when its 15-bit lane of the chunk's stream is
    below density * 2**15."""
    n = CHUNK + int(torch.randint(1, 5000, ()))  # two chunks, the second partial
    x = torch.empty(n).uniform_(0.5, 1.5)  # no zeros: a kept entry is a nonzero one (randn gave 0.0 once)
    density = float(torch.empty(()).uniform_(0.1, 0.9))
    job = _job("dare_linear", [x], torch.zeros(n), [{"weight": 1.0, "density": density}], rescale="none")
    kept = METHODS["dare_linear"].merge(job) != 0
    for c, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        words = np.random.SFC64(job.stream_seed(0, c)).random_raw(-(-m // 4)).view(np.int16)[:m]
        expected = torch.from_numpy((words & 0x7FFF) < round(density * 2**15))
        assert torch.equal(kept[start:start + m], expected)


def test_breadcrumbs_drops_outliers_and_small_values(seed):
    base = torch.zeros(20, 30)
    x = torch.randn(20, 30)
    density, gamma = 0.4, 0.05
    out = _run("breadcrumbs", [x], base, [{"weight": 1.0, "density": density, "gamma": gamma}])
    n = x.numel()
    order = torch.sort(-x.abs().reshape(-1), stable=True).indices
    expected = torch.zeros(n)
    keep = order[int(gamma * n):int(gamma * n) + int(density * n)]
    expected[keep] = x.reshape(-1)[keep]
    _close(out.reshape(-1), expected)


def test_della_keep_probability_rises_with_rank(seed):
    base = torch.zeros(400, 200)
    x = torch.randn(400, 200)
    out = _run("della_linear", [x], base, [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}], rescale="none")
    kept = (out != 0).float()
    ranks = x.abs().argsort(dim=1).argsort(dim=1)
    for group in (ranks < 20, ranks >= 180):  # 8000 draws each
        p = 0.1 + 0.8 * ranks[group].float() / 199  # density - epsilon + 2 epsilon * rank / (n - 1)
        sigma = (p * (1 - p)).mean().sqrt().item() / group.sum().sqrt().item()
        assert abs(kept[group].mean().item() - p.mean().item()) < 5 * sigma
    torch.testing.assert_close(out[out != 0], x[out != 0])


def test_model_stock_formula(seed):
    base, xs = _inputs(3)
    offs = [(x - base).reshape(-1) for x in xs]
    cos = sum(torch.dot(a, b) / (a.norm() * b.norm()) for a, b in itertools.combinations(offs, 2)) / 3
    t = 3 * cos / (1 + 2 * cos)
    _close(_run("model_stock", xs, base), t * sum(xs) / 3 + (1 - t) * base)


def test_nearswap_formula(seed):
    base, xs = _inputs(1)
    t = torch.rand(()).item() * 0.1
    w = (t / (base - xs[0]).abs().clamp_min(1e-6)).clamp(0, 1)
    _close(_run("nearswap", xs, base, t=t), w * xs[0] + (1 - w) * base)


def test_nuslerp_with_base_slerps_task_vectors(seed):
    base, xs = _inputs(2)
    w0, w1 = (torch.rand(2) + 0.1).tolist()
    out = _run("nuslerp", xs, base, [{"weight": w0}, {"weight": w1}])
    _close(out, base + _slerp_ref(w1 / (w0 + w1), xs[0] - base, xs[1] - base))


def test_nuslerp_row_wise_slerps_each_row(seed):
    _, xs = _inputs(2, scale=1.0)
    out = _run("nuslerp", xs, None, [{"weight": 1.0}, {"weight": 3.0}], nuslerp_flatten=False)
    for r in range(SHAPE[0]):
        _close(out[r], _slerp_ref(0.75, xs[0][r], xs[1][r]))


def test_multislerp_of_two_equal_weights_is_the_midpoint_slerp(seed):
    a, b = torch.randn(SHAPE), torch.randn(SHAPE)
    b = b * (a.norm() / b.norm())  # equal norms: multislerp reduces to slerp at t = 0.5
    out = _run("multislerp", [a, b], None, [{"weight": 1.0}, {"weight": 1.0}])
    _close(out, _slerp_ref(0.5, a, b), 1e-4)


def test_karcher_of_two_equal_norm_vectors_is_the_midpoint_slerp(seed):
    a, b = torch.randn(SHAPE), torch.randn(SHAPE)
    b = b * (a.norm() / b.norm())
    _close(_run("karcher", [a, b], None), _slerp_ref(0.5, a, b), 1e-4)


def test_sce_formula(seed):
    base, xs = _inputs(3)
    topk = 0.5
    T = torch.stack([x - base for x in xs])
    var = T.var(0, unbiased=False)
    k = int(int((var != 0).sum()) * topk)
    T = T * _stable_topk_mask(var, k)
    energy = (T ** 2).mean((1, 2))
    lam = energy / energy.sum()
    sign = torch.where(T.sum(0) >= 0, 1.0, -1.0)
    m = (T.sign() == sign).float()
    W = lam.view(-1, 1, 1) * m
    _close(_run("sce", xs, base, select_topk=topk), base + (W * T).sum(0) / W.sum(0).clamp_min(1e-6))


def test_passthrough_scales(seed):
    x = torch.randn(SHAPE)
    assert torch.equal(_run("passthrough", [x]), x)
    _close(_run("passthrough", [x], model_params=[{"scale": 0.5}]), 0.5 * x)


@pytest.mark.parametrize("method", ["dare_ties", "breadcrumbs_ties", "della"])
def test_ties_variants_at_density_one_equal_ties(method, seed):
    base, xs = _inputs(3)
    mp = [{"weight": w, "density": 1.0} for w in (torch.rand(3) + 0.1).tolist()]
    out = _run(method, xs, base, mp, normalize=True)
    _close(out, _ties_ref(base, xs, [p["weight"] for p in mp], 1.0))


@pytest.mark.parametrize("method,params,model_params", [
    ("linear", {}, {"weight": 0.7}),
    ("task_arithmetic", {}, {"weight": 0.7}),
    ("ties", {}, {"weight": 0.7, "density": 0.4}),
    ("breadcrumbs_ties", {}, {"weight": 0.7, "density": 0.4, "gamma": 0.05}),
    ("slerp", {"t": 0.3}, {}),
    ("model_stock", {}, {}),
    ("nearswap", {"t": 0.05}, {}),
])
def test_streamed_methods_do_not_depend_on_chunk_boundaries(method, params, model_params, seed, monkeypatch):
    n = 1 if method in ("slerp", "nearswap") else 3
    base = torch.randn(SHAPE).bfloat16()
    xs = [(base.float() + 0.1 * torch.randn(SHAPE)).bfloat16() for _ in range(n)]  # bf16: many magnitude ties
    uses_base = method != "linear"
    args = (xs, base if uses_base else None, [dict(model_params) for _ in xs])
    whole = _run(method, *args, **params)
    monkeypatch.setattr("mergekit_ops.methods.job.span", lambda device: 7)
    torch.testing.assert_close(_run(method, *args, **params), whole, atol=1e-6, rtol=1e-5)


SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_unit_signs_is_copysign_of_one_bit_for_bit(dtype, seed):
    x = torch.randn(300).to(dtype)
    x[torch.randperm(300)[:5]] = torch.tensor(SPECIALS, dtype=dtype)
    expected = torch.copysign(torch.ones((), dtype=dtype), x)
    assert torch.equal(unit_signs(x.clone()).view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ones_where_zero_replaces_both_zeros_and_nothing_else(dtype, seed):
    x = torch.randn(300).to(dtype)
    spots = torch.randperm(300)[:5]
    x[spots] = torch.tensor(SPECIALS, dtype=dtype)
    expected = torch.where(x == 0, torch.ones((), dtype=dtype), x)
    out = ones_where_zero(x, spare=torch.randn(300).to(dtype))
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)  # (a NaN's payload may change)


def test_sum_deltas_totals_each_listed_input_in_order_whatever_the_schedule(seed, monkeypatch):
    base = torch.randn(50).bfloat16()
    xs = [(base.float() + torch.randn(50) * (i + 1)).bfloat16() for i in range(3)]
    job = TensorJob("t", xs, base, [{}] * 3, {})

    def moments(sl, i, delta):
        return [float(delta.sum()), float(delta.square().sum())]
    monkeypatch.setattr("mergekit_ops.methods.job.span", lambda device: 7)  # 8 slices, the last partial
    totals = job.sum_deltas([2, 0], moments, 2)
    deltas = [xs[i].double() - base.double() for i in (2, 0)]
    expected = [v for d in deltas for v in (float(d.sum()), float(d.square().sum()))]
    assert totals == pytest.approx(expected, rel=1e-5, abs=1e-5)
    with ThreadPoolExecutor(2) as pool:
        assert replace(job, pool=pool).sum_deltas([2, 0], moments, 2) == totals  # the same bits


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "ties", "breadcrumbs", "model_stock"])
def test_slices_of_several_chunks_draw_and_select_as_one_chunk_slices_do(method, seed, monkeypatch):
    """A GPU streams slices of several chunks (chunks.span): each chunk's random draws and each
    top-k tie share stay the same. Without an L1 rescale nothing is summed over a slice, so the
    bytes are the same; model_stock's cosines are, so only their rounding may differ."""
    n = 2 * CHUNK + int(torch.randint(1, 5000, ()))  # the last chunk partial
    base = torch.randn(n)
    xs = [(base + torch.randn(n)).bfloat16().float() for _ in range(3)]  # bf16 values: magnitude ties
    stock = method == "model_stock"
    args = (xs, base, [{} if stock else {"weight": 0.5, "density": 0.4, "gamma": 0.05} for _ in xs])
    params = {} if stock else {"rescale": "none"}
    one = _run(method, *args, **params)
    monkeypatch.setattr(chunks._SCRATCH, "buffers", {})  # slice-sized buffers for the patched span
    for module in (chunks, job_module, select):
        monkeypatch.setattr(module, "span", lambda device: 2 * CHUNK)
    several = _run(method, *args, **params)
    if method.startswith("dare"):  # as a GPU draws them: a slice's chunks side by side
        with ThreadPoolExecutor(2) as draws:
            assert torch.equal(METHODS[method].merge(replace(_job(method, *args, **params), draws=draws)), several)
    if stock:
        torch.testing.assert_close(several, one, atol=1e-6, rtol=1e-5)
    else:
        assert torch.equal(several, one)


def test_seeded_marks_exactly_the_methods_whose_output_depends_on_the_seed(seed):
    """compose keeps a recipe's seed in params.yaml only for seeded methods: a method that draws
    and is not marked would be cached across seed changes."""
    for name, m in sorted(METHODS.items()):
        count = min(2, m.max_models or 2)
        tensors = [torch.randn(SHAPE) for _ in range(count)]
        params = {p.name: 0.5 for p in m.params if p.default is REQUIRED}
        model_params = [{p.name: 0.5 for p in m.model_params if p.default is REQUIRED or p.name == "density"}
                        for _ in tensors]
        job = _job(name, tensors, None if m.base == "input" else torch.randn(SHAPE), model_params, **params)
        one, two = (m.merge(replace(job, seed=s)) for s in (seed, seed + 1))
        assert (not torch.equal(one, two)) == m.seeded, name
