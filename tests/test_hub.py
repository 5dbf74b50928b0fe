"""Hub helpers without a network: which weight files a fetch downloads, and header checks that fall
back to the hub when a cached snapshot is incomplete."""
import json

import pytest

from pipeline import hub_cache
from stages import hub, preflight
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
