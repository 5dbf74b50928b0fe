"""conf/ composition: the schema types every file, and every config error names its file and key
before anything runs; dvc.yaml is rendered from conf/ and the checked-in one is in sync."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.compose import graph as graph_module, stage as compose
from stages.common.errors import ConfigError
from mergekit_ops.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def _conf(tmp_path, models=None, merges=None, config=None, evals=None, publish=None):
    conf = tmp_path / "conf"
    for group in ("models", "merges", "eval", "publish"):
        (conf / group).mkdir(parents=True)
    base = {"defaults": ["mergeforge_schema", "_self_"], "demo": {"enabled": False}}
    (conf / "config.yaml").write_text(yaml.safe_dump({**base, **(config or {})}, sort_keys=False))
    groups = (("models", models), ("merges", merges), ("eval", evals), ("publish", publish))
    for group, items in groups:
        for name, body in (items or {}).items():
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
    params = compose.resolved_params(cfg, graph, tmp_path)
    assert params["merges"]["again"]["inputs"] == {"soup": "artifacts/merges/soup", "a": "x/a"}  # local: in place
    assert "seed" not in params["merges"]["soup"]["recipe"] and "device" not in params["merges"]["soup"]["recipe"]
    assert params["merges"]["soup"]["device"] == "cpu"  # the default: the math runs on the CPU


@pytest.mark.parametrize("models, merges, config, pattern", [
    ({"a": {"source": "local", "pth": "x"}}, {}, None, r"conf/models/a\.yaml: key 'pth'"),
    ({"a": {"source": "local", "path": "x", "revision": ["main"]}}, {}, None, r"conf/models/a\.yaml: key 'revision'"),
    (MODELS, {"soup": {**_soup("a"), "seed": "zero"}}, None, r"conf/merges/soup\.yaml: key 'seed'"),
    (MODELS, {"soup": {**_soup("a"), "sed": 1}}, None, r"conf/merges/soup\.yaml: key 'sed'"),
    (MODELS, {"soup": {**_soup("a"), "device": "gpu"}}, None, r"conf/merges/soup\.yaml: key 'device': 'cpu' or 'cuda'"),
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
    conf = _conf(tmp_path, MODELS, {"soup": {**_soup("a", "b"), "device": "${merges.other.device}"},
                                    "other": {**_soup("a"), "device": "cuda:1"}})
    cfg = compose.compose(conf)
    assert compose.resolved_params(cfg, compose.check(cfg, conf), tmp_path)["merges"]["soup"]["device"] == "cuda:1"
    conf = _conf(tmp_path / "2", MODELS, {"soup": {**_soup("a"), "description": "${nowhere}"}})
    assert compose.main(["--root", str(tmp_path / "2")]) == 2
    assert "conf/merges/soup.yaml: key 'description'" in capsys.readouterr().err


QA = {"qa": {"kind": "exact_match", "tasks": {"x": "d/x.jsonl", "y": "d/y.jsonl"}}}


def _ta(**extra):
    return {"merge_method": "task_arithmetic", "base_model": "a", "parameters": {"lambda": 1.0},
            "models": [{"model": "b", "parameters": {"weight": 1.0}}], **extra}


def test_sweep_builds_one_recipe_per_value_and_a_curve_stage(tmp_path):
    conf = _conf(tmp_path, MODELS, {"ta": _ta(sweep={"key": "parameters.lambda", "values": [0.5, 1.5]}),
                                    "w": _ta(sweep={"key": "models.0.parameters.weight", "values": [2.0]}),
                                    "mix": _soup("ta-2", "a")}, evals=QA)
    cfg = compose.compose(conf)
    graph = compose.check(cfg, conf)
    assert set(graph.merges) == {"mix", "ta-1", "ta-2", "w-1"}
    assert graph.merges.index("ta-2") < graph.merges.index("mix")  # a variant is a recipe like any other
    params = compose.resolved_params(cfg, graph, tmp_path)
    assert [params["merges"][f"ta-{i}"]["recipe"]["parameters"]["lambda"] for i in (1, 2)] == [0.5, 1.5]
    assert params["merges"]["w-1"]["recipe"]["models"][0]["parameters"]["weight"] == 2.0
    assert "sweep" not in params["merges"]["ta-1"]["recipe"]
    assert params["sweeps"]["ta"] == {"key": "parameters.lambda", "values": [0.5, 1.5], "recipes": ["ta-1", "ta-2"]}
    dvc = yaml.safe_load(compose.render_dvc_yaml(graph, params, cfg, conf, tmp_path))
    assert "artifacts/eval/ta-2.json" in dvc["stages"]["sweep-ta"]["deps"]
    curve = [p for p in dvc["plots"] if "artifacts/reports/ta/sweep.json" in p][0]["artifacts/reports/ta/sweep.json"]
    assert curve["y"] == ["qa/x", "qa/y"] and curve["template"] == "simple"  # lines through the points, unsmoothed
    assert curve["x_label"] == "parameters.lambda" and curve["y_label"].startswith("score")
    # each chart once: a file drawn by a top-level plot is not also a stage's plot (DVC drew both)
    assert not [name for name, stage in dvc["stages"].items() if "plots" in stage]
    for path in ("artifacts/reports/ta/sweep.json", "artifacts/reports/ta/sweep.png"):
        assert {path: {"cache": False}} in dvc["stages"]["sweep-ta"]["outs"]


def test_report_pictures_are_outputs_the_card_depends_on_and_each_chart_is_drawn_once(tmp_path):
    conf = _conf(tmp_path, MODELS, {"soup": _soup("a", "b"), "mix": _soup("soup", "a")}, evals=QA,
                 publish={"p": {"model": "mix", "repo_id": "me/mix"}})
    cfg = compose.compose(conf)
    graph = compose.check(cfg, conf)
    dvc = yaml.safe_load(compose.render_dvc_yaml(graph, compose.resolved_params(cfg, graph, tmp_path), cfg, conf,
                                                 tmp_path))
    for name in ("soup", "mix"):
        outs = dvc["stages"][f"report-{name}"]["outs"]
        for picture in ("scores.png", "retention.png"):
            assert {f"artifacts/reports/{name}/{picture}": {"cache": False}} in outs
    deps = dvc["stages"]["publish-p"]["deps"]
    assert {"artifacts/reports/mix/scores.png", "artifacts/reports/mix/retention.png"} <= set(deps)
    assert not [d for d in deps if d.startswith("artifacts/reports/soup")]  # the card shows its own merge's only
    drawn = [next(iter(p)) for p in dvc["plots"]]
    assert sorted(drawn) == sorted(set(drawn)) == ["artifacts/reports/mix/scores.json", "artifacts/reports/soup/scores.json"]
    bars = dvc["plots"][0][drawn[0]]
    assert (bars["template"], bars["x"], bars["y"]) == ("bar_horizontal", "score", "label")
    assert bars["x_label"] and bars["y_label"] == "task: model (role)"


@pytest.mark.parametrize("merges, config, evals, publish, pattern", [
    ({"ta": _ta(sweep={"key": "parameters.nope.deeper", "values": [1]})}, None, None, None,
     r"conf/merges/ta\.yaml: key 'sweep.key': the recipe has no 'parameters.nope'"),
    ({"ta": _ta(sweep={"key": "models.3.parameters.weight", "values": [1]})}, None, None, None,
     r"'models.3' is not an item of a 1-item list"),
    ({"ta": _ta(sweep={"key": "parameters.lambda", "values": [1]}), "ta-1": _soup("a")}, None, None, None,
     r"sweep variant 'ta-1' clashes with conf/merges/ta-1\.yaml"),
    ({}, {"evaluate": {"baseline": "zz"}}, QA, None, r"key 'evaluate.baseline': no model or recipe 'zz'"),
    ({}, None, {"qa": {"kind": "bleu", "tasks": {"x": "d"}}}, None, r"conf/eval/qa\.yaml: key 'kind': one of"),
    ({"soup": _soup("a")}, None, None, {"p": {"model": "soup", "repo_id": "me/x"}}, r"publishing needs evaluation suites"),
    ({"soup": _soup("a")}, None, QA, {"p": {"model": "a", "repo_id": "me/x"}}, r"conf/publish/p\.yaml: key 'model'"),
    ({"soup": _soup("a")}, None, QA, {"p": {"model": "soup", "repo_id": "x"}}, r"conf/publish/p\.yaml: key 'repo_id'"),
    ({"soup": _soup("a")}, None, QA, {"p": {"model": "soup", "repo_id": "me/x", "gates": {"min_score": {"qa/z": 1}}}},
     r"conf/publish/p\.yaml: key 'gates.min_score.qa/z': no such task"),
    ({"soup": _soup("a")}, None, QA, {"p": {"model": "soup", "repo_id": "me/x", "gates": {"min_scor": {}}}},
     r"conf/publish/p\.yaml: key 'gates.min_scor'"),
])
def test_evaluation_sweep_and_publish_errors_name_file_and_key(tmp_path, merges, config, evals, publish, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _check(_conf(tmp_path, MODELS, merges, config, evals, publish))


@pytest.mark.slow
def test_stage_code_deps_cover_every_project_module_the_stage_loads():
    """A stage's code deps come from its import statements; Python's own import of the stage
    must load no project module they miss (else editing it would not rerun the stage)."""
    entries = ["compose.stage", "demo.stage", "fetch.stage", "merge.stage", "evaluate.stage", "evaluate.report",
               "evaluate.sweep", "publish.stage"]  # what dvc.yaml's commands run
    probe = ("import importlib, sys; importlib.import_module('stages.' + sys.argv[1]); "
             "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('stages', 'mergekit_ops')))")
    for entry in entries:
        package = entry.split(".")[0]
        loaded = subprocess.run([sys.executable, "-c", probe, entry], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
        needed = {"mergekit_ops" if m.startswith("mergekit_ops") else
                  "stages/__init__.py" if m == "stages" else f"stages/{m.split('.')[1]}" for m in loaded}
        assert needed <= set(graph_module.code_deps(package)), (entry, needed - set(graph_module.code_deps(package)))


def test_params_yaml_says_it_is_generated_and_holds_only_the_keys_that_apply(tmp_path):
    """Local sources have no revision; only seeded methods keep a seed; a suite keeps its own
    kind's options; empty gates go; recipes keep mergekit's key order whatever the file's order."""
    dare = {"dtype": "float32", "base_model": "a",
            "models": [{"model": "b", "parameters": {"weight": 1.0, "density": 0.5}}],
            "merge_method": "dare_linear", "seed": 3}
    evals = {"ppl": {"kind": "perplexity", "tasks": {"t": "x.txt"}},
             "qa": {"kind": "exact_match", "tasks": {"q": "q.jsonl"}}}
    publish = {"out": {"model": "soup", "repo_id": "me/soup", "gates": {"min_score": {"*": 0.1}}}}
    conf = _conf(tmp_path, MODELS, {"soup": {"dtype": "float32", **_soup("a", "b"), "seed": 5}, "dare": dare},
                 evals=evals, publish=publish)
    assert compose.main(["--root", str(tmp_path)]) == 1  # a new graph
    text = (tmp_path / "params.yaml").read_text()
    assert text.startswith("# Generated from conf/") and "edit conf/, not this file" in text.splitlines()[0]
    params = yaml.safe_load(text)
    assert params["models"]["a"] == {"source": "local", "path": "x/a"}
    assert "seed" not in params["merges"]["soup"] and params["merges"]["dare"]["seed"] == 3
    assert list(params["merges"]["dare"]["recipe"]) == ["merge_method", "models", "base_model", "dtype"]
    assert list(params["merges"]["soup"]["recipe"]) == ["merge_method", "models", "dtype"]
    assert params["evaluate"]["suites"]["ppl"] == {"kind": "perplexity", "tasks": {"t": {"test": "x.txt"}}, "batch_size": 16,
                                                   "max_length": 1024}
    assert set(params["evaluate"]["suites"]["qa"]) == {"kind", "tasks", "batch_size", "max_new_tokens"}
    assert params["publish"]["out"]["gates"] == {"min_score": {"*": 0.1}}
    assert compose.main(["--check", "--root", str(tmp_path)]) == 0 and conf.is_dir()


