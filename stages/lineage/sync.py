"""Records from what DVC built: every model and merge on disk gets its MLflow record (model,
parents, params), every metrics file its evaluation run, every published target's receipt its
registry alias, every export its run, created from params.yaml and the files where missing.
After a teammate's `git clone && dvc pull && dvc repro` (which rebuilds no model) the lineage is
complete in their store, and a team server can be filled the same way.

Inside `dvc repro` (the `lineage` stage, after every other) the files are what dvc.lock says. Run
by hand, `dvc status` says which stages are out of date, and their outputs are left out: a record
must describe what params.yaml says built it.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..common import tracking
from ..common.errors import LineageError
from ..common.layout import ancestors, export_dir, metrics_file, model_dir, publish_dir
from ..common.splits import split_names
from ..common.store import shown_uri


def stale_stages() -> set[str]:
    """The stages DVC would rerun now; none inside a stage (DVC_STAGE: upstream ran first)."""
    if os.environ.get("DVC_STAGE"):
        return set()
    try:
        out = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise LineageError(f"`dvc status` failed, so which builds are current is unknown: {detail.strip()}") from None
    return set(json.loads(out.stdout or "{}")) - {"compose", "lineage"}  # these two always run


def stale_outputs(stale: set[str], dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """The outputs dvc.yaml declares for the stages that are out of date."""
    import yaml

    if not stale:
        return []
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return [Path(next(iter(out)) if isinstance(out, dict) else out)
            for name in stale if name in stages for out in stages[name].get("outs", [])]


def is_stale(folder: Path, outputs: list[Path]) -> bool:
    return any(folder == out or out in folder.parents for out in outputs)


def sync(params: dict, stale: set[str]) -> list[str]:
    """Make sure every current build has its records; returns what was skipped and why."""
    skipped = []
    outputs = stale_outputs(stale)
    suites = params["evaluate"]["suites"]
    ids: dict[str, str] = {}
    for name in list(params["models"]) + list(params["merges"]):
        chain = [name] + ancestors(name, params)
        missing = [m for m in chain if not model_dir(m, params).is_dir()]
        old = [m for m in chain if is_stale(model_dir(m, params), outputs)]
        if missing or old:
            why = f"{missing[0]} is not on disk (`dvc pull`)" if missing else f"{old[0]} is out of date (`dvc repro`)"
            skipped.append(f"{name}: {why}")
            continue
        ids[name] = tracking.ensure(name, params)
        for split in split_names(suites):
            scores = metrics_file(name, params, split)
            if scores.is_file() and f"eval-{name}" not in stale:
                tracking.log_metrics(name, ids[name], json.loads(scores.read_text()), suites, split)
    for target, spec in params["publish"].items():
        receipt_file = publish_dir(target, params) / "receipt.json"
        if not receipt_file.is_file() or f"publish-{target}" in stale or spec["model"] not in ids:
            continue
        receipt = json.loads(receipt_file.read_text())
        if receipt.get("registry") and not tracking.experiment():
            tracking.register(spec["model"], ids[spec["model"]], receipt["registry"]["alias"])
    for name, spec in params["exports"].items():
        current = export_dir(name, params).is_dir() and f"export-{name}" not in stale
        if current and all(m in ids for m in tracking.export_inputs(spec)):
            tracking.record_export(name, params)
    return skipped


def run(params: dict, root: Path | None = None) -> int:
    """The `--sync` command: connect, sync, say what was left out. Returns the exit code."""
    tracking.connect(root)
    skipped = sync(params, stale_stages())
    for line in skipped:
        print(f"not recorded: {line}")
    print(f"lineage in {shown_uri(tracking.tracking_uri())} is complete for every current build"
          + (f" ({len(skipped)} left out)" if skipped else ""))
    return 0
