"""conf/ composition: the schema types every file, and every config error names its file and key
before anything runs; dvc.yaml is rendered from conf/ and the checked-in one is in sync."""
from pathlib import Path

import pytest
import yaml

from stages import compose
from stages.errors import ConfigError
from mergekit_ops.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def _conf(tmp_path, models=None, merges=None, config=None):
    conf = tmp_path / "conf"
    (conf / "models").mkdir(parents=True)
    (conf / "merges").mkdir()
    base = {"defaults": ["mergeforge_schema", "_self_"], "demo": {"enabled": False}}
    (conf / "config.yaml").write_text(yaml.safe_dump({**base, **(config or {})}, sort_keys=False))
    for group, items in (("models", models or {}), ("merges", merges or {})):
        for name, body in items.items():
            (conf / group / f"{name}.yaml").write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return conf


MODELS = {"a": {"source": "local", "path": "x/a"}, "b": {"source": "local", "path": "x/b"}}


def _soup(*names):
    return {"merge_method": "linear", "models": [{"model": n, "parameters": {"weight": 1.0}} for n in names]}


def _check(conf):
    return compose.check(compose.compose(conf), conf)


def test_composes_models_and_merges_into_a_typed_config(tmp_path):
    conf = _conf(tmp_path, MODELS, {"soup": _soup("a", "b"), "again": _soup("soup", "a")})
    cfg = compose.compose(conf)
    assert cfg.models.a.revision == "main" and cfg.merges.soup.seed == 0
    graph = compose.check(cfg, conf)
    assert graph.merges == ["soup", "again"]  # dependency order
    params = compose.resolved_params(cfg, graph)
    assert params["merges"]["again"]["inputs"] == {"soup": "artifacts/merges/soup", "a": "x/a"}  # local: in place
    assert "seed" not in params["merges"]["soup"]["recipe"]


@pytest.mark.parametrize("models, merges, config, pattern", [
    ({"a": {"source": "local", "pth": "x"}}, {}, None, r"conf/models/a\.yaml: key 'pth'"),
    ({"a": {"source": "local", "path": "x", "revision": ["main"]}}, {}, None, r"conf/models/a\.yaml: key 'revision'"),
    (MODELS, {"soup": {**_soup("a"), "seed": "zero"}}, None, r"conf/merges/soup\.yaml: key 'seed'"),
    (MODELS, {"soup": {**_soup("a"), "sed": 1}}, None, r"conf/merges/soup\.yaml: key 'sed'"),
    ({"a": {"source": "ftp", "path": "x"}}, {}, None, r"conf/models/a\.yaml: key 'source': 'local' or 'hub'"),
    ({"a": {"source": "hub"}}, {}, None, r"conf/models/a\.yaml: key 'repo_id'"),
    ({"a": {"source": "local"}}, {}, None, r"conf/models/a\.yaml: key 'path'"),
    (MODELS, {"soup": _soup("a", "c")}, None, r"conf/merges/soup\.yaml: model 'c' is neither in conf/models"),
    (MODELS, {"x": _soup("a", "y"), "y": _soup("x", "b")}, None, r"cycle: (x -> y -> x|y -> x -> y)"),
    (MODELS, {"a": _soup("b")}, None, r"'a' is both conf/models/a\.yaml and conf/merges/a\.yaml"),
    (MODELS, {"soup": _soup("a")}, {"build": ["stew"]}, r"conf/config\.yaml: key 'build': no recipe conf/merges/stew"),
    (MODELS, {}, {"pathz": {}}, r"conf/config\.yaml: key 'pathz'"),
    (MODELS, {"bad name": _soup("a")}, None, r"file names become stage names"),
])
def test_config_errors_name_file_and_key(tmp_path, models, merges, config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _check(_conf(tmp_path, models, merges, config))


def test_recipe_errors_come_from_the_merge_engine_checks(tmp_path):
    conf = _conf(tmp_path, MODELS, {"t": {"merge_method": "ties", "base_model": "a",
                                          "models": [{"model": "b", "parameters": {"weight": 1, "density": 2}}]}})
    with pytest.raises(RecipeError, match=r"conf/merges/t\.yaml.*density must be in"):
        _check(conf)
    conf = _conf(tmp_path / "2", MODELS, {"t": {"merge_method": "tie", "models": ["a"]}})
    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        _check(conf)


def test_build_list_selects_recipes_and_what_they_need(tmp_path):
    conf = _conf(tmp_path, {**MODELS, "c": {"source": "local", "path": "x/c"}},
                 {"soup": _soup("a", "b"), "other": _soup("c", "b"), "again": _soup("soup", "a")},
                 {"build": ["again"]})
    graph = _check(conf)
    assert graph.merges == ["soup", "again"] and graph.models == ["a", "b"]


def test_checked_in_dvc_yaml_matches_conf():
    assert compose.main(["--check", "--root", str(ROOT)]) == 0


def test_interpolations_resolve_and_a_broken_one_names_its_file(tmp_path, capsys):
    conf = _conf(tmp_path, MODELS, {"soup": {**_soup("a", "b"), "seed": "${merges.other.seed}"},
                                    "other": {**_soup("a"), "seed": 7}})
    cfg = compose.compose(conf)
    assert compose.resolved_params(cfg, compose.check(cfg, conf))["merges"]["soup"]["seed"] == 7
    conf = _conf(tmp_path / "2", MODELS, {"soup": {**_soup("a"), "description": "${nowhere}"}})
    assert compose.main(["--root", str(tmp_path / "2")]) == 2
    assert "conf/merges/soup.yaml: key 'description'" in capsys.readouterr().err
