"""Sweeps: a recipe built once per value of one coefficient (the curve is drawn by stages.evaluate.sweep).

A recipe file with `sweep: {key: parameters.lambda, values: [0.5, 1.0, 1.5]}` becomes the recipes
NAME-1, NAME-2, ... (each built, evaluated and reported like any other; other recipes may use
them). `key` is a dotted path into the recipe; list items by index (models.0.parameters.weight).
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..common.errors import ConfigError


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