def test_a_project_running_installed_code_declares_its_digests_not_its_folders(tmp_path):
    """Outside this repository (a `mergeforge new` project) dvc.yaml names no path outside the
    project: each stage declares code.PACKAGE, a digest that changes with any file it runs."""
    conf = _conf(tmp_path, MODELS, {"soup": _soup("a", "b")}, evals=QA)
    cfg = compose.compose(conf)
    graph = compose.check(cfg, conf)
    params = compose.resolved_params(cfg, graph, tmp_path)
    assert set(params["code"]) == {"merge", "evaluate", "lineage"}  # no hub model, no publish target, the demo off
    dvc = yaml.safe_load(compose.render_dvc_yaml(graph, params, cfg, conf, tmp_path))["stages"]
    assert "code.merge" in dvc["merge-soup"]["params"] and "code.evaluate" in dvc["report-soup"]["params"]
    assert "code.lineage" in dvc["lineage"]["params"]
    assert not [d for stage in dvc.values() for d in stage.get("deps", []) if d.startswith(("stages", "mergekit_ops"))]
    assert "code" not in compose.resolved_params(cfg, graph, ROOT)  # here the folders are declared
    empty = _conf(tmp_path / "empty")  # nothing to build yet: no stage, no digest
    cfg = compose.compose(empty)
    assert "code" not in compose.resolved_params(cfg, compose.check(cfg, empty), tmp_path / "empty")
    copy = tmp_path / "code"
    for package in ("stages", "mergekit_ops"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = graph_module.code_digests(["merge", "evaluate", "demo"], copy)
    with open(copy / "mergekit_ops" / "engine.py", "a") as f:
        f.write("# an upgrade\n")
    after = graph_module.code_digests(["merge", "evaluate", "demo"], copy)
    assert after["merge"] != before["merge"] and after["evaluate"] == before["evaluate"]
    assert after["demo"] == before["demo"] == graph_module.code_digests(["demo"])["demo"]


def test_stages_use_only_the_engines_public_api_and_the_engine_never_imports_stages():
    import ast

    def imports(package: str):
        for f in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    yield f, node.module
                elif isinstance(node, ast.Import):
                    yield from ((f, alias.name) for alias in node.names)

    private = [(str(f), m) for f, m in imports("stages") if m.startswith("mergekit_ops.")]
    assert private == [], private
    assert [(str(f), m) for f, m in imports("mergekit_ops") if m.split(".")[0] == "stages"] == []
    import mergekit_ops

    used = {alias.name for f in (ROOT / "stages").rglob("*.py") for node in ast.walk(ast.parse(f.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == "mergekit_ops" for alias in node.names}
    assert used and used <= set(mergekit_ops.__all__)
    assert all(getattr(mergekit_ops, name) is not None for name in mergekit_ops.__all__)
