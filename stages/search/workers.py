"""More workers for a search's study, started through submitit: as local processes, or as one
SLURM array job whose tasks run on the cluster's machines. Each runs `search(NAME, worker=True)`
in the project: trials until the budget is spent, against the study's shared storage (a journal
file on a disk every machine mounts, or a database URL: the search's `storage`)."""
from __future__ import annotations

import os
from pathlib import Path

import yaml


def run_worker(name: str, root: str) -> int:
    """One worker's life (what each submitted job runs): the trials it ran."""
    from .stage import search

    os.chdir(root)
    params = yaml.safe_load(Path("params.yaml").read_text())
    return search(name, params, Path(root), worker=True)


def executor(name: str, root: Path, on: str, slurm: dict | None = None):
    """A submitit executor whose logs go to .mergeforge/searches/NAME/jobs/."""
    import submitit

    folder = root / ".mergeforge" / "searches" / name / "jobs"
    if on == "local":
        return submitit.LocalExecutor(folder=folder)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**{k: v for k, v in (slurm or {}).items() if v is not None})
    return ex


def submit(name: str, root: Path, count: int, ex) -> list:
    """`count` workers as one batch (on SLURM, one array job); returns submitit's jobs."""
    with ex.batch():
        jobs = [ex.submit(run_worker, name, str(root.resolve())) for _ in range(count)]
    return jobs
