"""ram, ramplus_tl and arcee_fusion against direct computations of their formulas (mergekit 0.1.5's
definitions) on fresh random tensors, crafted edge cases, and their recipe contracts."""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from mergekit_ops import MergeOptions, merge
from mergekit_ops.errors import RecipeError
from mergekit_ops.methods import METHODS
from mergekit_ops.methods.arcee_fusion import quartiles, row_kl
from mergekit_ops.methods.job import TensorJob
from mergekit_ops.recipe import load_recipes
from tiny import load_dir, write_recipe

SHAPE = (12, 10)
NAME = "model.layers.0.mlp.up_proj.weight"


def _job(method, tensors, base, **params):
    full = {p.name: p.default for p in METHODS[method].params}
    full.update(params)
    return TensorJob(NAME, tensors, base, [{} for _ in tensors], full)


def _run(method, tensors, base, **params):
    return METHODS[method].merge(_job(method, tensors, base, **params))


def _sparse_inputs(n, epsilon, shape=SHAPE):
    """A base and n models, each changing a random half of the entries by 0.05 to ~0.4 and the
    rest by nothing or by less than epsilon (so a change never sits near epsilon)."""
    base = torch.randn(shape)
    xs = []
    for _ in range(n):
        big = torch.randn(shape).sign() * (0.05 + 0.1 * torch.randn(shape).abs())
        small = torch.empty(shape).uniform_(-0.3, 0.3) * epsilon * (torch.rand(shape) < 0.5)
        xs.append(base + torch.where(torch.rand(shape) < 0.5, big, small))
    return base, xs


def _movers(base, xs, epsilon):
    """Per entry (flat index), the indices of the models whose delta exceeds epsilon, and the deltas."""
    deltas = [(x - base).reshape(-1) for x in xs]
    return [[i for i, d in enumerate(deltas) if abs(d[e].item()) > epsilon] for e in range(base.numel())], deltas


def _ram_ref(base, xs, epsilon, scales=None):
    """Entry by entry: the one mover's delta (times its scale), or the mean of several movers' deltas."""
    movers, deltas = _movers(base, xs, epsilon)
    out = base.double().reshape(-1).clone()
    for e, who in enumerate(movers):
        if len(who) == 1:
            out[e] += deltas[who[0]][e].item() * (scales[who[0]] if scales else 1.0)
        elif who:
            out[e] += sum(deltas[i][e].item() for i in who) / len(who)
    return out.view(base.shape)


def _ramplus_scales(base, xs, epsilon, r, alpha):
    """Per model: 1 + r * clip(shared / unique, 0, alpha), its shared and unique entry counts."""
    movers, _ = _movers(base, xs, epsilon)
    scales = []
    for i in range(len(xs)):
        shared = sum(1 for who in movers if i in who and len(who) > 1)
        unique = sum(1 for who in movers if who == [i])
        scales.append(1 + r * min(max(shared / unique, 0.0), alpha))
    return scales


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def test_ram_keeps_a_lone_change_and_averages_shared_ones(seed):
    epsilon = float(torch.empty(()).uniform_(1e-3, 1e-2))
    base, xs = _sparse_inputs(3, epsilon)
    movers, _ = _movers(base, xs, epsilon)
    assert {min(len(who), 2) for who in movers} == {0, 1, 2}  # entries changed by none, one and several
    out = _run("ram", xs, base, epsilon=epsilon)
    _close(out, _ram_ref(base, xs, epsilon))
    flat, b = out.reshape(-1), base.reshape(-1)
    for e, who in enumerate(movers):
        if not who:  # changes below epsilon are dropped: the base, exactly
            assert flat[e] == b[e]
        elif len(who) == 1:  # one mover: its change, undiluted by the models that did not move
            assert flat[e] == b[e] + (xs[who[0]].reshape(-1)[e] - b[e])


def test_ram_epsilon_decides_who_counts(seed):
    """An entry moved by 2*eps by one model and by eps/2 by another takes the first move whole; at
    a tenth of epsilon, both count and it takes their mean."""
    epsilon = float(torch.empty(()).uniform_(1e-4, 1e-2))
    base = torch.zeros(4, 4, dtype=torch.float64)
    a, b = base.clone(), base.clone()
    a[1, 2], b[1, 2] = 2 * epsilon, -0.5 * epsilon
    f64 = {"compute_dtype": torch.float64, "out_dtype": torch.float64}
    out = METHODS["ram"].merge(replace(_job("ram", [a, b], base, epsilon=epsilon), **f64))
    assert out[1, 2].item() == 2 * epsilon and out.count_nonzero() == 1
    out = METHODS["ram"].merge(replace(_job("ram", [a, b], base, epsilon=epsilon / 10), **f64))
    assert out[1, 2].item() == pytest.approx(0.75 * epsilon, rel=1e-12)


