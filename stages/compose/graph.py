"""The build graph: which merge reads which model or merge, and its rendering as dvc.yaml.

Hub models get a fetch stage; local models are read where they are, as a dependency DVC hashes.

Every stage is written out with its own deps (DVC's foreach cannot give a stage a variable-length
deps list), so a merge of merges is an ordinary edge from the parent's output directory.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

import yaml
from omegaconf import DictConfig

from ..common.errors import ConfigError
from ..common.layout import (ancestors, card_images, export_dir, fetched, metrics_file, model_dir, parents,
                             publish_dir, report_files, roles, search_files, sweep_files)
from ..common.splits import data_files, split_names
from ..search.space import dimension_names


CODE = Path(__file__).resolve().parents[2]  # the folder that holds stages/ and mergekit_ops/


def code_deps(package: str) -> list[str]:
    """The code a stage runs: stages/__init__.py, its package under stages/, every stage package it
    imports (stages/common at least) and mergekit_ops when it imports the engine, read from import
    statements (lazy ones included), transitively, so a stage reruns when any code it runs changes
    and no hand-kept list goes stale. Each package counts as one directory."""
    return list(_code_deps(package))


@lru_cache(maxsize=None)
def _code_deps(package: str) -> tuple[str, ...]:
    """code_deps, parsed once per package (every merge and evaluation stage asks for the same)."""
    here = Path(__file__).parents[1]
    deps, todo = {"stages/__init__.py"}, [package]  # the package's own __init__ runs first
    while todo:
        name = todo.pop()
        if f"stages/{name}" in deps:
            continue
        deps.add(f"stages/{name}")
        for source in sorted((here / name).rglob("*.py")):
            tree = ast.parse(source.read_text(), filename=str(source.relative_to(here.parent)))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported = [alias.name.split(".") for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    parts = [p for p in (node.module or "").split(".") if p]
                    if node.level == 1:
                        parts = ["stages", name] + parts
                    elif node.level == 2:
                        parts = ["stages"] + (parts or [alias.name for alias in node.names][:1])
                    imported = [parts]
                else:
                    continue
                for parts in imported:
                    if parts[0] == "mergekit_ops":
                        deps.add("mergekit_ops")
                    elif parts[0] == "stages" and len(parts) > 1 and (here / parts[1]).is_dir():
                        todo.append(parts[1])
    return tuple(sorted(deps))


class Graph:
    """Source models and merges; `inputs[merge]` lists what the merge reads, by name; `recipes`
    and `sweeps` are the recipe bodies and sweeps of conf/merges, sweeps expanded once; `searches`
    the files of conf/searches, each a merge whose recipe its search finds."""

    def __init__(self, sources: dict[str, dict], inputs: dict[str, list[str]],
                 recipes: dict[str, dict] | None = None, sweeps: dict[str, dict] | None = None,
                 searches: dict[str, dict] | None = None):
        self.sources, self.inputs = sources, inputs
        self.recipes, self.sweeps, self.searches = recipes or {}, sweeps or {}, searches or {}
        self.models = sorted(sources)
        self.merges = sorted(inputs)

    def check_acyclic(self, conf_dir: Path) -> None:
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done" or name not in self.inputs:
                return
            if state.get(name) == "open":
                cycle = path[path.index(name):] + [name]
                raise ConfigError(f"{conf_dir / 'merges' / (name + '.yaml')}: recipes use each other in a cycle: "
                                  + " -> ".join(cycle))
            state[name] = "open"
            for ref in self.inputs[name]:
                visit(ref, path + [name])
            state[name] = "done"

        for name in self.merges:
            visit(name, [])

    def select(self, build: list[str] | None) -> "Graph":
        """The recipes to build (all when None) and what they need, merges in dependency order."""
        wanted = list(self.merges) if build is None else list(build)
        order: list[str] = []
        models = set(self.sources) if build is None else set()

        def visit(name: str) -> None:
            if name in self.sources:
                models.add(name)
                return
            if name in order:
                return
            for ref in self.inputs[name]:
                visit(ref)
            order.append(name)

        for name in sorted(wanted):
            visit(name)
        graph = Graph({m: self.sources[m] for m in models}, {m: self.inputs[m] for m in order},
                      {m: self.recipes[m] for m in order if m in self.recipes}, self.sweeps,
                      {m: self.searches[m] for m in order if m in self.searches})
        graph.merges = order
        return graph


def render_dvc_yaml(graph: Graph, params: dict, cfg: DictConfig, conf_dir: Path, root: Path) -> str:
    """dvc.yaml for this graph: compose, the demo, one fetch per hub model, one merge per recipe;
    with suites in conf/eval, one evaluation per model and merge, one report per merge and one curve
    per sweep; one publish per target; and the reports' plots.

    Each stage declares every file and params.yaml key its outputs depend on, so a change to any of
    them reruns it and nothing else does (docs/pipeline.md lists what each declares, and the reads
    left out on purpose)."""
    if code_is_inside(root):
        code, code_key = code_deps, lambda package: []  # noqa: E731
    else:  # the code is installed elsewhere: its digests in params.yaml stand for it
        code, code_key = (lambda package: []), (lambda package: [f"code.{package}"])  # noqa: E731
    folder = lambda name: _dep_path(str(model_dir(name, params)), root)  # noqa: E731
    metrics = lambda name: str(metrics_file(name, params))  # noqa: E731
    stages: dict[str, dict] = {"compose": {
        "cmd": "python -m stages.compose",
        "always_changed": True,
        "deps": code("compose") + [str(conf_dir.relative_to(root))],  # the directory: files may come and go
        "outs": [{"params.yaml": {"cache": False, "persist": True}}],
    }}
    if cfg.demo.enabled:
        stages["demo"] = {"cmd": f"python -m stages.demo {cfg.demo.out}", "deps": code("demo"),
                          "params": code_key("demo"), "outs": [cfg.demo.out]}
    for name in graph.models:
        spec = params["models"][name]
        if fetched(spec):  # what says which files: not its license (a card reads that)
            local = [_dep_path(s["path"], root) for s in (spec, spec.get("adapter") or {}) if s.get("source") == "local"]
            keys = [f"models.{name}.{k}" for k in ("repo_id", "sha", "adapter") if k in spec]
            stages[f"fetch-{name}"] = {"cmd": f"python -m stages.fetch {name}", "deps": code("fetch") + local,
                                       "params": keys + code_key("fetch"), "outs": [folder(name)]}
    plots = []
    for name, search in params["searches"].items():
        files = {kind: str(path) for kind, path in search_files(name, params).items()}
        stages[f"search-{name}"] = {
            "cmd": f"python -m stages.search {name}",
            "deps": (code("search") + [folder(ref) for ref in parents(name, params)]
                     + [_dep_path(path, root) for path in data_files(search["objective"]["data"], "validation")]),
            "params": [f"searches.{name}"] + code_key("search"),
            "outs": [{files[kind]: {"cache": False}} for kind in ("recipe", "trials", "trials_png")],  # plots: below
            "metrics": [{files["best"]: {"cache": False}}],
        }
        plots.append({f"search-{name}: objective per trial": {  # simple: lines through the points, no smoothing
            "title": f"{name}: validation objective per trial, and the best so far",
            "template": "simple", "x": "trial", "y": {files["trials"]: ["objective", "best"]},
            "x_label": "trial", "y_label": "validation objective"}})
        for dim in dimension_names(search):
            plots.append({f"search-{name}: {dim}": {
                "title": f"{name}: validation objective against {dim}", "template": "scatter",
                "x": {files["trials"]: dim}, "y": {files["trials"]: "objective"},
                "x_label": dim, "y_label": "validation objective"}})
    for name in graph.merges:
        stages[f"merge-{name}"] = {
            "cmd": f"python -m stages.merge {name}",
            "deps": code("merge") + _found_recipe(name, params) + [folder(ref) for ref in parents(name, params)],
            "params": [f"merges.{name}"] + code_key("merge"),
            "outs": [folder(name)],
        }
    if params["evaluate"]["suites"]:
        suites = params["evaluate"]["suites"]
        data = _suite_data(suites, root)
        for name in graph.models + graph.merges:
            stages[f"eval-{name}"] = {
                "cmd": f"python -m stages.evaluate {name}",
                "deps": code("evaluate") + [folder(name)] + data,
                "params": ["evaluate.suites"] + code_key("evaluate"),
                "metrics": [{str(metrics_file(name, params, split)): {"cache": False}}
                            for split in reversed(split_names(suites))],
            }
        for name in graph.merges:
            report = {kind: str(path) for kind, path in report_files(name, params).items()}
            stages[f"report-{name}"] = {
                "cmd": f"python -m stages.evaluate.report {name}",
                "deps": code("evaluate") + [metrics(m) for _, m in roles(name, params)],
                "params": ["evaluate.baseline"] + _recipes_read(name, params) + code_key("evaluate"),
                # scores.json is drawn by the top-level plot below: declared a plot here too, DVC drew it twice
                "outs": [{report[k]: {"cache": False}} for k in ("table", "scores", "scores_png", "retention_png")],
                "metrics": [{report["retention"]: {"cache": False}}],
            }
            # one bar per (task, model), grouped by task (labels sort as "suite/task: model (role)"): sorted
            # by value, bars of tasks and metrics of different scales would interleave; DVC colours by
            # revision only (`dvc plots diff`), so the merge is highlighted in scores.png
            plots.append({report["scores"]: {
                "title": f"{name}: merge vs parents and base, per task", "template": "bar_horizontal",
                "x": "score", "y": "label", "x_label": "score (each task's metric)", "y_label": "task: model (role)"}})
        tasks = [f"{suite}/{task}" for suite, body in sorted(params["evaluate"]["suites"].items())
                 for task in sorted(body["tasks"])]
        for name, sweep in params["sweeps"].items():
            files = sweep_files(name, params)
            curve = str(files["curve"])
            stages[f"sweep-{name}"] = {
                "cmd": f"python -m stages.evaluate.sweep {name}",
                "deps": code("evaluate") + [metrics(m) for m in sweep["recipes"]],
                "params": [f"sweeps.{name}"] + code_key("evaluate"),
                "outs": [{str(files[k]): {"cache": False}} for k in ("table", "curve", "curve_png")],  # plotted below
            }
            plots.append({curve: {"title": f"{name}: score against {sweep['key']}", "template": "simple", "x": "value",
                                  "y": tasks, "x_label": sweep["key"], "y_label": "score (each task's metric)"}})
    for target, spec in params["publish"].items():
        model = spec["model"]
        stages[f"publish-{target}"] = {
            "cmd": f"python -m stages.publish {target}",
            "deps": (code("publish") + _found_recipe(model, params)
                     + [folder(m) for m in [model] + parents(model, params)]  # digests on the card
                     + [folder(m) for m in _unlicensed(model, params)] + [metrics(m) for _, m in roles(model, params)]
                     + [str(path) for path in card_images(model, params).values()]),  # the card's pictures
            "params": (["evaluate.baseline", f"publish.{target}"] + _card_params(model, params, target)
                       + code_key("publish")),
            "outs": [{str(publish_dir(target, params)): {"cache": False}}],
        }
    for name, spec in params["exports"].items():
        stages[f"export-{name}"] = {
            "cmd": f"python -m stages.export {name}",
            "deps": code("export") + [folder(m) for m in (spec["model"], spec.get("base")) if m],
            "params": [f"exports.{name}"] + code_key("export"), "outs": [str(export_dir(name, params))]}
    if graph.models or graph.merges:
        stages["lineage"] = _lineage_stage(graph, params, root, code("lineage"), code_key("lineage"))
    stages = {name: {k: v for k, v in stage.items() if v != []} for name, stage in stages.items()}  # no `params: []`
    return yaml.safe_dump({"stages": stages} | ({"plots": plots} if plots else {}), sort_keys=False, width=120)


def _lineage_stage(graph: Graph, params: dict, root: Path, code: list[str], code_key: list[str]) -> dict:
    """The last stage, run by every `dvc repro`: records in MLflow whatever current build the store
    lacks (a teammate's clone after `dvc pull`, a fresh store), from all that the builds made."""
    suites = params["evaluate"]["suites"]
    built = graph.models + graph.merges
    files = ([_dep_path(str(model_dir(m, params)), root) for m in built]
             + [str(metrics_file(m, params, split)) for m in built if suites for split in split_names(suites)]
             + _suite_data(suites, root)
             + [f for m in graph.merges for f in _found_recipe(m, params)]
             + [str(publish_dir(target, params)) for target in params["publish"]]
             + [str(export_dir(name, params)) for name in params["exports"]])
    return {"cmd": "python -m stages.lineage --sync", "always_changed": True,
            "deps": code + files, "params": ["models", "merges", "evaluate.suites", "publish", "exports"] + code_key}


def _suite_data(suites: dict, root: Path) -> list[str]:
    """Every data file of every suite, both splits: what evaluations read, and records digest."""
    return sorted({_dep_path(path, root) for suite in suites.values() for path in data_files(suite)})


def _found_recipe(name: str, params: dict) -> list[str]:
    """Where a search found a merge's recipe: the recipe and best trial its search wrote (the merge
    is built from the one and its record names the other; the card shows both)."""
    files = search_files(name, params)
    return [str(files["recipe"]), str(files["best"])] if name in params["searches"] else []


def _recipes_read(name: str, params: dict) -> list[str]:
    """The recipes that decide a merge's base (base_of looks through merge parents)."""
    return [f"merges.{m}" for m in [name] + ancestors(name, params) if m in params["merges"]]


def _unlicensed(name: str, params: dict) -> list[str]:
    """Source models a card reads its license from (their README.md): those without `license:`."""
    return [m for m in ancestors(name, params) if m in params["models"] and not params["models"][m].get("license")
            and m not in parents(name, params)]


def _card_params(name: str, params: dict, target: str) -> list[str]:
    """What a card reads besides its own target: every recipe it is made from, the source models'
    licenses and hub ids, and the publish targets that give a parent merge its hub id."""
    made_of = ancestors(name, params)
    return (_recipes_read(name, params) + [f"models.{m}" for m in made_of if m in params["models"]]
            + [f"publish.{t}" for t, spec in params["publish"].items() if t != target and spec["model"] in made_of])


def code_is_inside(root: Path) -> bool:
    """Whether the project at root holds the code it runs (this repository) or runs an installed
    mergeforge (a project made by `mergeforge new`)."""
    return (root.resolve() / "stages").resolve() == CODE / "stages"


def code_digests(packages: list[str], base: Path = CODE) -> dict[str, str]:
    """{stage package: sha256 over the paths and sums of the .py files of its code_deps}. A project
    whose code is installed elsewhere declares these params.yaml values instead of the folders:
    dvc.yaml then names no path outside the project and stays the same on every teammate's machine,
    and an upgrade that changes a stage's code still reruns it."""
    digests = {}
    for package in packages:
        h = hashlib.sha256()
        for dep in code_deps(package):
            for f in [base / dep] if dep.endswith(".py") else sorted((base / dep).rglob("*.py")):
                h.update(f.relative_to(base).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        digests[package] = h.hexdigest()
    return digests


def _dep_path(path: str, root: Path) -> str:
    """A local source as DVC should see it: relative to the project when inside it."""
    p = Path(path)
    if p.is_absolute():
        try:
            return str(p.relative_to(root.resolve()))
        except ValueError:
            return str(p)
    return path
