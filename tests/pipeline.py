"""Helpers for end-to-end pipeline tests: a throwaway git + DVC project with tiny checkpoints, a
hand-built offline Hugging Face cache, and `dvc` runs that report which stages ran."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAN = re.compile(r"Running stage '([^']+)'")
ALWAYS = {"compose", "lineage"}  # the head stage checks dvc.yaml, the last one makes sure of the records
# `python -c SHORT_DEMO OUT_DIR`: the demo's models and data with far shorter training (same code path)
SHORT_DEMO = ("import sys; from stages.demo import stage as demo; "
              "demo.BASE_STEPS, demo.EXPERT_STEPS, demo.SPLITS = 12, 6, {'validation': 8, 'test': 8}; demo.build(sys.argv[1])")


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def repro(project: Path, env: dict | None = None, check: bool = True) -> tuple[set[str], subprocess.CompletedProcess]:
    """`dvc repro`; returns the stages that ran (ALWAYS among them, once dvc.yaml matches conf/)."""
    proc = run(["dvc", "repro"], project, env, check)
    return set(RAN.findall(proc.stdout + proc.stderr)), proc


def new_project(path: Path, models: dict[str, Path | dict], merges: dict[str, dict], env: dict | None = None,
                conf: dict[str, dict] | None = None, files: dict[str, str] | None = None,
                mlflow_db: Path | None = None) -> Path:
    """A git + DVC project with this repo's code and a conf/ of the given models (local directory
    paths, or source dicts) and recipes, more conf files ({"eval/lm": body}), data files
    ({"data/x.txt": text}) and a copy of a migrated MLflow DB; dvc.yaml composed and committed."""
    path.mkdir(parents=True)
    for rel, body in (conf or {}).items():
        (path / "conf" / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / "conf" / f"{rel}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    for rel, text in (files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    if mlflow_db:
        shutil.copyfile(mlflow_db, path / "mlflow.db")
    for code in ("stages", "mergekit_ops"):
        shutil.copytree(ROOT / code, path / code, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "conf" / "models").mkdir(parents=True)
    (path / "conf" / "merges").mkdir()
    (path / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/mlartifacts/\n/.mergeforge/\n/artifacts/publish/*/repo/\n")
    (path / "conf" / "config.yaml").write_text(
        "defaults:\n  - mergeforge_schema\n  - _self_\npaths:\n  artifacts: artifacts\ndemo:\n  enabled: false\n")
    for name, src in models.items():
        write_conf(path, "models", name, src if isinstance(src, dict) else {"source": "local", "path": str(src)})
    for name, recipe in merges.items():
        write_conf(path, "merges", name, recipe)
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "t@example.com"], path)
    run(["git", "config", "user.name", "test"], path)
    run(["dvc", "init", "-q"], path)
    run(["dvc", "config", "cache.type", "hardlink,symlink"], path)
    (path / ".dvcignore").write_text("__pycache__\n")
    run([sys.executable, "-m", "stages.compose"], path, env, check=False)  # writes dvc.yaml (exit 1: new graph)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "project"], path)
    return path


def write_conf(project: Path, group: str, name: str, body: dict) -> None:
    (project / "conf" / group / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))


def read_conf(project: Path, group: str, name: str) -> dict:
    return yaml.safe_load((project / "conf" / group / f"{name}.yaml").read_text())


def hub_cache(cache: Path, repo_id: str, model_dir: Path, branch: str = "main") -> str:
    """Put model_dir's files into an HF cache as a new commit of repo_id that `branch` points to,
    laid out as huggingface_hub lays it out (blobs, snapshot symlinks, refs). Returns the sha."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    digest = hashlib.sha1()
    for f in files:
        digest.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    sha = digest.hexdigest()
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in files:
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        link = snapshot / f.name
        if not link.exists():
            link.symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(sha)
    return sha