def test_ram_default_epsilon_ignores_float_noise(seed):
    base, xs = _sparse_inputs(2, 1e-5)
    _close(_run("ram", xs, base), _ram_ref(base, xs, 1e-5))


@pytest.mark.parametrize("clipped", [False, True])
def test_ramplus_tl_scales_each_models_unique_changes(clipped, seed):
    epsilon = float(torch.empty(()).uniform_(1e-3, 1e-2))
    base, xs = _sparse_inputs(3, epsilon)
    movers, _ = _movers(base, xs, epsilon)
    rho = [sum(1 for who in movers if i in who and len(who) > 1) / sum(1 for who in movers if who == [i])
           for i in range(3)]
    # alpha below every rho: each model gets 1 + r * alpha; above every rho: 1 + r * rho
    alpha = 0.5 * min(rho) if clipped else 2 * max(rho)
    r = float(torch.empty(()).uniform_(0.1, 1.0))
    scales = _ramplus_scales(base, xs, epsilon, r, alpha)
    out = _run("ramplus_tl", xs, base, epsilon=epsilon, r=r, alpha=alpha)
    _close(out, _ram_ref(base, xs, epsilon, scales))
    assert not torch.equal(out, _run("ram", xs, base, epsilon=epsilon))


def test_ramplus_tl_with_r_zero_is_ram(seed):
    epsilon = float(torch.empty(()).uniform_(1e-3, 1e-2))
    base, xs = _sparse_inputs(3, epsilon)
    assert torch.equal(_run("ramplus_tl", xs, base, epsilon=epsilon, r=0.0), _run("ram", xs, base, epsilon=epsilon))


def test_ramplus_tl_models_without_unique_changes(seed):
    """b changes only what a changes too, c nothing: neither has a unique entry to scale. mergekit
    divides their shared counts by max(unique, epsilon): at epsilon 0, c's 0/0 makes its whole
    output NaN. Ours stays the formula, and finite."""
    base, (a, b) = _sparse_inputs(2, 0.0)
    b = torch.where((a - base).abs() > 0, b, base)
    assert (b != base).any() and ((a != base) & (b == base)).any()
    r, alpha = float(torch.empty(()).uniform_(0.1, 1.0)), float(torch.empty(()).uniform_(0.1, 1.0))
    out = _run("ramplus_tl", [a, b, base.clone()], base, epsilon=0.0, r=r, alpha=alpha)
    assert out.isfinite().all()
    movers, _ = _movers(base, [a, b], 0.0)
    shared, unique = sum(len(w) == 2 for w in movers), sum(w == [0] for w in movers)
    _close(out, _ram_ref(base, [a, b], 0.0, [1 + r * min(shared / unique, alpha), 1.0]))


@pytest.mark.parametrize("method,params", [("ram", {"epsilon": 0.002}),
                                           ("ramplus_tl", {"epsilon": 0.002, "r": 0.5, "alpha": 0.3})])
def test_ram_methods_do_not_depend_on_chunks_or_the_pool(method, params, seed, monkeypatch):
    base, xs = _sparse_inputs(3, 0.002)
    whole = _run(method, xs, base, **params)
    assert torch.equal(_run(method, xs, base, **params), whole)
    monkeypatch.setattr("mergekit_ops.methods.job.span", lambda device: 7)  # 18 slices, the last partial
    with ThreadPoolExecutor(2) as pool:
        assert torch.equal(METHODS[method].merge(replace(_job(method, xs, base, **params), pool=pool)), whole)


