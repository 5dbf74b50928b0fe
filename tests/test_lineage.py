"""MLflow lineage in a real sqlite store: a merge of merges reads back down to its sources (a hub
model with its commit, local models), records are found again by content digest, a fresh store is
filled from params.yaml, and an unreachable store fails a merge without leaving an output."""
import os
import random
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from mergekit_ops.errors import MergeError
from stages.common import digest, tracking
from stages.lineage import stage as lineage
from stages.common.digest import directory_digest
from stages.common.errors import LineageError
from stages.merge.stage import build

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def params(family, mlflow_store, tmp_path):
    """Sources base/m0/m1 local, m2 a (pre-fetched) hub model; ab = TIES of m0, m1; abc = ab + m2."""
    shutil.copytree(family["m2"], tmp_path / "artifacts/models/m2")
    models = {n: {"source": "local", "path": str(family[n])} for n in ("base", "m0", "m1")}
    models["m2"] = {"source": "hub", "repo_id": "org/m2", "revision": "main", "sha": SHA}
    ties = {"merge_method": "ties", "base_model": "base",
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("m0", "m1")]}
    linear = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("ab", "m2")]}
    return {"artifacts": "artifacts", "models": models, "publish": {}, "evaluate": {"baseline": None, "suites": {}},
            "merges": {"ab": {"recipe": ties, "seed": 0, "device": "cpu",
                              "inputs": {n: str(family[n]) for n in ("m0", "m1", "base")}},
                       "abc": {"recipe": linear, "seed": 0, "device": "cpu",
                               "inputs": {"ab": "artifacts/merges/ab", "m2": "artifacts/models/m2"}}}}


def _digest(path) -> str:
    return directory_digest(Path(path))[:19]


