"""MLflow lineage in a real sqlite store: a merge of merges reads back down to its sources (a hub
model with its commit, local models), records are found again by content digest, a fresh store is
filled from params.yaml, and an unreachable store fails a merge without leaving an output."""
import os
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
    expected = [
        ("abc  merge (linear)  " + _digest("artifacts/merges/abc")),
        ("├── ab  merge (ties)  " + _digest("artifacts/merges/ab")),
        (f"│   ├── m0  local {family['m0']}  {d['m0']}"),
        (f"│   ├── m1  local {family['m1']}  {d['m1']}"),
        (f"│   └── base  local {family['base']}  {d['base']}"),
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
