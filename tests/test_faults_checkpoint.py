"""Fault suite, inputs: reads stay inside each model's directory, headers are checked whole, and
every bad file is a CheckpointError naming it; never a traceback, a hang or a big allocation."""
from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from mergekit_ops import MergeOptions, merge
from mergekit_ops import safetensors_io
from mergekit_ops.checkpoint import Checkpoint
from mergekit_ops.errors import CheckpointError
from mergekit_ops.safetensors_io import DTYPES, read_header
from tiny import llama_state, tree_digests, write_family, write_model, write_recipe


def _safetensors(path: Path, header, data: bytes = b"", raw_header: bytes | None = None) -> Path:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _linear(tmp_path: Path, *models: Path) -> Path:
    return write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 1.0}} for m in models]})


@pytest.mark.parametrize("target", ["../other/model.safetensors", "/ABS/model.safetensors", "sub/../../x.safetensors"])
def test_an_index_naming_a_file_outside_the_model_is_refused(tmp_path, seed, target):
    models = write_family(tmp_path, llama_state(seed=seed), seed)
    (tmp_path / "other").mkdir()
    os.link(models["m0"] / "model.safetensors", tmp_path / "other" / "model.safetensors")
    index = models["m2"] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = target.replace("/ABS", str(tmp_path / "other"))
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        merge(_linear(tmp_path, models["m0"], models["m2"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlinks_out_of_the_model_are_refused_but_hf_cache_blobs_are_read(tmp_path, seed):
    models = write_family(tmp_path, llama_state(seed=seed), seed)
    secret = tmp_path / "secret.json"
    secret.write_text('{"api_key": "x"}')
    (models["m1"] / "tokenizer_config.json").unlink()
    (models["m1"] / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="tokenizer_config.json leads outside the model directory"):
        merge(_linear(tmp_path, models["m1"], models["m0"]), tmp_path / "out")
    blobs = tmp_path / "hub" / "models--org--m0" / "blobs"
    snapshot = tmp_path / "hub" / "models--org--m0" / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in models["m0"].iterdir():
        os.replace(f, blobs / f.name)
        (snapshot / f.name).symlink_to(os.path.relpath(blobs / f.name, snapshot))
    merge(_linear(tmp_path, snapshot, models["m2"]), tmp_path / "out")


def test_a_fifo_named_like_weights_is_refused_without_hanging(tmp_path, seed):
    models = write_family(tmp_path, llama_state(seed=seed), seed)
    (models["m1"] / "model.safetensors").unlink()
    os.mkfifo(models["m1"] / "model.safetensors")
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_error_of(
        lambda: merge(_linear(tmp_path, models["m0"], models["m1"]), tmp_path / "out"))), daemon=True)
    worker.start()
    worker.join(10)
    assert outcome and "not a regular file" in outcome[0], outcome


def _error_of(fn) -> str:
    try:
        fn()
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_a_tensor_defined_in_two_shards_is_refused(tmp_path, seed):
    model = write_model(tmp_path / "m", llama_state(seed=seed), shards=2)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == first)
    from safetensors.torch import load_file, save_file
    part = load_file(str(model / second))
    part[name] = torch.zeros(load_file(str(model / first))[name].shape)
    save_file(part, str(model / second))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is defined in both .*{first} and .*{second}"):
        Checkpoint.open(str(model))


