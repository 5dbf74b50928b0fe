"""Gradient and filter resolution of parameter values."""
import random

from mergekit_ops.params import resolve


def test_scalar_is_returned_as_is():
    v = random.random()
    assert resolve(v, "model.layers.3.mlp.up_proj.weight", random.random()) == v


def test_gradient_interpolates_piecewise_linearly():
    values = [random.uniform(-1, 1) for _ in range(4)]
    assert resolve(values, "x", 0.0) == values[0]
    assert abs(resolve(values, "x", 1.0) - values[-1]) < 1e-12
    t = random.random()
    pos = t * 3
    i = min(int(pos), 2)
    expected = values[i] + (values[i + 1] - values[i]) * (pos - i)
    assert abs(resolve(values, "x", t) - expected) < 1e-12


def test_filter_list_first_substring_match_wins_with_fallback():
    value = [{"filter": "self_attn", "value": 1.0}, {"filter": "attn", "value": 2.0}, {"value": 3.0}]
    assert resolve(value, "model.layers.0.self_attn.q_proj.weight", 0.0) == 1.0
    assert resolve(value, "model.layers.0.cross_attn.q_proj.weight", 0.0) == 2.0
    assert resolve(value, "model.layers.0.mlp.up_proj.weight", 0.0) == 3.0


def test_a_star_filter_matches_every_tensor_as_in_mergekit():
    value = [{"filter": "mlp", "value": random.random()}, {"filter": "*", "value": random.random()}]
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.o_proj.weight", "lm_head.weight"):
        assert resolve(value, name, random.random()) == value[1]["value"]
    assert resolve(value, "model.layers.0.mlp.down_proj.weight", 0.0) == value[0]["value"]  # first match wins


def test_filter_without_match_is_unset():
    assert resolve([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0) is None


def test_filter_value_may_be_a_gradient():
    value = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 5.0}]
    t = random.random()
    assert abs(resolve(value, "layers.1.mlp.w", t) - t) < 1e-12
