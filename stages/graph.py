"""The build graph: which merge reads which model or merge, and its rendering as dvc.yaml.

Hub models get a fetch stage; local models are read where they are, as a dependency DVC hashes.

Every stage is written out with its own deps (DVC's foreach cannot give a stage a variable-length
deps list), so a merge of merges is an ordinary edge from the parent's output directory.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import yaml
from omegaconf import DictConfig

from .built import base_of
from .errors import ConfigError


def code_deps(module: str) -> list[str]:
    """The files a stage's code is made of: stages/<module>.py and every project module it imports,
    transitively, read from its import statements (lazy ones included), so a stage reruns when
    any code it runs changes and no hand-kept list goes stale. The engine counts as one directory."""
    return list(_code_deps(module))


@lru_cache(maxsize=None)
def _code_deps(module: str) -> tuple[str, ...]:
    """code_deps, parsed once per module (every merge and evaluation stage asks for the same)."""
    here = Path(__file__).parent
    deps, seen, todo = set(), set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or not (here / f"{name}.py").is_file():
            continue
        seen.add(name)
        deps.add(f"stages/{name}.py")
        for node in ast.walk(ast.parse((here / f"{name}.py").read_text(), filename=f"stages/{name}.py")):
            if isinstance(node, ast.Import):
                imported = [alias.name.split(".") for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = ["stages"] * bool(node.level) + [p for p in (node.module or "").split(".") if p]
                # `from . import a, b` (or `from stages import a`) imports modules a and b
                imported = [parts + [alias.name] for alias in node.names] if len(parts) == 1 else [parts]
            else:
                continue
            for parts in imported:
                if parts[0] == "mergekit_ops":
                    deps.add("mergekit_ops")
                elif parts[0] == "stages" and len(parts) > 1:
                    todo.append(parts[1])
    return tuple(sorted(deps))


class Graph:
    """Source models and merges; `inputs[merge]` lists what the merge reads, by name; `recipes`
    and `sweeps` are the recipe bodies and sweeps of conf/merges, sweeps expanded once."""

    def __init__(self, sources: dict[str, dict], inputs: dict[str, list[str]],
                 recipes: dict[str, dict] | None = None, sweeps: dict[str, dict] | None = None):
        self.sources, self.inputs = sources, inputs
        self.recipes, self.sweeps = recipes or {}, sweeps or {}
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
                      {m: self.recipes[m] for m in order if m in self.recipes}, self.sweeps)
        graph.merges = order
        return graph

    def artifact(self, ref: str, artifacts: str) -> str:
        """Where a model or merge is read from: a local source in place (DVC tracks the directory;
        a copy would be hashed a second time), a hub model from its fetch stage's output."""
        if ref not in self.sources:
            return f"{artifacts}/merges/{ref}"
        if self.sources[ref]["source"] == "local":
            return self.sources[ref]["path"]
        return f"{artifacts}/models/{ref}"


def render_dvc_yaml(graph: Graph, params: dict, cfg: DictConfig, conf_dir: Path, root: Path) -> str:
    """dvc.yaml for this graph: compose, the demo, one fetch per hub model, one merge per recipe;
    with suites in conf/eval, one evaluation per model and merge, one report per merge and one curve
    per sweep; one publish per target; and the reports' plots."""
    artifacts = cfg.paths.artifacts
    stages: dict[str, dict] = {"compose": {
        "cmd": "python -m stages.compose",
        "always_changed": True,
        "deps": code_deps("compose") + [str(conf_dir.relative_to(root))],  # the directory: files may come and go
        "outs": [{"params.yaml": {"cache": False, "persist": True}}],
    }}
    if cfg.demo.enabled:
        stages["demo"] = {"cmd": f"python -m stages.demo {cfg.demo.out}", "deps": code_deps("demo"),
                          "outs": [cfg.demo.out]}
    for name in graph.models:
        if graph.sources[name]["source"] == "hub":
            stages[f"fetch-{name}"] = {"cmd": f"python -m stages.fetch {name}", "deps": code_deps("fetch"),
                                       "params": [f"models.{name}"], "outs": [graph.artifact(name, artifacts)]}
    for name in graph.merges:
        stages[f"merge-{name}"] = {
            "cmd": f"python -m stages.merge {name}",
            "deps": code_deps("merge") + [_dep_path(graph.artifact(ref, artifacts), root) for ref in graph.inputs[name]],
            "params": [f"merges.{name}"],
            "outs": [graph.artifact(name, artifacts)],
        }
    plots = []
    if params["evaluate"]["suites"]:
        data = sorted({_dep_path(path, root) for suite in params["evaluate"]["suites"].values()
                       for path in suite["tasks"].values()})
        for name in graph.models + graph.merges:
            stages[f"eval-{name}"] = {
                "cmd": f"python -m stages.evaluate {name}",
                "deps": code_deps("evaluate") + [_dep_path(graph.artifact(name, artifacts), root)] + data,
                "params": ["evaluate.suites"],
                "metrics": [{f"{artifacts}/eval/{name}.json": {"cache": False}}],
            }
        for name in graph.merges:
            base = base_of(name, params)
            compared = [name] + graph.inputs[name] + ([base] if base and base not in graph.inputs[name] else [])
            report = f"{artifacts}/reports/{name}"
            stages[f"report-{name}"] = {
                "cmd": f"python -m stages.report {name}",
                "deps": code_deps("report") + [f"{artifacts}/eval/{m}.json" for m in compared],
                "params": ["evaluate.baseline"],
                "outs": [{f"{report}/report.md": {"cache": False}}],
                "metrics": [{f"{report}/retention.json": {"cache": False}}],
                "plots": [{f"{report}/scores.json": {"cache": False}}],
            }
            plots.append({f"{report}/scores.json": {"title": f"{name}: merge vs parents and base", "template":
                          "bar_horizontal", "x": "score", "y": "label"}})
        tasks = [f"{suite}/{task}" for suite, body in sorted(params["evaluate"]["suites"].items())
                 for task in sorted(body["tasks"])]
        for name, sweep in params["sweeps"].items():
            curve = f"{artifacts}/reports/{name}/sweep.json"
            stages[f"sweep-{name}"] = {
                "cmd": f"python -m stages.sweep {name}",
                "deps": code_deps("sweep") + [f"{artifacts}/eval/{m}.json" for m in sweep["recipes"]],
                "params": [f"sweeps.{name}"],
                "outs": [{f"{artifacts}/reports/{name}/sweep.md": {"cache": False}}],
                "plots": [{curve: {"cache": False}}],
            }
            plots.append({curve: {"title": f"{name}: score against {sweep['key']}", "template": "linear",
                                  "x": "value", "y": tasks}})
    for target, spec in params["publish"].items():
        model = spec["model"]
        stages[f"publish-{target}"] = {
            "cmd": f"python -m stages.publish {target}",
            "deps": code_deps("publish") + [graph.artifact(model, artifacts), f"{artifacts}/eval/{model}.json",
                                    f"{artifacts}/reports/{model}/retention.json"],
            "params": [f"publish.{target}", f"merges.{model}"],
            "outs": [{f"{artifacts}/publish/{target}": {"cache": False}}],
        }
    return yaml.safe_dump({"stages": stages} | ({"plots": plots} if plots else {}), sort_keys=False, width=120)


def _dep_path(path: str, root: Path) -> str:
    """A local source as DVC should see it: relative to the project when inside it."""
    p = Path(path)
    if p.is_absolute():
        try:
            return str(p.relative_to(root.resolve()))
        except ValueError:
            return str(p)
    return path
