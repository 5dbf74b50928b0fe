"""Atomic file writes: a reader (or an interrupted stage) never sees half a file."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def fresh_temp(out: Path) -> Path:
    """The temporary sibling a stage builds the directory `out` in. One that is already there was
    left by an interrupted run (stages of one project never run twice at once): removed, and said."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    else:
        return tmp
    print(f"removed {tmp}, left by an interrupted run", file=sys.stderr)
    return tmp
