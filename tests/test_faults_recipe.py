"""Fault suite, recipes: whatever a recipe file holds, loading it ends in a RecipeError naming the
file (and key), in bounded time and memory; never a traceback or a hang."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mergekit_ops.errors import RecipeError
from mergekit_ops.recipe import TOP_KEYS, load_recipes, parse_recipe

VALID = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                              {"model": "b", "parameters": {"weight": 0.5}}]}

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6) | st.integers(0, 3) | st.sampled_from(sorted(TOP_KEYS)), inner, max_size=4), max_leaves=20)
paths = st.lists(st.sampled_from(["models", 0, 1, "model", "parameters", "weight", "slices", "sources",
                                  "layer_range", "merge_method", "dtype", "base_model", "name", "tokenizer",
                                  "source", "filter", "value", "t", "density"]), min_size=1, max_size=5)


def _put(doc, path, value):
    """doc with value put at path, where the path exists or can be made; else doc unchanged."""
    node = doc
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return doc
    try:
        node[path[-1]] = value
    except (IndexError, TypeError):
        pass
    return doc


def _parses_or_names_the_file(doc, source="r.yml"):
    try:
        parse_recipe(doc, source)
    except RecipeError as exc:
        assert str(exc).startswith(source), str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_any_document_parses_or_is_a_recipe_error(doc):
    _parses_or_names_the_file(doc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(paths, values), min_size=1, max_size=3))
def test_a_valid_recipe_with_any_value_anywhere_parses_or_is_a_recipe_error(edits):
    import copy

    doc = copy.deepcopy(VALID)
    for path, value in edits:
        doc = _put(doc, path, value)
    _parses_or_names_the_file(doc)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_load_or_are_a_recipe_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "r.yml"
    path.write_bytes(data)
    try:
        load_recipes(path)
    except RecipeError as exc:
        assert str(exc).startswith(str(path))


def _billion_laughs(levels: int, width: int = 9) -> str:
    lines = ["x0: &x0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,words", [
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n"
     + "".join(f"        - {{filter: f{i}, value: *b}}\n" for i in range(3)), "alias"),  # undefined alias
    (_billion_laughs(10) + "merge_method: linear\nmodels: [a, b]\nparameters: {weight: *x9}\n", "expand"),
    (_billion_laughs(10).replace("x", "g") + "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n"
     "      weight: [{filter: mlp, value: *g9}, {value: 1}]\n  - b\n", "expand"),
    ("a: &a [*a]\n", "itself"),
    ("[" * 20000 + "]" * 20000, "nested deeper"),
    ("- " * 20000 + "x\n", "nested deeper"),
])
def test_hostile_yaml_is_refused_fast(tmp_path, text, words):
    path = tmp_path / "bomb.yml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(RecipeError, match=words) as err:
        load_recipes(path)
    assert time.monotonic() - start < 2.0
    assert str(err.value).startswith(str(path))


def test_non_utf8_recipe_names_the_byte(tmp_path):
    path = tmp_path / "r.yml"
    path.write_bytes(b"merge_method: linear\nmodels: [a, b]\nname: caf\xe9\n")
    with pytest.raises(RecipeError, match=r"not UTF-8.*line 3") as err:
        load_recipes(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("doc,key", [
    ({**VALID, 1: "x"}, None),
    ({**VALID, "parameters": {2: 0.5}}, "parameters"),
    ({**VALID, "dtype": ["bfloat16"]}, "dtype"),
    ({**VALID, "dtype": {"a": 1}}, "dtype"),
    ({**VALID, "out_dtype": 16}, "out_dtype"),
    ({**VALID, "name": "../escaped"}, "name"),
    ({**VALID, "name": "/tmp/elsewhere"}, "name"),
    ({**VALID, "name": ".."}, "name"),
    ({**VALID, "name": "a/b"}, "name"),
    ({**VALID, "models": [{"model": "a\x00b", "parameters": {"weight": 1}}, "b"]}, "models[0].model"),
])
def test_type_errors_name_the_key(doc, key):
    with pytest.raises(RecipeError) as err:
        parse_recipe(doc, "r.yml")
    message = str(err.value)
    assert message.startswith("r.yml")
    if key:
        assert f"key '{key}'" in message, message
