"""Where the export's files go, and how they land there without clobbering anything else.

    OUT_DIR/model.gguf
    OUT_DIR/Modelfile                                  (Ollama: `ollama create NAME -f Modelfile`)
    OUT_DIR/lmstudio/PUBLISHER/MODEL/MODEL-TYPE.gguf   (LM Studio: copy lmstudio/* into its models dir)

LM Studio finds a model exactly two folders below its models directory (publisher, then model); one
level more or less and the file is not listed. The LM Studio file is a hard link to model.gguf where
the file system allows (no second copy of the weights), else a copy.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..common.atomic import fresh_temp
from .errors import ExportError

GGUF_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"


def folder_name(value: str, what: str) -> str:
    """A publisher or model name: one path component LM Studio can show."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or value.startswith("."):
        raise ExportError(f"{what} '{value}' must be a single folder name (no '/', not starting with '.')")
    return value


def lmstudio_path(publisher: str, model: str, type_name: str) -> Path:
    """The LM Studio file, relative to the output folder (and to LM Studio's models directory after 'lmstudio/')."""
    return Path("lmstudio") / folder_name(publisher, "publisher") / folder_name(model, "model name") / \
        f"{model}-{type_name.upper()}.gguf"


def staging_dir(out_dir: Path) -> Path:
    """An empty folder beside OUT_DIR (same file system, so moving files in is a rename)."""
    tmp = fresh_temp(out_dir)
    tmp.mkdir(parents=True)
    return tmp


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def install(staged: Path, out_dir: Path) -> None:
    """Move the staged files into OUT_DIR. A new OUT_DIR appears whole in one rename; into an existing
    one each file is renamed over its old version, and anything else there is left as it is."""
    if not out_dir.exists():
        staged.rename(out_dir)
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    for path in sorted(p for p in staged.rglob("*") if not p.is_dir()):
        target = out_dir / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(staged)