def _arcee_ref(x, base):
    """mergekit's definition: importance = |d| * KL(softmax(x)+1e-8 || softmax(base)+1e-8) of the
    row; keep d where importance >= median + 1.5 IQR (sorted values at floor(q * (n - 1)))."""
    d = x - base
    p, q = torch.softmax(x, dim=-1) + 1e-8, torch.softmax(base, dim=-1) + 1e-8
    importance = d.abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = importance.reshape(-1).sort().values
    q1, median, q3 = (s[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    mask = importance >= median + 1.5 * (q3 - q1)
    return base + d * mask, mask


def test_arcee_fusion_formula(seed):
    base = 0.5 * torch.randn(40, 16)
    x = base + 0.3 * torch.randn(40, 16)
    want, mask = _arcee_ref(x, base)
    assert 0 < mask.sum() < mask.numel() / 4  # a real cut: outliers above median + 1.5 IQR
    assert torch.equal(_run("arcee_fusion", [x], base), want)


def test_arcee_fusion_keeps_only_the_outlying_changes(seed):
    """One row (a 1-D tensor): its KL is one positive factor, so importance ranks as |delta| does.
    Most entries move by 1e-3..1e-2 (median + 1.5 IQR ~ 0.012); ten move by 1 to 2: only those pass."""
    n = 401
    base = torch.randn(n)
    delta = torch.empty(n).uniform_(1e-3, 1e-2) * torch.randn(n).sign()
    outliers = torch.randperm(n)[:10]
    delta[outliers] = torch.empty(10).uniform_(1.0, 2.0) * torch.randn(10).sign()
    x = base + delta
    out = _run("arcee_fusion", [x], base)
    kept = out != base
    assert set(kept.nonzero().reshape(-1).tolist()) == set(outliers.tolist())
    assert torch.equal(out[kept], base[kept] + (x - base)[kept])


def test_arcee_fusion_keeps_every_change_when_most_entries_are_unchanged(seed):
    """Rows the model left alone have KL 0, so importance 0; with over three quarters of the
    entries at 0 every quartile is 0, the threshold is 0, and every change passes."""
    base = torch.randn(8, 16)
    x = base.clone()
    row = int(torch.randint(8, ()))
    x[row] += torch.randn(16)
    out = _run("arcee_fusion", [x], base)
    assert torch.equal(out, base + (x - base))
    assert not torch.equal(out, base)


def test_arcee_fusion_keeps_changes_whose_importance_equals_the_threshold(seed):
    """Every entry changed by the same amount: all importances are equal, so the threshold is that
    value (no spread), and the comparison is >=: all pass."""
    base = torch.randint(-32, 32, (64,)) / 8  # eighths: base +- 1/4 is exact, so every |delta| is 1/4
    x = base + torch.randn(64).sign() / 4
    assert ((x - base).abs() == 0.25).all()
    assert torch.equal(_run("arcee_fusion", [x], base), x)


def test_row_kl_smooths_both_distributions_by_1e_8(seed):
    """A change of a rare logit: q's 1e-9 becomes ~1.2e-8, which moves the KL by ~10%."""
    base = torch.randn(3, 6, dtype=torch.float64)
    base[:, 0] -= 20  # e^-20: below the smoothing
    x = base.clone()
    x[:, 0] += 10 + torch.rand(3, dtype=torch.float64)
    job = replace(_job("arcee_fusion", [x], base), compute_dtype=torch.float64)

    def kl(eps):
        p, q = torch.softmax(x, -1) + eps, torch.softmax(base, -1) + eps
        return (p * (p / q).log()).sum(-1, keepdim=True)
    torch.testing.assert_close(row_kl(job, x, base), kl(1e-8), rtol=1e-12, atol=0)
    assert ((kl(1e-8) - kl(0.0)).abs() > 0.01 * kl(0.0)).all()


def test_arcee_fusion_is_byte_identical_whatever_the_row_blocks_and_pool(seed, monkeypatch):
    base = 0.5 * torch.randn(30, 24)
    x = base + 0.3 * torch.randn(30, 24)
    whole = _run("arcee_fusion", [x], base)
    assert torch.equal(_run("arcee_fusion", [x], base), whole)
    monkeypatch.setattr("mergekit_ops.methods.arcee_fusion.CHUNK", 50)  # blocks of 2 rows
    with ThreadPoolExecutor(2) as pool:
        job = replace(_job("arcee_fusion", [x], base), pool=pool)
        assert torch.equal(METHODS["arcee_fusion"].merge(job), whole)


def test_arcee_fusion_of_an_empty_or_scalar_tensor(seed):
    empty = torch.zeros(0, 8)
    assert _run("arcee_fusion", [empty], empty).shape == (0, 8)
    base, x = torch.randn(()), torch.randn(())
    assert torch.equal(_run("arcee_fusion", [x], base), base + (x - base))  # one entry: its own threshold


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 1_000_003])
def test_quartiles_are_the_exact_order_statistics_of_every_entry(n, seed):
    """mergekit picks sorted[floor(q * (n - 1))]; over 1M entries it sorts a random sample of 1M
    instead: ours stay exact there (deterministic)."""
    values = torch.randn(n)
    s = values.sort().values
    assert [v.item() for v in quartiles(values)] == [s[(n - 1) // 4].item(), s[(n - 1) // 2].item(),
                                                     s[3 * (n - 1) // 4].item()]


def _recipe_error(tmp_path, text):
    with pytest.raises(RecipeError) as info:
        load_recipes(write_recipe(tmp_path / "recipe.yml", text))
    return str(info.value)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "arcee_fusion"])
def test_recipes_need_a_base_model(method, tmp_path):
    assert f"{method} needs a base_model" in _recipe_error(tmp_path, f"merge_method: {method}\nmodels: [a, b]\n")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "arcee_fusion"])
