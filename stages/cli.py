"""The shared entry point of per-item stages: `python -m stages.X NAME` builds params.yaml's
SECTION.NAME and reports failures as one line naming what is at fault (exit 2), never a traceback."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import yaml


def run_stage(argv: list[str] | None, prog: str, section: str, what: str, action: Callable[[str, dict], str],
              errors: tuple[type[Exception], ...], accept: Callable[[dict], bool] = lambda spec: True) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {prog} NAME", file=sys.stderr)
        return 2
    params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").is_file() else None
    spec = ((params or {}).get(section) or {}).get(args[0])
    if spec is None or not accept(spec):
        print(f"error: no {what} '{args[0]}' in params.yaml (run `dvc repro`, which composes conf/ first)",
              file=sys.stderr)
        return 2
    try:
        print(action(args[0], params), file=sys.stderr)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions...: the message names the file
        print(f"error: {section} '{args[0]}': {exc}", file=sys.stderr)
        return 2
    return 0
