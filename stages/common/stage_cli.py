"""The shared entry point of per-item stages: `python -m stages.X NAME` acts on one item of
params.yaml and reports failures as one line naming what is at fault (exit 2), never a traceback."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import yaml


def run_stage(argv: list[str] | None, prog: str, what: str, exists: Callable[[dict, str], bool],
              action: Callable[[str, dict], str], errors: tuple[type[Exception], ...]) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(f"usage: python -m {prog} NAME\n\nRun by `dvc repro` (see dvc.yaml); by hand, from the project's root.\n"
              f"  NAME  the {what} to act on, by its name in params.yaml (composed from conf/)")
        return 0
    if len(args) != 1:
        print(f"usage: python -m {prog} NAME", file=sys.stderr)
        return 2
    params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").is_file() else None
    if not params or not exists(params, args[0]):
        print(f"error: no {what} '{args[0]}' in params.yaml (run `dvc repro`, which composes conf/ first)",
              file=sys.stderr)
        return 2
    try:
        print(action(args[0], params), file=sys.stderr)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions...: the message names the file
        print(f"error: {what} '{args[0]}': {exc}", file=sys.stderr)
        return 2
    return 0


def in_section(section: str, accept: Callable[[dict], bool] = lambda spec: True) -> Callable[[dict, str], bool]:
    """`exists` for items of one params.yaml section."""
    return lambda params, name: name in (params.get(section) or {}) and accept(params[section][name])


def is_model(params: dict, name: str) -> bool:
    """`exists` for any model or merge."""
    return name in (params.get("models") or {}) or name in (params.get("merges") or {})
