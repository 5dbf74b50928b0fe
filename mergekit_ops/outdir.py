"""Where a merge may write, how it swaps its output in, and what it does with a crashed run's leftovers.

A merge replaces OUT_DIR whole, so OUT_DIR must never be, hold or lie inside anything the merge
reads, and must not be or hold the recipe's folder or the working directory. An existing OUT_DIR
must be an empty directory or an earlier output: every output carries MARKER, and a directory
without it is never replaced. The output is built in a temporary sibling (.NAME.tmp-PID) and
renamed into place; a process killed meanwhile leaves that sibling (or .NAME.old-PID, the output
it was replacing, or .NAME.intermediates-PID), and the next merge into the same place removes
the ones whose process is gone, restoring a previous output that was moved aside.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from .errors import MergeError

T = TypeVar("T")

MARKER = ".mergekit_ops"
MARKER_TEXT = "Written by mergekit_ops: a later merge into this directory may replace it whole.\n"
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|intermediates)-(?P<pid>\d+)")
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger("mergekit_ops")


def check_out_dir(out_dir: Path, inputs: dict[str, Path], places: dict[str, Path]) -> None:
    """Refuse an OUT_DIR whose replacement would destroy something, before any work. inputs:
    what the merge reads (OUT_DIR may lie neither in nor around them); places: folders OUT_DIR
    may lie in but not be or hold (the recipe's folder, the working directory). Keys say what each
    path is, for the message."""
    out = out_dir.resolve()
    for what, path in {**inputs, **places}.items():
        real = path.resolve()
        if out == real or real.is_relative_to(out):
            raise MergeError(f"output directory {out_dir} {'is' if out == real else 'holds'} {what} ({path}): "
                             "the merge replaces its output directory whole; choose another one")
        if what in inputs and out.is_relative_to(real):
            raise MergeError(f"output directory {out_dir} lies inside {what} ({path}); choose one outside it")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise MergeError(f"output directory {out_dir} exists and is not a directory; choose another one")
    if out_dir.is_dir() and not (out_dir / MARKER).is_file() and any(out_dir.iterdir()):
        raise MergeError(f"output directory {out_dir} is not empty and holds no earlier merge output (no "
                         f"{MARKER} file in it); merges only replace their own outputs: choose another one or empty it")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise MergeError(f"output directory {out_dir}: {parent} is not a directory")


def temp_dir(out_dir: Path, kind: str = "tmp") -> Path:
    """This process's temporary sibling of out_dir (see LEFTOVER)."""
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}"


def mark(directory: Path) -> None:
    (directory / MARKER).write_text(MARKER_TEXT)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap the finished temp dir in; an old output is moved aside first, then removed (a crash
    between the two renames leaves it as .NAME.old-PID, which clean_leftovers restores)."""
    old = None
    if out_dir.exists():
        old = temp_dir(out_dir, "old")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def build_in_place(out_dir: Path, tmp: Path, writer, needed: int, fill: Callable[[], T]) -> T:
    """Make tmp beside out_dir (room for `needed` bytes checked first), let fill() write into it
    (the weights through `writer`, a ShardWriter for tmp), then swap it in: out_dir is the old output
    or the whole new one, never a part. On any failure the writer is aborted and tmp removed; an
    OSError becomes an error that names the file and the space needed."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        free = check_space(out_dir, needed)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise write_failure(exc, out_dir, needed, 0) from None
    try:
        result = fill()
        writer.close()
        mark(tmp)
        replace_dir(tmp, out_dir)
    except BaseException as exc:
        try:
            writer.abort()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failure(exc, out_dir, needed, free) from None
        raise
    return result


def clean_leftovers(out_dir: Path) -> None:
    """Remove the temporaries that dead processes left beside out_dir, and say so; an earlier
    output moved aside by a run that died before its new one was in place is put back first."""
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return
    found = [(m, p) for p in entries if (m := LEFTOVER.fullmatch(p.name)) and m["name"] == out_dir.name
             and not _alive(int(m["pid"]))]
    for m, path in sorted(found, key=lambda x: x[0]["kind"] != "old"):
        if m["kind"] == "old" and not out_dir.exists():
            os.replace(path, out_dir)
            log.warning("restored the earlier output %s from %s (process %s died while replacing it)",
                        out_dir, path.name, m["pid"])
            continue
        _remove(path)
        log.warning("removed %s, left by process %s, which is no longer running", path, m["pid"])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def check_space(out_dir: Path, needed: int) -> int:
    """Fail before any work when the output cannot fit on out_dir's filesystem; returns the bytes free."""
    stats = os.statvfs(out_dir.parent)
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        raise MergeError(f"not enough disk space for {out_dir}: the output needs {_size(needed)}, "
                         f"{out_dir.parent} has {_size(free)} free")
    return free


def write_failure(exc: OSError, out_dir: Path, needed: int, free: int) -> MergeError:
    """A write that failed as one line: a full disk says what the output needed."""
    if exc.errno in FULL_DISK:
        return MergeError(f"the disk filled up while writing {out_dir}: the output needs {_size(needed)}, "
                          f"{_size(free)} were free when the merge began (nothing was written; an earlier "
                          "output there is kept)")
    where = exc.filename or out_dir
    return MergeError(f"cannot write {where}: {exc.strerror or exc}")


def _size(n: int) -> str:
    """Bytes as people read them, with the exact count."""
    return f"{n / 10**9:.2f} GB ({n:,} bytes)" if n >= 10**8 else f"{n:,} bytes"
