"""`mergeforge new` as a new user meets it: from an empty folder to a built, evaluated and reported
merge of two local checkpoints, with no stop but DVC's documented second run for a new graph."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import SHORT_DEMO, run

ROOT = Path(__file__).resolve().parents[1]
MERGEFORGE = [sys.executable, "-m", "stages.cli"]


def test_new_refuses_a_folder_that_holds_files_and_leaves_it_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    proc = run(MERGEFORGE + ["new", str(tmp_path)], ROOT, check=False)
    assert proc.returncode == 2 and "not an empty folder" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_every_help_says_what_each_argument_is_and_exits_0():
    for args in ([], ["report"]):
        assert run(MERGEFORGE + args + ["--help"], ROOT).stdout.startswith("usage: mergeforge"), args
    described = {"new": ["DIR"], "lineage": ["NAME", "--sync"], "check": ["OVERRIDE", "--root ROOT"],
                 "compose": ["OVERRIDE", "--root ROOT"]}
    for command, arguments in described.items():
        text = run(MERGEFORGE + [command, "--help"], ROOT).stdout
        assert all(f"  {arg}  " in text for arg in arguments), (command, text)  # each with its help text
    engine = run([sys.executable, "-m", "mergekit_ops", "--help"], ROOT).stdout.split("positional arguments:")[1]
    assert all(f"{arg}  " in engine for arg in ("RECIPE.yml", "OUT_DIR"))  # each with its help text
    for module in ("stages.lineage", "stages.compose", "stages.demo", "stages.fetch", "stages.merge", "stages.evaluate",
                   "stages.evaluate.report", "stages.evaluate.sweep", "stages.publish", "mergekit_ops"):
        text = run([sys.executable, "-m", module, "--help"], ROOT).stdout
        assert text.startswith("usage:") and ("NAME  " in text or "OUT_DIR  " in text or "OVERRIDE  " in text), module


@pytest.mark.slow
def test_from_mergeforge_new_to_an_evaluated_merge_of_two_local_checkpoints(tmp_path):
    run([sys.executable, "-c", SHORT_DEMO, str(tmp_path / "checkpoints")], ROOT)  # two small real checkpoints
    project = tmp_path / "myproj"
    env = {"HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    run(MERGEFORGE + ["new", str(project)], tmp_path, env)
    assert (project / ".git").is_dir() and (project / ".dvc").is_dir()
    assert not (project / "stages").exists()  # the code runs from the installed package
    assert "demo" not in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert run(["dvc", "repro"], project, env).returncode == 0  # an empty project builds (nothing)
    # as the README's steps say: two models from conf/examples/local_model.yaml, one linear recipe
    example = (project / "conf/examples/local_model.yaml").read_text()
    for name, ckpt in (("a", "add"), ("b", "rev")):
        (project / f"conf/models/{name}.yaml").write_text(
            example.replace("/path/to/checkpoint", str(tmp_path / "checkpoints" / ckpt)))
    shutil.copyfile(project / "conf/examples/linear.yaml", project / "conf/merges/ab.yaml")
    checked = run(MERGEFORGE + ["check"], project, env).stdout
    assert "2 models, 1 recipe, 1 evaluation suite" in checked and "dvc repro" in checked
    first = run(["dvc", "repro"], project, env, check=False)  # DVC's documented stop: a new graph
    assert first.returncode != 0 and "run `dvc repro` again" in first.stderr + first.stdout
    run(["dvc", "repro"], project, env)
    scores = json.loads((project / "artifacts/eval/ab.json").read_text())
    assert set(scores["mine"]["exact_match"]) == {"mine"}
    assert "ab (merge) | a (parent) | b (parent)" in (project / "artifacts/reports/ab/report.md").read_text()
    table = run(MERGEFORGE + ["report"], project, env).stdout
    assert all(f"| {m} |" in table for m in ("a", "b", "ab"))
    lineage = run(MERGEFORGE + ["lineage", "ab"], project, env).stdout
    assert lineage.startswith("ab  merge (linear)") and str(tmp_path / "checkpoints" / "add") in lineage
    assert set(json.loads(run(["dvc", "status", "--json"], project, env).stdout)) <= {"compose", "lineage"}  # always run


def test_mergeforge_compose_writes_the_new_graph_at_once_and_exits_0(tmp_path):
    """What spares the documented stop: a graph change written by hand, not by a stage DVC runs."""
    project = tmp_path / "p"
    run(MERGEFORGE + ["new", str(project)], tmp_path)
    (project / "conf/models/a.yaml").write_text("source: local\npath: ckpt/a\n")
    proc = run(MERGEFORGE + ["compose"], project)
    assert "dvc.yaml rewritten (added eval-a, lineage)" in proc.stderr
    assert "eval-a" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "dvc.yaml already matches conf/" in run(MERGEFORGE + ["compose"], project).stderr
