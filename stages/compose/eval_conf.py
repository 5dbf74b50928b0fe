"""A suite of conf/eval checked and written out for params.yaml, its tasks' data split in two.

Searches tune on a task's validation split; reports, gates and cards use its test split, which no
search reads. A task names its two files, `{validation: FILE, test: FILE}`, or one FILE: split by
the suite's `split` (a seeded share of its items), else a test split only.
"""
from __future__ import annotations

from pathlib import Path

from ..common.errors import ConfigError
from ..common.metrics import HIGHER_IS_BETTER
from ..common.splits import SPLIT_NAMES

KIND_KEYS = {"perplexity": ("max_length",), "exact_match": ("max_new_tokens",), "lm_eval": ("metric",)}


def check_suite(name: str, suite: dict, conf_dir: Path) -> None:
    where = conf_dir / "eval" / f"{name}.yaml"
    if suite["kind"] not in HIGHER_IS_BETTER:
        raise ConfigError(f"{where}: key 'kind': one of {', '.join(HIGHER_IS_BETTER)}, got {suite['kind']!r}")
    if not suite["tasks"]:
        raise ConfigError(f"{where}: key 'tasks': name at least one task and its data file")
    split = suite.get("split")
    if split and not 0 < split["validation"] < 1:
        raise ConfigError(f"{where}: key 'split.validation': a share between 0 and 1, got {split['validation']!r}")
    for task, data in suite["tasks"].items():
        key = f"{where}: key 'tasks.{task}'"
        if isinstance(data, dict):
            extra = sorted(set(data) - set(SPLIT_NAMES))
            if extra or not isinstance(data.get("test"), str) or not isinstance(data.get("validation", ""), str):
                raise ConfigError(f"{key}: a data file, or {{validation: FILE, test: FILE}}"
                                  + (f" (no key '{extra[0]}')" if extra else ""))
        elif not isinstance(data, str):
            raise ConfigError(f"{key}: a data file, or {{validation: FILE, test: FILE}}; got {data!r}")
        elif split and suite["kind"] == "lm_eval":
            raise ConfigError(f"{key}: an lm-eval task YAML cannot be split by 'split': name a task YAML "
                              "per split, {validation: FILE, test: FILE}")


def resolved_suite(suite: dict) -> dict:
    """The suite as params.yaml holds it: every task a mapping, {file} (split by `split`) or
    {validation?, test}; only the keys its kind reads."""
    split = suite.get("split")
    tasks = {}
    for task, data in sorted(suite["tasks"].items()):
        if isinstance(data, dict):
            tasks[task] = {k: data[k] for k in SPLIT_NAMES if data.get(k)}
        else:
            tasks[task] = {"file": data} if split else {"test": data}
    keys = ("kind", "limit", "batch_size") + KIND_KEYS.get(suite["kind"], ())
    out = {k: suite[k] for k in keys if suite.get(k) is not None} | {"tasks": tasks}
    if split and any("file" in t for t in tasks.values()):
        out["split"] = dict(split)
    return out