def test_recipes_need_a_model_besides_the_base(method, tmp_path):
    msg = _recipe_error(tmp_path, f"merge_method: {method}\nbase_model: base\nmodels: [base]\n")
    assert "besides the base_model, got 0" in msg and "key 'models'" in msg


def test_arcee_fusion_takes_exactly_one_model_besides_the_base(tmp_path):
    msg = _recipe_error(tmp_path, "merge_method: arcee_fusion\nbase_model: base\nmodels: [base, a, b]\n")
    assert "arcee_fusion takes exactly 1 model(s) besides the base_model, got 2" in msg
    [recipe] = load_recipes(write_recipe(tmp_path / "ok.yml", "merge_method: arcee_fusion\nbase_model: base\n"
                                                               "models: [base, a]\n"))
    assert recipe.merge_method == "arcee_fusion"


def test_ramplus_tl_parameters_are_shared_not_per_model(tmp_path):
    msg = _recipe_error(tmp_path, "merge_method: ramplus_tl\nbase_model: base\n"
                                  "models: [{model: a, parameters: {r: 0.3}}, b]\n")
    assert "a.parameters.r" in msg and "no per-model parameter 'r'" in msg
    msg = _recipe_error(tmp_path, "merge_method: ram\nbase_model: base\nmodels: [a]\nparameters: {alpha: 0.3}\n")
    assert "parameters.alpha" in msg and "ram has no parameter 'alpha'" in msg


def test_checkpoints_merge_as_the_formulas_say(tmp_path, family):
    """Through the engine, on the tiny family (the third model sharded): ramplus_tl with a gradient
    alpha and a filtered epsilon, and arcee_fusion with its base listed among the models."""
    base, fts = load_dir(family["base"]), [load_dir(family[f"m{i}"]) for i in range(3)]
    ram = merge(write_recipe(tmp_path / "ram.yml", {
        "merge_method": "ramplus_tl", "base_model": str(family["base"]), "dtype": "float32",
        "models": [{"model": str(family[f"m{i}"])} for i in range(3)],
        "parameters": {"r": 0.5, "alpha": [0.1, 0.9], "epsilon": [{"filter": "mlp", "value": 0.05},
                                                                  {"value": 0.03}]}}),
        tmp_path / "out-ram", MergeOptions())
    name = "model.layers.1.mlp.up_proj.weight"  # layer 1 of 3: alpha halfway along its gradient
    xs = [ft[name] for ft in fts]
    scales = _ramplus_scales(base[name], xs, 0.05, 0.5, 0.5)
    _close(load_dir(ram)[name], _ram_ref(base[name], xs, 0.05, scales))
    name = "model.layers.1.self_attn.q_proj.weight"
    xs = [ft[name] for ft in fts]
    scales = _ramplus_scales(base[name], xs, 0.03, 0.5, 0.5)
    _close(load_dir(ram)[name], _ram_ref(base[name], xs, 0.03, scales))
    fusion = load_dir(merge(write_recipe(tmp_path / "fusion.yml", {
        "merge_method": "arcee_fusion", "base_model": str(family["base"]), "dtype": "float32",
        "models": [{"model": str(family["base"])}, {"model": str(family["m1"])}]}), tmp_path / "out-fusion",
        MergeOptions()))
    assert fusion.keys() == base.keys()
    for k in base:
        assert torch.equal(fusion[k], _arcee_ref(fts[1][k], base[k])[0]), k
