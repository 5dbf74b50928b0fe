"""Sweeps: a recipe built once per value of one coefficient, and the metric curve against it.

A recipe file with `sweep: {key: parameters.lambda, values: [0.5, 1.0, 1.5]}` becomes the recipes
NAME-1, NAME-2, ... (each built, evaluated and reported like any other; other recipes may use
them), and the stage sweep-NAME writes artifacts/reports/NAME/sweep.json: one row per value with
every task's score (DVC plots draws one line per task) and sweep.md, the same as a table.
`key` is a dotted path into the recipe; list items by index (models.0.parameters.weight).

    python -m stages.sweep NAME
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from .atomic import write_json, write_text
from .cli import in_section, run_stage
from .errors import ConfigError, EvalError
from .metrics import load_metrics


def variant_names(name: str, count: int) -> list[str]:
    return [f"{name}-{i + 1}" for i in range(count)]


def set_key(body: dict, key: str, value, where: str) -> dict:
    """A copy of the recipe body with the dotted `key` set to value (the last step may be new)."""
    body = copy.deepcopy(body)
    node, steps = body, key.split(".")
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if isinstance(node, list):
            if not step.isdigit() or int(step) >= len(node):
                raise ConfigError(f"{where}: key 'sweep.key': '{'.'.join(steps[:i + 1])}' is not an item of a "
                                  f"{len(node)}-item list")
            step = int(step)
        elif not isinstance(node, dict) or (not last and step not in node):
            raise ConfigError(f"{where}: key 'sweep.key': the recipe has no '{'.'.join(steps[:i + 1])}'")
        if last:
            node[step] = value
        else:
            node = node[step]
    return body


def expand(merges: dict[str, dict], conf_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(recipes with every swept one replaced by its variants, {swept name: its sweep})."""
    out, sweeps = {}, {}
    for name, body in merges.items():
        sweep = body.get("sweep")
        if not sweep:
            out[name] = body
            continue
        where = str(conf_dir / "merges" / f"{name}.yaml")
        if not sweep.get("key") or not sweep.get("values"):
            raise ConfigError(f"{where}: key 'sweep': needs 'key' (a dotted path) and a list of 'values'")
        plain = {k: v for k, v in body.items() if k != "sweep"}
        names = variant_names(name, len(sweep["values"]))
        for variant, value in zip(names, sweep["values"]):
            if variant in merges:
                raise ConfigError(f"{where}: sweep variant '{variant}' clashes with conf/merges/{variant}.yaml")
            out[variant] = set_key(plain, sweep["key"], value, where)
        sweeps[name] = {"key": sweep["key"], "values": list(sweep["values"]), "recipes": names}
    return out, sweeps


def curve(name: str, params: dict) -> Path:
    sweep = params["sweeps"][name]
    rows = []
    for variant, value in zip(sweep["recipes"], sweep["values"]):
        row = {"value": value, "recipe": variant}
        for suite, by_kind in sorted(load_metrics(variant, params).items()):
            for kind, scores in by_kind.items():
                row.update({f"{suite}/{task}": score for task, score in sorted(scores.items())})
        rows.append(row)
    out = Path(params["artifacts"]) / "reports" / name
    write_json(out / "sweep.json", {"sweep": rows})
    tasks = [k for k in rows[0] if k not in ("value", "recipe")]
    table = [f"# {name}: {sweep['key']} swept", "", "| " + " | ".join([sweep["key"], "recipe"] + tasks) + " |",
             "|" + "---|" * (len(tasks) + 2)]
    table += ["| " + " | ".join([str(r["value"]), r["recipe"]] + [f"{r[t]:.4g}" for t in tasks]) + " |" for r in rows]
    write_text(out / "sweep.md", "\n".join(table) + "\n")
    return out / "sweep.json"


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.sweep", "sweep", in_section("sweeps"),
                     lambda name, params: f"sweep {name}: {curve(name, params)}", (EvalError,))


if __name__ == "__main__":
    sys.exit(main())