def test_merge_of_merges_reads_back_to_hub_and_local_sources(params, family, capsys):
    build("ab", params)
    build("abc", params)
    assert lineage.main(["abc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    d = {n: _digest(family[n]) for n in ("base", "m0", "m1")}
    at = {n: Path(family[n]).relative_to(Path.cwd()) for n in ("base", "m0", "m1")}  # recorded inside the project
    expected = [
        ("abc  merge (linear)  " + _digest("artifacts/merges/abc")),
        ("├── ab  merge (ties)  " + _digest("artifacts/merges/ab")),
        (f"│   ├── m0  local {at['m0']}  {d['m0']}"),
        (f"│   ├── m1  local {at['m1']}  {d['m1']}"),
        (f"│   └── base  local {at['base']}  {d['base']}"),
        (f"└── m2  hub org/m2 @ {SHA}  " + _digest("artifacts/models/m2")),
    ]
    assert [line.rsplit("  [", 1)[0] for line in lines] == expected
    model = tracking.find("abc", directory_digest(Path("artifacts/merges/abc")))
    run = mlflow.get_run(model.source_run_id)
    assert run.data.params["recipe.merge_method"] == "linear" and run.data.params["recipe.models.1.model"] == "m2"
    assert run.data.params["device"] == "cpu"
    assert run.data.tags["mergeforge.method"] == "linear" and run.data.tags["mergeforge.dvc_stage"] == "merge-abc"
    assert len(run.data.tags["mergeforge.git_commit"]) in (40, len("unknown"))


def test_a_merge_is_digested_from_the_sums_taken_as_it_was_written(params, tmp_path, monkeypatch):
    read = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda path: read.append(Path(path).resolve()) or real(path))
    build("ab", params)
    out = Path("artifacts/merges/ab").resolve()
    ours = [p.name for p in read if p.parent == out]
    assert ours and not any(name.endswith(".safetensors") for name in ours)  # config etc. only
    read.clear()
    fresh = directory_digest(out, tmp_path / "empty-cache.json")
    assert any(p.suffix == ".safetensors" for p in read)  # this one read the weights
    assert tracking.find("ab", fresh) is not None  # recorded under the digest of the files' contents


def test_records_are_found_again_and_a_fresh_store_is_filled_from_params(params, tmp_path, monkeypatch,
                                                                         mlflow_template):
    build("ab", params)
    shutil.copyfile(mlflow_template, tmp_path / "fresh.db")  # e.g. a new team server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")
    build("abc", params)  # ab's merge did not run for this store: it is recorded on the way
    first = tracking.ensure("abc", params)
    assert tracking.ensure("abc", params) == first
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["merge-ab", "merge-abc"]
    tree = lineage.tree(mlflow.get_logged_model(first))
    assert [line.lstrip("├└─│ ").split("  ")[0] for line in tree] == ["abc", "ab", "m0", "m1", "base", "m2"]


def test_a_merge_page_shows_its_parents_recipe_and_a_local_source_its_path(params, family):
    """What the MLflow UI shows on a model's own page (params and description; it shows no tags):
    a merge's parents (name, digest, model id, a link), method and recipe; a local source's path
    (inside the project: relative) and digest."""
    build("ab", params)
    digests = {n: directory_digest(Path(p)) for n, p in [("ab", "artifacts/merges/ab")] + [
        (n, family[n]) for n in ("m0", "m1", "base")]}
    merge = tracking.find("ab", digests["ab"])
    assert merge.name == "ab-" + digests["ab"].removeprefix("sha256:")[:8]  # the list tells builds apart
    for parent in ("m0", "m1", "base"):
        source = tracking.find(parent, digests[parent])
        assert merge.tags[f"mergeforge.parent.{parent}"] == f"{digests[parent]} {source.model_id}"
        assert source.tags["mergeforge.path"] == parent and source.params["digest"] == digests[parent]
        assert merge.params[f"parent.{parent}.model_id"] == source.model_id
        assert f"[{source.name}](#/experiments/{merge.experiment_id}/models/{source.model_id})" in merge.tags[
            "mlflow.note.content"]  # the description: a link per parent
        assert digests[parent] in source.tags["mlflow.note.content"]
    assert merge.params["method"] == "ties" and merge.params["recipe.merge_method"] == "ties"
    assert merge.params["recipe.models.0.parameters.density"] == "0.5"
    run = mlflow.get_run(merge.source_run_id)  # its output is the merge; parents are no inputs (MLflow would
    assert [o.model_id for o in run.outputs.model_outputs] == [merge.model_id]  # list their registered versions)
    assert not run.inputs.model_inputs


def _suite(tmp_path: Path, tokens: int) -> dict:
    for task in ("t1", "t2"):
        (tmp_path / f"{task}.jsonl").write_text(f'{{"prompt": "{random.random()}", "answer": "x"}}\n')
    return {"s": {"kind": "exact_match", "max_new_tokens": tokens,
                  "tasks": {t: {"test": f"{t}.jsonl"} for t in ("t1", "t2")}}}


def test_a_suite_change_and_revert_leave_one_current_distinguishable_metric_set(params, tmp_path):
    """Scores are keyed by what produced them: a changed suite logs a new set (another dataset
    digest, its settings as run params); the revert finds the first set again, logs nothing, and
    the model's tag points at it."""
    build("ab", params)
    model_id = tracking.ensure("ab", params)
    first = _suite(tmp_path, 8)
    changed = {"s": first["s"] | {"max_new_tokens": 16}}
    scores = {"s": {"exact_match": {"t1": random.random(), "t2": random.random()}}}
    other = {"s": {"exact_match": {"t1": random.random(), "t2": random.random()}}}
    runs = [tracking.log_metrics("ab", model_id, s, suites) for s, suites in
            [(scores, first), (other, changed), (scores, first)]]
    assert runs[0] == runs[2] != runs[1]
    model = mlflow.get_logged_model(model_id)
    assert model.tags["mergeforge.eval.test"].split()[0] == runs[0]
    by_run = {}
    for metric in model.metrics:
        by_run.setdefault(metric.run_id, {})[metric.key] = (metric.value, metric.dataset_digest)
    assert set(by_run) == {runs[0], runs[1]}  # two sets, not three
    current = by_run[runs[0]]
    assert {k: v for k, (v, _) in current.items()} == {f"s.{t}.exact_match": v for t, v in scores["s"]["exact_match"].items()}
    assert {d for _, d in current.values()}.isdisjoint({d for _, d in by_run[runs[1]].values()})
    assert f"runs/{runs[0]})" in model.tags["mlflow.note.content"].split("Current scores:")[1]
    assert f"runs/{runs[1]})" not in model.tags["mlflow.note.content"]
    assert mlflow.get_run(runs[1]).data.params["s.max_new_tokens"] == "16"


def test_a_moved_project_writes_nothing_into_its_old_folder(tmp_path, monkeypatch):
    """A project copied elsewhere (store and mlartifacts/ with it) records into its new place; the
    old folder is not written, and the old records' paths point into the new place."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    tracking.connect(old)
    first = mlflow.create_external_model(name="first")
    shutil.copytree(old, new)
    before = sorted((p.relative_to(old), p.stat().st_mtime_ns) for p in old.rglob("*"))
    tracking.connect(new)
    second = mlflow.create_external_model(name="second")
    with mlflow.start_run() as run:
        mlflow.log_text("x", "note.txt")
    assert sorted((p.relative_to(old), p.stat().st_mtime_ns) for p in old.rglob("*")) == before
    here = (new / "mlartifacts").as_uri()
    assert all(m.artifact_location.startswith(here + "/") for m in (second, mlflow.get_logged_model(first.model_id)))
    assert mlflow.get_run(run.info.run_id).info.artifact_uri.startswith(here + "/")
    assert [p.name for p in (new / "mlartifacts").rglob("note.txt")] == ["note.txt"]


def test_unreachable_store_fails_the_merge_and_leaves_no_output(params, tmp_path, monkeypatch):
    (tmp_path / "not-a-dir").write_text("")
    uri = f"sqlite:///{tmp_path}/not-a-dir/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(LineageError, match=f"MLflow at {uri}: cannot open the experiment"):
        build("ab", params)
    assert not Path("artifacts/merges/ab").exists()


def test_store_credentials_never_appear_in_errors(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret-pass@127.0.0.1:9")
    with pytest.raises(LineageError) as err:
        tracking.connect()
    assert "s3cret" not in str(err.value) and "http://127.0.0.1:9" in str(err.value)


def test_a_record_that_fails_after_the_merge_removes_the_output(params, monkeypatch):
    def refuse(*args, **kwargs):
        raise LineageError("MLflow at test: refused")

    monkeypatch.setattr(tracking, "ensure", refuse)
    with pytest.raises(LineageError):
        build("ab", params)
    assert not Path("artifacts/merges/ab").exists()


def test_connect_leaves_the_environment_as_it_found_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.connect(tmp_path)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # subprocesses (other projects) pick their own
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_a_recipe_device_is_the_merge_device(params, monkeypatch):
    """`device: cuda` in a recipe reaches the engine: where torch sees no GPU the merge stops with
    the engine's error and leaves no output."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params["merges"]["ab"]["device"] = "cuda"
    with pytest.raises(MergeError, match="device 'cuda'"):
        build("ab", params)
    assert not Path("artifacts/merges/ab").exists()
