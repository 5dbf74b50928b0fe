"""publish stage: stage one merge for a hub repo (conf/publish/TARGET.yaml) and push it when the
target says so and the model passes the target's gates.

Writes artifacts/publish/TARGET/ (atomically):
  repo/          what the hub repo holds: the merge's files (hard links), README.md (the card) and
                 images/ (the report's pictures the card shows)
  receipt.json   the gates' verdict, each staged file's sha256 and, after a push, the commit and URL
A model that fails a gate is not staged, registered or pushed: the stage says which metric failed
and writes a receipt saying so (it does not fail the build: the rest of the pipeline goes on).
A model that passes is registered in MLflow's model registry with the target's alias. Inside
`dvc exp run` it is staged only: an experiment neither registers, moves an alias nor pushes (the
registry and the hub follow `dvc repro`, the builds of a branch), and the receipt names it.

    python -m stages.publish TARGET
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..common import tracking
from ..common.atomic import fresh_temp, write_json
from ..common.digest import artifact_files, directory_digest, file_sha256
from ..common.errors import EvalError, LineageError, PublishError
from ..common.layout import model_dir, parents, publish_dir
from ..common.stage_cli import in_section, run_stage
from ..evaluate.report import compare
from ..lineage.stage import tree
from .card import build_card, copy_images
from .push import push

GATES = {"min_retention": (">=", "retention"), "min_score": (">=", "score"), "max_score": ("<=", "score")}


def gate_failures(comparison: dict, gates: dict, name: str) -> list[str]:
    """One line per failed threshold, e.g. "skills/add retention 0.61 < min_retention 0.8"."""
    failures = []
    for t in comparison["tasks"]:
        task = f"{t['suite']}/{t['task']}"
        for gate, limits in sorted(gates.items()):
            limit = limits.get(task, limits.get("*"))
            if limit is None:
                continue
            op, what = GATES[gate]
            value = t["retention"] if what == "retention" else t["scores"][name]
            if value is None:
                failures.append(f"{task} {what} unknown (needed for {gate} {limit})")
            elif (value < limit) if op == ">=" else (value > limit):
                failures.append(f"{task} {what} {value:.4g} {'<' if op == '>=' else '>'} {gate} {limit}")
    return failures


def publish(target: str, params: dict) -> str:
    spec = params["publish"][target]
    name = spec["model"]
    out = publish_dir(target, params)
    tmp = fresh_temp(out)
    tracking.connect()
    comparison = compare(name, params)
    model_id = tracking.ensure(name, params)
    digest = directory_digest(model_dir(name, params))
    failures = gate_failures(comparison, spec["gates"], name)
    receipt = {"target": target, "model": name, "repo_id": spec["repo_id"], "digest": digest,
               "gates": {"passed": not failures, "failed": failures}, "push": spec["push"]}
    tmp.mkdir(parents=True)
    try:
        if failures:
            _tag(model_id, {f"{tracking.TAG}gates.{target}": "failed"})
            message = f"NOT published: '{name}' failed the gates of conf/publish/{target}.yaml: " + "; ".join(failures)
        else:
            experiment = tracking.experiment()
            # the version is the local store's count: it stays in MLflow, so the receipt (and
            # dvc.lock) are the same bytes for this build on every machine
            version = None if experiment else tracking.register(name, model_id, spec["alias"])
            staged = _stage(target, params, comparison, model_id, tmp / "repo")
            receipt["files"] = {rel: file_sha256(staged / rel) for rel in sorted(artifact_files(staged))}
            if experiment:  # an experiment moves no production state
                receipt["experiment"] = experiment
                message = (f"staged {name} for {spec['repo_id']} in {out / 'repo'}; experiment {experiment}: "
                           "not registered" + (" nor pushed" if spec["push"] else ""))
            else:
                receipt["registry"] = {"name": name, "alias": spec["alias"]}
                message = (f"staged {name} (registered as version {version}, alias {spec['alias']}) for "
                           f"{spec['repo_id']} in {out / 'repo'} (dry run: `push: true` uploads it)")
                if spec["push"]:
                    pushed = push(staged, spec["repo_id"], spec["private"], f"mergeforge: {name} ({digest})")
                    receipt["hub"] = pushed
                    _tag(model_id, {f"{tracking.TAG}hub.commit": pushed["head"],
                                    f"{tracking.TAG}hub.url": pushed["url"]})
                    message = (f"pushed {name} to {pushed['url']}" if pushed["commit"] else
                               f"{spec['repo_id']} already holds {name} (commit {pushed['head']}): no new commit")
            _tag(model_id, {f"{tracking.TAG}gates.{target}": "passed"})
        write_json(tmp / "receipt.json", receipt)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return message


def _stage(target: str, params: dict, comparison: dict, model_id: str, folder: Path) -> Path:
    """The repo folder: hard links to the merge's files, and its card."""
    import mlflow

    name = params["publish"][target]["model"]
    source = model_dir(name, params)
    folder.mkdir()
    for rel in artifact_files(source):
        if rel == "README.md":  # the card below replaces it (and must not write through a link into DVC's cache)
            continue
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / rel, folder / rel)
        except OSError:
            shutil.copyfile(source / rel, folder / rel)
    digests = {m: directory_digest(model_dir(m, params)) for m in [name] + parents(name, params)}
    with tracking.mlflow_errors(f"cannot read the record of '{name}'"):
        lineage = tree(mlflow.get_logged_model(model_id), with_id=False)  # the card: the same on every machine
    build_card(target, params, comparison, lineage, digests).save(folder / "README.md")
    copy_images(name, params, folder)
    return folder


def _tag(model_id: str, tags: dict[str, str]) -> None:
    import mlflow

    with tracking.mlflow_errors("cannot tag the model"):
        mlflow.set_logged_model_tags(model_id, tags)


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "stages.publish", "publish target", in_section("publish"), publish,
                     (PublishError, EvalError, LineageError))
