"""Hub helpers without a network: which weight files a fetch downloads, and header checks that fall
back to the hub when a cached snapshot is incomplete."""
import json

import pytest

from pipeline import hub_cache
from stages.common import hub
from stages.fetch import preflight
from tiny import llama_state, write_model


def test_weight_files_follow_the_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                        "c": "model-00002-of-00002.safetensors"}}))
    assert hub.weight_files(tmp_path) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert hub.weight_files(tmp_path / "nothing") == ["*.safetensors"]


def test_interrupted_download_falls_back_to_remote_headers(tmp_path, monkeypatch, seed):
    model = write_model(tmp_path / "m", llama_state(seed=seed), shards=2)
    monkeypatch.setattr(hub, "cache_repo_dir", lambda repo: tmp_path / "hf" / "models--org--m")
    sha = hub_cache(tmp_path / "hf", "org/m", model)
    snapshot = tmp_path / "hf" / "models--org--m" / "snapshots" / sha
    (snapshot / "model-00002-of-00002.safetensors").unlink()  # the download stopped after one shard
    headers = {"model.norm.weight": ("F32", [8])}
    monkeypatch.setattr(preflight, "remote_headers", lambda repo, s: headers)
    monkeypatch.setattr(preflight, "download", lambda repo, s, patterns: snapshot)
    meta = preflight.hub_meta("m", "org/m", sha)
    assert meta.tensors == {"model.norm.weight": ("F32", (8,))} and meta.config["architectures"]


def test_pickle_only_repo_message(tmp_path):
    with pytest.raises(hub.FetchError, match="only pickle weights"):
        hub.check_weights_are_safetensors("org/old", ["config.json", "pytorch_model.bin", "sub/x.safetensors"])
    hub.check_weights_are_safetensors("org/new", ["model.safetensors"])


@pytest.mark.parametrize("target", ["../other/model.safetensors", "/etc/model.safetensors", "sub/model.safetensors", ".."])
def test_fetch_refuses_an_index_naming_files_outside_the_repo_before_downloading_weights(tmp_path, monkeypatch, target):
    from stages.fetch import stage as fetch

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": target}}))
    downloads = []
    monkeypatch.setattr(hub, "repo_files", lambda repo, sha: ["model.safetensors.index.json", "x.safetensors"])
    monkeypatch.setattr(hub, "snapshot_dir", lambda repo, sha: snapshot)
    monkeypatch.setattr(hub, "download", lambda *args: downloads.append(args) or snapshot)
    monkeypatch.setattr(fetch, "check_model", lambda *args: None)
    monkeypatch.setattr(fetch, "hub_meta", lambda *args: None)
    params = {"artifacts": str(tmp_path / "artifacts"),
              "models": {"m": {"source": "hub", "repo_id": "org/m", "sha": "a" * 40, "revision": "main"}}}
    with pytest.raises(hub.FetchError, match=f"weight_map names '{target}'.*before downloading"):
        fetch.fetch("m", params)
    assert downloads == []
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x.safetensors"]}))
    with pytest.raises(hub.FetchError, match="no weight_map"):
        hub.weight_files(snapshot)
