"""A suite's tasks as params.yaml holds them, by split: each task is {validation?, test} (a file
per split) or {file} (one file that the suite's `split` cuts in two, see
stages/evaluate/suites.py). Searches read validation only; everything that reports reads test."""
from __future__ import annotations

SPLIT_NAMES = ("validation", "test")


def data_files(suite: dict, split: str | None = None) -> list[str]:
    """The files a resolved suite reads: for one split (a one-file task's whole file), or all."""
    return sorted({path for data in suite["tasks"].values() for key, path in data.items()
                   if split is None or key in (split, "file")})


def has_split(suite: dict, task: str, split: str) -> bool:
    data = suite["tasks"][task]
    return "file" in data or split in data


def split_names(suites: dict) -> list[str]:
    """The splits some task of the suites has, in SPLIT_NAMES order (test always)."""
    return [s for s in SPLIT_NAMES if s == "test" or any(has_split(suite, t, s) for suite in suites.values()
                                                         for t in suite["tasks"])]
