"""conf/searches checked and written out for params.yaml: each search becomes a `searches.NAME`
entry (what its stage reads, its objective's validation data included) and a merge NAME built from
the recipe the search finds."""
from __future__ import annotations

from pathlib import Path

from mergekit_ops import METHODS, RecipeError, is_device_name, parse_recipe

from ..common.errors import ConfigError
from ..common.metrics import HIGHER_IS_BETTER
from ..common.recipes import mergekit_body
from ..common.splits import has_split
from ..search.space import parse_space

SAMPLERS = ("tpe", "cmaes", "gp", "random", "grid")
AGGREGATES = ("mean", "min", "max")


def check_search(name: str, body: dict, conf_dir: Path, suites: dict, known: set[str]) -> list[str]:
    """Everything a search file can get wrong; returns the models and recipes it reads."""
    where = str(conf_dir / "searches" / f"{name}.yaml")
    space = parse_space(body["recipe"], body.get("constraints"), where)
    if body["sampler"] not in SAMPLERS:
        raise ConfigError(f"{where}: key 'sampler': one of {', '.join(SAMPLERS)}, got {body['sampler']!r}")
    if body["sampler"] == "cmaes" and any(d.choices is not None for d in space.dims):
        raise ConfigError(f"{where}: key 'sampler': cmaes cannot choose among values ({{choice: ...}}); "
                          "use tpe or gp")
    if body["sampler"] == "grid":
        loose = [d.name for d in space.dims if d.grid() is None]
        if loose:
            raise ConfigError(f"{where}: key 'sampler': a grid needs a step for every range; '{loose[0]}' has none")
    budget = body["budget"]
    if not budget.get("trials") and not budget.get("minutes"):
        raise ConfigError(f"{where}: key 'budget': give trials, minutes or both (e.g. {{trials: 60}})")
    if (budget.get("trials") or 1) < 1 or (budget.get("minutes") or 1) <= 0:
        raise ConfigError(f"{where}: key 'budget': a positive number of trials and/or minutes")
    pruner = body.get("pruner")
    if pruner and not (0 < pruner["fraction"] < 1 and 0 < pruner["percentile"] < 100 and pruner["startup"] >= 0):
        raise ConfigError(f"{where}: key 'pruner': fraction between 0 and 1, percentile between 0 and 100, "
                          "startup at least 0")
    if not is_device_name(body["device"]):
        raise ConfigError(f"{where}: key 'device': 'cpu' or 'cuda' (or 'cuda:N'), got {body['device']!r}")
    _check_objective(body["objective"], suites, where, conf_dir)
    if any("model" in d.path or "base_model" in d.path for d in space.dims):
        raise ConfigError(f"{where}: key 'recipe': the models a search merges are fixed; search their parameters")
    fixed = space.recipe({d.name: d.choices[0] if d.choices else d.low for d in space.dims})
    methods = {c for d in space.dims if d.path == ("merge_method",) for c in d.choices} or {fixed["merge_method"]}
    unknown = sorted(m for m in methods if m not in METHODS)
    if unknown:
        raise ConfigError(f"{where}: key 'recipe.merge_method': no method '{unknown[0]}' "
                          f"(methods: {', '.join(sorted(METHODS))})")
    for method in sorted(methods):
        try:
            recipe = parse_recipe(mergekit_body(fixed | {"merge_method": method}), where)
        except RecipeError as exc:
            raise ConfigError(str(exc).replace(f"{where}: key '", f"{where}: key 'recipe.", 1)) from None
    refs = recipe.model_refs()
    missing = [r for r in refs if r not in known]
    if missing:
        raise ConfigError(f"{where}: model '{missing[0]}' is neither in conf/models nor conf/merges")
    return refs


def _check_objective(objective: dict, suites: dict, where: str, conf_dir: Path) -> None:
    suite = suites.get(objective["suite"])
    if suite is None:
        raise ConfigError(f"{where}: key 'objective.suite': no suite conf/eval/{objective['suite']}.yaml")
    if objective["aggregate"] not in AGGREGATES:
        raise ConfigError(f"{where}: key 'objective.aggregate': one of {', '.join(AGGREGATES)}, "
                          f"got {objective['aggregate']!r}")
    unknown = sorted(set(objective["weights"]) - set(suite["tasks"]))
    if unknown:
        raise ConfigError(f"{where}: key 'objective.weights.{unknown[0]}': no task '{unknown[0]}' in "
                          f"conf/eval/{objective['suite']}.yaml")
    weighed = objective["weights"] or {}
    blind = [t for t in suite["tasks"] if weighed.get(t, 1) and not has_split(suite, t, "validation")]
    if blind:
        raise ConfigError(f"{conf_dir / 'eval' / (objective['suite'] + '.yaml')}: key 'tasks.{blind[0]}': a search "
                          f"({where}) tunes on a validation split, and this task has none: give "
                          "{validation: FILE, test: FILE}, or one file and the suite's `split`")


def resolved_search(name: str, body: dict, suite: dict, inputs: dict[str, str]) -> dict:
    """searches.NAME of params.yaml: the search, with its objective's suite cut to the validation split."""
    objective = body["objective"]
    tasks = {t: {k: v for k, v in data.items() if k != "test"} for t, data in suite["tasks"].items()
             if has_split(suite, t, "validation") and (not objective["weights"] or objective["weights"].get(t, 1))}
    spec = {"recipe": mergekit_body(body["recipe"])}
    if body.get("constraints"):
        spec["constraints"] = body["constraints"]
    spec["objective"] = {"suite": objective["suite"], "aggregate": objective["aggregate"]}
    if objective["weights"]:
        spec["objective"]["weights"] = dict(sorted(objective["weights"].items()))
    spec["objective"]["data"] = {k: v for k, v in suite.items() if k != "tasks"} | {"tasks": tasks}
    spec["objective"]["minimize"] = not HIGHER_IS_BETTER[suite["kind"]]
    spec["budget"] = {k: v for k, v in body["budget"].items() if v is not None}
    spec |= {k: body[k] for k in ("sampler", "seed", "pruner", "device", "in_memory", "storage")
             if body.get(k) is not None}
    spec["inputs"] = inputs
    return spec