def test_a_tensor_the_reference_model_lacks_is_an_error(tmp_path, seed):
    state = llama_state(seed=seed)
    base = write_model(tmp_path / "base", {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"})
    full = write_model(tmp_path / "full", state)
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' but .*base.* does not"):
        merge(_linear(tmp_path, base, full), tmp_path / "out")


@pytest.mark.parametrize("body,words", [
    ([1, 2], "holds a JSON list"),
    ({"weight_map": ["model.safetensors"]}, "no weight_map"),
    ({"weight_map": {"a": 1}}, "no weight_map"),
])
def test_a_malformed_index_names_the_file(tmp_path, seed, body, words):
    model = write_model(tmp_path / "m", llama_state(seed=seed), shards=2)
    (model / "model.safetensors.index.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json.*{words}|{words}.*index.json"):
        Checkpoint.open(str(model))


def test_a_config_that_is_a_list_names_the_file(tmp_path, seed):
    model = write_model(tmp_path / "m", llama_state(seed=seed))
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json holds a JSON list"):
        Checkpoint.open(str(model))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on pickle.dump's protocol
def test_pickles_that_are_hostile_or_not_state_dicts_are_errors_with_allow_pickle(tmp_path, seed):
    class Runs:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))
    for name, payload in (("evil", {"w": Runs()}), ("list", [torch.zeros(2)])):
        model = tmp_path / name
        model.mkdir()
        with open(model / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
        with pytest.raises(CheckpointError, match="pytorch_model.bin"):
            Checkpoint.open(str(model), allow_pickle=True)
    assert not (tmp_path / "ran").exists()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = llama_state(seed=seed)
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert Checkpoint.open(str(legacy), allow_pickle=True).tensors.keys() == state.keys()


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("header,words", [
    ([GOOD], "not a JSON object"),
    ("text", "not a JSON object"),
    ({**GOOD, "__metadata__": [1]}, "__metadata__"),
    ({"a": [1, 2]}, "needs dtype, shape and data_offsets"),
    ({"a": {**GOOD["a"], "data_offsets": [0.0, 16.0]}}, "data_offsets is not"),
    ({"a": {**GOOD["a"], "data_offsets": ["0", "16"]}}, "data_offsets is not"),
    ({"a": {**GOOD["a"], "data_offsets": [True, 16]}}, "data_offsets is not"),
    ({"a": {**GOOD["a"], "data_offsets": [-8, 8]}}, "data_offsets is not"),
    ({"a": {**GOOD["a"], "data_offsets": [0, 16, 32]}}, "data_offsets is not"),
    ({"a": {**GOOD["a"], "shape": [2, 3]}}, "16 bytes, but shape \\[2, 3\\] of F32 takes 24"),
    ({"a": {**GOOD["a"], "shape": [2, -2]}}, "shape is not"),
    ({"a": {**GOOD["a"], "shape": 4}}, "shape is not"),
    ({"a": {**GOOD["a"], "dtype": ["F32"]}}, "unknown dtype"),
    ({"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [8, 16]}}, "overlap"),
    ({"a": {**GOOD["a"], "data_offsets": [16, 32]}}, "outside the data section"),
])
def test_bad_headers_name_the_file_and_tensor(tmp_path, header, words):
    path = _safetensors(tmp_path / "x.safetensors", header, bytes(24))
    with pytest.raises(CheckpointError, match=words) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_duplicate_keys_and_deep_nesting_in_a_header_are_errors(tmp_path):
    dup = _safetensors(tmp_path / "d.safetensors", None, bytes(32),
                       raw_header=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                  b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}')
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        read_header(dup)
    deep = _safetensors(tmp_path / "n.safetensors", None, raw_header=b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CheckpointError, match="RecursionError"):
        read_header(deep)


def test_a_header_size_past_the_end_of_the_file_allocates_nothing_big(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 90 * 2**20) + b"{}")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="header size 94371840, file size 10"):
            read_header(path)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(DTYPES)) | st.text(max_size=4) | st.integers(),
    "shape": st.lists(st.integers(-2, 6), max_size=3) | st.integers() | st.none(),
    "data_offsets": st.lists(st.integers(-4, 64) | st.floats(0, 64) | st.booleans(), max_size=3),
})
headers = st.dictionaries(st.text(max_size=6), entries | st.integers() | st.text(max_size=4), max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data=st.binary(max_size=64), size_delta=st.integers(-12, 12) | st.just(0))
def test_fuzzed_headers_are_read_or_refused_within_the_file(tmp_path, monkeypatch, header, data, size_delta):
    """Any header: a CheckpointError or infos that lie inside the data section without overlapping,
    and no read asks for more bytes than the file has."""
    blob = json.dumps(header).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(blob) + size_delta)) + blob + data)
    size = path.stat().st_size
    asked = []  # bytes each read asks for (the buffer a read fills is allocated for it)
    real_pread, real_preadv = os.pread, os.preadv
    monkeypatch.setattr(safetensors_io.os, "pread", lambda fd, n, off: asked.append(n) or real_pread(fd, n, off))
    monkeypatch.setattr(safetensors_io.os, "preadv", lambda fd, bufs, off: asked.append(sum(map(len, bufs)))
                        or real_preadv(fd, bufs, off))
    try:
        infos, _ = read_header(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        infos = {}
    assert all(n <= size for n in asked)
    spans = sorted((i.offset, i.offset + i.nbytes) for i in infos.values())
    assert all(8 <= a <= b <= size for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    for info in infos.values():
        assert safetensors_io.read_tensor(info).shape == info.shape


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=80))
def test_fuzzed_bytes_are_read_or_refused(tmp_path, raw):
    path = tmp_path / "b.safetensors"
    path.write_bytes(raw)
    try:
        read_header(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)


def test_a_model_with_a_bad_shard_changes_nothing_on_disk(tmp_path, seed):
    models = write_family(tmp_path, llama_state(seed=seed), seed)
    shard = models["m1"] / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:10] = b"[1"  # the header is no longer an object
    shard.write_bytes(bytes(data))
    merge(_linear(tmp_path, models["m0"], models["m2"]), tmp_path / "out")
    recipe = _linear(tmp_path, models["m0"], models["m1"])
    before = tree_digests(tmp_path)
    with pytest.raises(CheckpointError, match=str(shard)):
        merge(recipe, tmp_path / "out", MergeOptions())
    assert tree_digests(tmp_path) == before
