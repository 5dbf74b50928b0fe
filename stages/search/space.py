"""A search's space: the numbers of a mergekit recipe that a study chooses, and the recipe each
choice makes.

In the recipe of conf/searches/NAME.yaml any value may be a dimension:
  {search: [LOW, HIGH]}             a float (options: log: true, step: S)
  {search: [LOW, HIGH], groups: G}  a gradient: G anchors over the layers, each a dimension
                                    (mergekit interpolates a list of values across the layers)
  {choice: [A, B, ...]}             one of the values (e.g. merge_method: {choice: [ties, dare_ties]})
A dimension is named by where it is: `add.weight` for model add's weight, `lambda` for a recipe
parameter, `merge_method`, `add.weight.0`... for a gradient's anchors; other places by their
dotted key. `constraints: [{sum: [add.weight, rev.weight], equals: 1}]` rescales the chosen values
of those dimensions to that sum.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from ..common.errors import ConfigError


@dataclass
class Dimension:
    name: str
    path: tuple  # where the value goes in the recipe, e.g. ("models", 0, "parameters", "weight")
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    anchor: int | None = None  # a gradient's anchor: the index in the list at `path`
    groups: int | None = None  # a gradient's length

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        if self.choices is not None:
            return CategoricalDistribution(self.choices)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list | None:
        """The values a grid search tries: the choices, or the steps of the range; None if continuous."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            return None
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


@dataclass
class Space:
    template: dict
    dims: list[Dimension]
    constraints: list[tuple[list[str], float]]

    def distributions(self) -> dict:
        return {d.name: d.distribution() for d in self.dims}

    def recipe(self, values: dict) -> dict:
        """The template with the chosen values in place, constraints applied."""
        values = dict(values)
        for names, total in self.constraints:
            got = [float(values[n]) for n in names]
            scale = sum(got)
            for n, v in zip(names, got):
                values[n] = total * v / scale if scale else total / len(names)
        body = copy.deepcopy(self.template)
        for d in self.dims:
            parent = _walk(body, d.path[:-1])
            if d.anchor is None:
                parent[d.path[-1]] = values[d.name]
            else:
                if not isinstance(parent[d.path[-1]], list):
                    parent[d.path[-1]] = [None] * d.groups
                parent[d.path[-1]][d.anchor] = values[d.name]
        return body

    def chosen(self, values: dict) -> dict:
        """{dimension: the value the recipe got} (after constraints)."""
        body = self.recipe(values)
        return {d.name: (_walk(body, d.path) if d.anchor is None else _walk(body, d.path)[d.anchor])
                for d in self.dims}


def _walk(node, path: tuple):
    for step in path:
        node = node[step]
    return node


def parse_space(recipe: dict, constraints: list | None, where: str) -> Space:
    """The dimensions of a recipe template; ConfigError naming `where` (file) and the key."""
    dims: list[Dimension] = []

    def key_of(path: tuple) -> str:
        return "recipe" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)

    def name_of(path: tuple) -> str:
        if len(path) == 4 and path[0] == "models" and path[2] == "parameters":
            model = recipe["models"][path[1]]
            return f"{model.get('model') if isinstance(model, dict) else path[1]}.{path[3]}"
        if len(path) == 2 and path[0] == "parameters":
            return path[1]
        return ".".join(str(p) for p in path)

    def visit(node, path: tuple) -> None:
        if isinstance(node, dict) and ("search" in node or "choice" in node):
            dims.extend(_dimensions(node, path, name_of(path), where, key_of(path)))
        elif isinstance(node, dict):
            for k, v in node.items():
                visit(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, path + (i,))

    visit(recipe, ())
    if not dims:
        raise ConfigError(f"{where}: key 'recipe': no value to search; make one {{search: [LOW, HIGH]}} "
                          "or {choice: [A, B]}")
    names = [d.name for d in dims]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: key 'recipe': two dimensions are named '{twice[0]}' (a model listed twice?)")
    rules = []
    for i, rule in enumerate(constraints or []):
        key = f"{where}: key 'constraints[{i}]'"
        if not isinstance(rule, dict) or set(rule) - {"sum", "equals"} or not isinstance(rule.get("sum"), list):
            raise ConfigError(f"{key}: {{sum: [DIMENSION, ...], equals: NUMBER}}")
        unknown = [n for n in rule["sum"] if n not in names]
        if unknown:
            raise ConfigError(f"{key}: no dimension '{unknown[0]}' (dimensions: {', '.join(names)})")
        ranged = {d.name: d for d in dims}
        if any(ranged[n].choices is not None or ranged[n].low < 0 for n in rule["sum"]):
            raise ConfigError(f"{key}: a sum is of ranges of numbers that are not negative")
        rules.append((list(rule["sum"]), float(rule.get("equals", 1.0))))
    return Space(_template(recipe), dims, rules)


def _dimensions(node: dict, path: tuple, name: str, where: str, at: str) -> list[Dimension]:
    def key(sub: str = "") -> str:
        return f"{where}: key '{at}{sub}'"

    if "choice" in node:
        if set(node) != {"choice"} or not isinstance(node["choice"], list) or len(node["choice"]) < 2:
            raise ConfigError(f"{key()}: {{choice: [A, B, ...]}}: at least two values and no other key")
        if not all(isinstance(c, (str, int, float, bool)) for c in node["choice"]):
            raise ConfigError(f"{key()}: choices are text, numbers or true/false")
        return [Dimension(name, path, choices=list(node["choice"]))]
    extra = sorted(set(node) - {"search", "log", "step", "groups"})
    if extra:
        raise ConfigError(f"{key()}: no option '{extra[0]}' (search, log, step, groups)")
    bounds = node["search"]
    if (not isinstance(bounds, list) or len(bounds) != 2 or not all(_number(b) for b in bounds)
            or not bounds[0] < bounds[1]):
        raise ConfigError(f"{key('.search')}: [LOW, HIGH], two numbers with LOW < HIGH; got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    log, step, groups = node.get("log", False), node.get("step"), node.get("groups")
    if not isinstance(log, bool):
        raise ConfigError(f"{key('.log')}: true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{key('.log')}: a log scale needs LOW > 0, got {low}")
    if step is not None and (not _number(step) or step <= 0 or log
                             or not math.isclose((high - low) / step, round((high - low) / step))):
        raise ConfigError(f"{key('.step')}: a positive number that divides HIGH - LOW (and no log scale); got {step!r}")
    if groups is not None and (not isinstance(groups, int) or isinstance(groups, bool) or groups < 2):
        raise ConfigError(f"{key('.groups')}: a whole number of layer groups, at least 2; got {groups!r}")
    one = dict(low=low, high=high, log=log, step=float(step) if step is not None else None)
    if groups is None:
        return [Dimension(name, path, **one)]
    return [Dimension(f"{name}.{i}", path, **one, anchor=i, groups=groups) for i in range(groups)]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _template(recipe: dict):
    """The recipe with every dimension's spec replaced by None (filled per trial)."""
    if isinstance(recipe, dict):
        if "search" in recipe or "choice" in recipe:
            return None
        return {k: _template(v) for k, v in recipe.items()}
    if isinstance(recipe, list):
        return [_template(v) for v in recipe]
    return recipe


def dimension_names(search: dict) -> list[str]:
    """The dimensions of a search as params.yaml holds it (searches.NAME)."""
    return [d.name for d in parse_space(search["recipe"], search.get("constraints"), "params.yaml").dims]
