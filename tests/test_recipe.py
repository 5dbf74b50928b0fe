"""Recipe parsing: mergekit syntax accepted, every mistake named by file and key."""
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_ops.errors import RecipeError
from mergekit_ops.recipe import load_recipes
from tiny import write_recipe

TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.5}
  - model: b
    parameters: {weight: [0, 1], density: 0.7}
parameters: {normalize: true}
dtype: bfloat16
"""


def _load(tmp_path, text):
    return load_recipes(write_recipe(tmp_path / "recipe.yml", text))


def _error(tmp_path, text) -> str:
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, text)
    assert "recipe.yml" in str(info.value)
    return str(info.value)


def test_mergekit_recipe_is_parsed(tmp_path):
    [r] = _load(tmp_path, TIES)
    assert r.merge_method == "ties" and r.base_model == "base" and r.dtype == "bfloat16"
    assert [s.model for s in r.models] == ["a", "b"]
    assert r.models[1].parameters["weight"] == [0, 1]
    assert r.model_refs() == ["a", "b", "base"]


def test_unknown_method_suggests_the_closest_name(tmp_path):
    msg = _error(tmp_path, TIES.replace("ties", "tise"))
    assert "merge_method" in msg and "did you mean 'ties'" in msg


def test_missing_required_parameter_names_model_and_key(tmp_path):
    msg = _error(tmp_path, TIES.replace("weight: 0.5, ", ""))
    assert "'weight'" in msg and "model 'a'" in msg and "a.parameters.weight" in msg


def test_wrong_type_names_the_key(tmp_path):
    msg = _error(tmp_path, TIES.replace("normalize: true", "normalize: 3"))
    assert "parameters.normalize" in msg and "true/false" in msg


@pytest.mark.parametrize("density", ["0", "1.5", "-0.2", "[0.5, 1.2]"])
def test_density_outside_zero_one_is_rejected(tmp_path, density):
    msg = _error(tmp_path, TIES.replace("density: 0.5", f"density: {density}"))
    assert "a.parameters.density" in msg and "(0.0, 1.0]" in msg


def test_slerp_needs_exactly_two_models(tmp_path):
    msg = _error(tmp_path, """
merge_method: slerp
base_model: base
models: [{model: base}, {model: a}, {model: b}]
parameters: {t: 0.5}
""")
    assert "slerp takes exactly 1 model(s) besides the base_model, got 2" in msg and "key 'models'" in msg


def test_slerp_needs_a_base(tmp_path):
    assert "needs a base_model" in _error(tmp_path, "merge_method: slerp\nmodels: [a, b]\nparameters: {t: 0.5}\n")


def test_unequal_layer_ranges_in_one_slice(tmp_path):
    msg = _error(tmp_path, """
merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 3]}
parameters: {t: 0.5}
""")
    assert "equal length" in msg and "slices[0].sources" in msg


def test_unknown_parameter_suggests_closest(tmp_path):
    msg = _error(tmp_path, TIES.replace("density: 0.7", "densty: 0.7"))
    assert "did you mean 'density'" in msg and "b.parameters.densty" in msg


def test_unknown_top_level_key(tmp_path):
    assert "did you mean 'base_model'" in _error(tmp_path, TIES.replace("base_model:", "base_modle:"))


@pytest.mark.parametrize("entry, key, suggestion", [
    ("{model: a, layer_range: [0, 2]}]\n    parameter: {scale: 1}", "slices[0].parameter", "parameters"),
    ("{model: a, layer_rang: [0, 2]}]", "slices[0].sources[0].layer_rang", "layer_range"),
])
def test_unknown_slice_or_source_key_suggests_closest(tmp_path, entry, key, suggestion):
    msg = _error(tmp_path, f"merge_method: passthrough\nslices:\n  - sources: [{entry}\n")
    assert f"did you mean '{suggestion}'" in msg and key in msg


def test_models_slices_and_modules_are_exclusive(tmp_path):
    assert "exactly one of 'models', 'slices' or 'modules'" in _error(tmp_path, "merge_method: linear\n")


def test_invalid_yaml_names_the_file(tmp_path):
    assert "invalid YAML" in _error(tmp_path, "merge_method: [linear\n")


def test_malformed_filter_list(tmp_path):
    msg = _error(tmp_path, TIES.replace("normalize: true", "normalize: [{filter: mlp}]"))
    assert "parameters.normalize[0]" in msg


def test_multi_document_orders_by_dependency_and_finishes_with_unnamed(tmp_path):
    recipes = _load(tmp_path, """
merge_method: linear
models: [{model: first, parameters: {weight: 1}}, {model: c, parameters: {weight: 1}}]
---
name: first
merge_method: linear
models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
""")
    assert [r.name for r in recipes] == ["first", None]


def test_multi_document_cycle_is_an_error(tmp_path):
    msg = _error(tmp_path, """
name: x
merge_method: linear
models: [{model: y, parameters: {weight: 1}}]
---
name: y
merge_method: linear
models: [{model: x, parameters: {weight: 1}}]
""")
    assert "cycle" in msg and "x -> y -> x" in msg or "y -> x -> y" in msg


def test_two_unnamed_documents_are_ambiguous(tmp_path):
    doc = "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
    assert "only one document" in _error(tmp_path, doc + "---\n" + doc)


def test_recipes_are_checked_without_importing_torch(tmp_path):
    """compose checks every recipe on each `dvc repro`: importing torch would slow every run of it."""
    path = write_recipe(tmp_path / "recipe.yml", TIES)
    code = ("import sys, stages.compose.stage; from mergekit_ops.recipe import load_recipes; "
            f"load_recipes({str(path)!r}); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
