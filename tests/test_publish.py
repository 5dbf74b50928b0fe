"""Evaluation records, gates and publication: metrics linked to the model and dataset in MLflow,
a model card the hub parses back, gates that block, a registry alias for what passes, and a push
through a mocked hub (the exact calls, no commit when nothing changed, stale shards deleted) that
never writes the token anywhere."""
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from unittest import mock

import mlflow
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.hf_api import RepoFile

from stages.common import tracking
from stages.common.errors import PublishError
from stages.evaluate.stage import evaluate
from stages.common.digest import file_sha256
from stages.merge.stage import build
from stages.publish.stage import gate_failures, publish
from stages.evaluate.report import write
from tiny import write_causal_lm

TOKEN = "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0123"


@pytest.fixture
def project(tmp_path, mlflow_store, seed):
    """Two tiny causal LMs (apache-2.0), their soup, both evaluated, and a publish target."""
    rng = random.Random(seed)
    for i, name in enumerate(("a", "b")):
        write_causal_lm(tmp_path / "src" / name, seed + i)
    words = lambda n: " ".join(f"w{rng.randrange(21)}" for _ in range(n))  # noqa: E731
    (tmp_path / "data").mkdir()
    (tmp_path / "data/text.txt").write_text("\n".join(words(rng.randint(3, 12)) for _ in range(8)) + "\n")
    (tmp_path / "data/qa.jsonl").write_text("".join(json.dumps({"prompt": words(3), "answer": words(1)}) + "\n"
                                                    for _ in range(6)))
    suites = {"lm": {"kind": "perplexity", "tasks": {"text": {"test": "data/text.txt"}}, "max_length": 64, "batch_size": 4},
              "qa": {"kind": "exact_match", "tasks": {"qa": {"test": "data/qa.jsonl"}}, "max_new_tokens": 2, "batch_size": 4}}
    params = {
        "artifacts": "artifacts", "evaluate": {"baseline": None, "suites": suites},
        "models": {n: {"source": "local", "path": f"src/{n}", "license": "apache-2.0"} for n in ("a", "b")},
        "merges": {"soup": {"recipe": {"merge_method": "linear", "models": [
            {"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]},
            "seed": 0, "device": "cpu", "inputs": {"a": "src/a", "b": "src/b"}}},
        "publish": {"hub": {"model": "soup", "repo_id": "me/soup", "push": False, "private": True,
                            "alias": "candidate", "gates": {"min_retention": {}, "min_score": {}, "max_score": {}}}},
    }
    build("soup", params)
    for name in ("a", "b", "soup"):
        evaluate(name, params)
    write("soup", params)
    return params


def test_metrics_are_linked_to_model_and_dataset(project):
    metrics = json.loads(Path("artifacts/eval/soup.json").read_text())
    model = tracking.find("soup")
    logged = {(m.key, m.dataset_name): m.value for m in mlflow.get_logged_model(model.model_id).metrics}
    assert logged == {("lm.text.perplexity", "lm/text"): metrics["lm"]["perplexity"]["text"],
                      ("qa.qa.exact_match", "qa/qa"): metrics["qa"]["exact_match"]["qa"]}


def test_dry_run_stages_card_receipt_and_registers_the_alias(project):
    publish("hub", project)
    out = Path("artifacts/publish/hub")
    receipt = json.loads((out / "receipt.json").read_text())
    assert receipt["gates"] == {"passed": True, "failed": []} and "hub" not in receipt
    assert receipt["files"]["model.safetensors"] == file_sha256(Path("artifacts/merges/soup/model.safetensors"))
    card = ModelCard.load(out / "repo/README.md")
    assert card.data.base_model == ["a", "b"] and card.data.base_model_relation == "merge"
    assert card.data.tags == ["merge", "mergeforge", "linear"] and card.data.license == "apache-2.0"
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("lm/text", "perplexity")] == pytest.approx(
        json.loads(Path("artifacts/eval/soup.json").read_text())["lm"]["perplexity"]["text"], rel=1e-6)
    assert "merge_method: linear" in card.text and "└── b  local src/b" in card.text
    assert "[m-" not in card.text  # MLflow's model ids differ per store: the card must not
    assert (out / "repo/images/scores.png").read_bytes() == Path("artifacts/reports/soup/scores.png").read_bytes()
    assert receipt["files"]["images/scores.png"] == file_sha256(out / "repo/images/scores.png")
    assert "device:" not in card.text  # cpu, the default, goes unsaid
    model = tracking.find("soup")
    version = mlflow.MlflowClient().get_model_version_by_alias("soup", "candidate")
    assert version.source == f"models:/{model.model_id}"
    assert receipt["registry"] == {"name": "soup", "alias": "candidate"}  # versions are the store's alone
    publish("hub", project)  # the same model: the alias keeps its version
    assert mlflow.MlflowClient().get_model_version_by_alias("soup", "candidate").version == version.version
    first = (out / "receipt.json").read_bytes()
    mlflow.MlflowClient().delete_registered_model("soup")  # as a teammate's fresh store: other versions
    mlflow.register_model(f"models:/{model.model_id}", "soup")
    publish("hub", project)  # registers it as version 2 now
    assert mlflow.MlflowClient().get_model_version_by_alias("soup", "candidate").version != version.version
    assert (out / "receipt.json").read_bytes() == first
    project["merges"]["soup"]["device"] = "cuda"  # as if built on a GPU, whose last bits may differ
    publish("hub", project)
    assert "device: cuda" in ModelCard.load(out / "repo/README.md").text


def test_the_same_build_on_two_fresh_stores_stages_the_same_bytes(project, tmp_path, monkeypatch, mlflow_template):
    """Nothing staged depends on the store: a second store, fresh (its model ids and registry
    versions its own), records the build again and stages the same receipt and card."""
    publish("hub", project)
    out = Path("artifacts/publish/hub")
    first = {rel: (out / rel).read_bytes() for rel in ("receipt.json", "repo/README.md")}
    recorded = tracking.find("soup").model_id
    shutil.copyfile(mlflow_template, tmp_path / "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    publish("hub", project)
    assert tracking.find("soup").model_id != recorded  # another store: another id
    assert {rel: (out / rel).read_bytes() for rel in first} == first


def test_failed_gate_blocks_publication_and_names_the_metric(project):
    project["publish"]["hub"]["gates"]["min_retention"] = {"*": 0.5, "qa/qa": 1e9}
    message = publish("hub", project)
    receipt = json.loads(Path("artifacts/publish/hub/receipt.json").read_text())
    assert not receipt["gates"]["passed"] and not Path("artifacts/publish/hub/repo").exists()
    assert "NOT published" in message and "qa/qa retention" in message and "min_retention 1000000000.0" in message
    assert mlflow.search_registered_models() == []


def test_gate_rules_per_task_and_wildcard(seed):
    rng = random.Random(seed)
    tasks = [{"suite": "s", "task": t, "kind": "exact_match", "scores": {"m": rng.random()}, "retention": rng.random()}
             for t in ("x", "y")]
    x, y = tasks
    comparison = {"tasks": tasks}
    low = min(x["retention"], y["retention"]) - 0.01
    assert gate_failures(comparison, {"min_retention": {"*": low}}, "m") == []
    failed = gate_failures(comparison, {"min_retention": {"*": low, "s/x": x["retention"] + 0.01},
                                        "max_score": {"s/y": y["scores"]["m"] - 0.01}}, "m")
    assert len(failed) == 2 and failed[0].startswith("s/x retention") and failed[1].startswith("s/y score")


def test_license_conflict_and_unknown_license_are_errors(project):
    project["models"]["b"]["license"] = "mit"
    with pytest.raises(PublishError, match=r"different licenses \(apache-2.0: a; mit: b\)"):
        publish("hub", project)
    del project["models"]["b"]["license"]
    with pytest.raises(PublishError, match="license is unknown: set `license:` in conf/models/b.yaml"):
        publish("hub", project)


class FakeHub:
    """The hub's side of HfApi in memory: one repo, its files and commits."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = ["0" * 40]

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def list_repo_tree(self, repo_id, path_in_repo=None, **kwargs):
        for path, data in sorted(self.files.items()):
            lfs = None
            if path.endswith(".safetensors"):
                lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            yield RepoFile(path=path, size=len(data), oid=blob, lfs=lfs)

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        assert TOKEN not in commit_message
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                self.files[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            else:
                del self.files[op.path_in_repo]
        self.commits.append(f"{len(self.commits):040x}")
        return mock.Mock(oid=self.commits[-1], commit_url=f"https://huggingface.co/{repo_id}/commit/{self.commits[-1]}")

    def repo_info(self, repo_id, **kwargs):
        return mock.Mock(sha=self.commits[-1])


@pytest.fixture
def hub(monkeypatch):
    """HfApi replaced by an autospec mock (real signatures, recorded calls) backed by FakeHub."""
    fake = FakeHub()
    api = mock.create_autospec(HfApi, instance=True)
    for name in ("create_repo", "list_repo_tree", "create_commit", "repo_info"):
        getattr(api, name).side_effect = getattr(fake, name)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: api)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake, api


def test_push_commits_once_skips_unchanged_and_deletes_stale_shards(project, hub, tmp_path):
    fake, api = hub
    project["publish"]["hub"]["push"] = True
    publish("hub", project)
    api.create_repo.assert_called_once_with("me/soup", repo_type="model", private=True, exist_ok=True)
    (_, ops), kwargs = api.create_commit.call_args
    staged = sorted(p.relative_to(Path("artifacts/publish/hub/repo")).as_posix()
                    for p in Path("artifacts/publish/hub/repo").rglob("*") if p.is_file())
    assert sorted(op.path_in_repo for op in ops) == staged and "README.md" in staged
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    receipt = json.loads(Path("artifacts/publish/hub/receipt.json").read_text())
    assert receipt["hub"]["commit"] == fake.commits[-1] and receipt["hub"]["url"].endswith(fake.commits[-1])
    assert tracking.find("soup").tags["mergeforge.hub.commit"] == fake.commits[-1]

    publish("hub", project)  # nothing changed: no commit
    assert api.create_commit.call_count == 1
    assert json.loads(Path("artifacts/publish/hub/receipt.json").read_text())["hub"]["commit"] is None

    fake.files["model-00002-of-00002.safetensors"] = b"stale shard"
    fake.files["cover.png"] = b"a user's file"
    publish("hub", project)
    (_, ops), _ = api.create_commit.call_args
    assert [op.path_in_repo for op in ops] == ["model-00002-of-00002.safetensors"]
    assert isinstance(ops[0], CommitOperationDelete) and "cover.png" in fake.files

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]


def test_push_without_a_token_says_how_to_give_one(project, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    project["publish"]["hub"]["push"] = True
    with pytest.raises(PublishError, match="needs a hub token: set HF_TOKEN"):
        publish("hub", project)


def test_an_experiment_stages_but_registers_nothing(project, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-" + random.randbytes(3).hex())
    message = publish("hub", project)
    assert f"experiment {os.environ['DVC_EXP_NAME']}: not registered" in message
    receipt = json.loads(Path("artifacts/publish/hub/receipt.json").read_text())
    assert receipt["experiment"] == os.environ["DVC_EXP_NAME"] and "registry" not in receipt
    assert Path("artifacts/publish/hub/repo/README.md").is_file()
    assert mlflow.MlflowClient().search_registered_models() == []


def test_the_card_shows_the_report_pictures_and_a_found_merge_its_search(project, tmp_path):
    from stages.evaluate.report import compare
    from stages.publish.card import build_card, card_images, copy_images

    images = card_images("soup", project)
    assert set(images) == {"images/scores.png", "images/retention.png"} and all(p.is_file() for p in images.values())
    card = build_card("hub", project, compare("soup", project), ["soup"], {"soup": "0" * 64}).text
    evaluation = card.split("## Evaluation")[1].split("## Content digests")[0]
    assert all(f"]({rel})" in evaluation for rel in images)
    copy_images("soup", project, tmp_path / "repo")
    assert all((tmp_path / "repo" / rel).read_bytes() == path.read_bytes() for rel, path in images.items())
    found = project | {"merges": {"soup": project["merges"]["soup"] | {"search": "hunt"}}}
    assert card_images("soup", found)["images/trials.png"] == Path("artifacts/searches/hunt/trials.png")
    with pytest.raises(PublishError, match="artifacts/searches/hunt/trials.png: missing"):
        copy_images("soup", found, tmp_path / "repo")
