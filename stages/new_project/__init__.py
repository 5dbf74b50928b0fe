"""`mergeforge new DIR`: a project of one's own, ready for `dvc repro` once conf/ names models and
recipes. The files come from template/ next to this module (conf/ with the demo off, commented
examples and a small evaluation suite); the code is not copied, it runs from the installed package."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


from ..common.errors import ConfigError
from ..compose.stage import plan, write

TEMPLATE = Path(__file__).with_name("template")
RENAMED = {"gitignore": ".gitignore", "dvcignore": ".dvcignore"}  # hidden files would be easy to lose in packaging


def create(target: Path) -> None:
    """Lay the project out in target (new, or an empty folder), initialise git and DVC and write
    params.yaml and dvc.yaml. Anything it made is removed again when a step fails."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target}: exists and is not an empty folder; a new project needs a new or empty one")
    if shutil.which("git") is None:
        raise ConfigError("git is not installed: a project is a git repository (DVC records its builds there)")
    made = not target.exists()
    try:
        for src in sorted(TEMPLATE.rglob("*")):
            if src.is_file():
                rel = src.relative_to(TEMPLATE)
                dest = target / rel.parent / RENAMED.get(rel.name, rel.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
        for group in ("models", "merges", "publish"):
            (target / "conf" / group).mkdir(exist_ok=True)
        _run(["git", "init", "-q"], target)
        _run([sys.executable, "-m", "dvc", "init", "-q"], target)
        write(target, *plan(target.resolve()))
    except BaseException:
        if made:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in target.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{cwd}: `{' '.join(cmd[-3:])}` failed: {(proc.stderr or proc.stdout).strip()}")
