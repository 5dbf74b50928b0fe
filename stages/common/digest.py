"""Content digests of artifact directories: what MLflow records and model cards show, so a
model's record is found again by what it holds, not by where it lies.

A directory's digest is sha256 over its files' relative paths, sizes and sha256 sums. File sums
are cached (like DVC's own hash cache) by path, size, mtime and inode in .mergeforge/digests.json
under the project, so multi-GB weights are read once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE = Path(".mergeforge") / "digests.json"
BLOCK = 1 << 22


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def artifact_files(directory: Path) -> list[str]:
    """What an artifact holds: its files' relative paths, sorted, hidden files and folders left out."""
    directory = Path(directory)
    return [p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)]


def remember(directory: Path, sums: dict[str, str], cache_file: Path = CACHE) -> None:
    """Put sha256 sums known from writing the files (relative path -> hex) in the cache, stamped
    with the files as they are now, so directory_digest does not read them again."""
    cache = _load(cache_file)
    for rel, sha in sums.items():
        path = Path(directory) / rel
        st = path.stat()
        cache[str(path.resolve())] = [st.st_size, st.st_mtime_ns, st.st_ino, sha]
    _save(cache_file, cache)


def directory_digest(directory: Path, cache_file: Path = CACHE) -> str:
    """'sha256:<hex>' of every file of the artifact (see artifact_files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model directory")
    files = artifact_files(directory)
    paths = [directory / rel for rel in files]
    sums = file_sums(paths, cache_file)
    lines = [f"{rel}\0{path.stat().st_size}\0{sums[path]}\n" for rel, path in zip(files, paths)]
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def file_sums(paths: list[Path], cache_file: Path = CACHE) -> dict[Path, str]:
    """Each file's sha256, read only where the cache has no sum for the file as it is now."""
    cache = _load(cache_file)
    changed = False
    sums = {}
    for path in paths:
        st = Path(path).stat()
        key, stamp = str(Path(path).resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = cache.get(key)
        if entry is None or entry[:3] != stamp:
            entry = cache[key] = stamp + [file_sha256(Path(path))]
            changed = True
        sums[path] = entry[3]
    if changed:
        _save(cache_file, cache)
    return sums


def _load(cache_file: Path) -> dict:
    try:
        return json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return {}


def _save(cache_file: Path, cache: dict) -> None:
    cache_file = Path(cache_file)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, sort_keys=True))
    tmp.replace(cache_file)
