"""End-to-end merges of tiny checkpoints on disk: identities, determinism, output layout, errors."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ops import MergeOptions, merge
from mergekit_ops import engine as engine_module
from mergekit_ops.errors import CheckpointError, MergeError, RecipeError
from tiny import file_digests, finetune, llama_state, load_dir, write_family, write_model, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, body, name="recipe.yml"):
    return write_recipe(tmp_path / name, body)


def test_linear_one_zero_returns_first_model_bit_exact(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family["m0"]), "parameters": {"weight": 1.0}},
        {"model": str(family["m2"]), "parameters": {"weight": 0.0}}]})
    out = load_dir(merge(r, tmp_path / "out"))
    src = load_file(str(family["m0"] / "model.safetensors"))
    assert out.keys() == src.keys() and all(torch.equal(out[k], src[k]) for k in src)


def test_slerp_endpoints_on_disk(tmp_path, family):
    src = {k: load_file(str(family[k] / "model.safetensors")) for k in ("base", "m0")}
    for t, expect in ((0.0, "base"), (1.0, "m0")):
        r = _recipe(tmp_path, {"merge_method": "slerp", "base_model": str(family["base"]),
                               "models": [{"model": str(family["base"])}, {"model": str(family["m0"])}],
                               "parameters": {"t": t}})
        out = load_dir(merge(r, tmp_path / f"out{t}"))
        for k, v in src[expect].items():
            torch.testing.assert_close(out[k], v, atol=1e-6, rtol=1e-6)


def test_gradient_and_filter_parameters_reach_the_right_tensors(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "slerp", "base_model": str(family["base"]),
                           "models": [{"model": str(family["m0"])}],
                           "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.0}]}})
    out = load_dir(merge(r, tmp_path / "out"))
    base = load_file(str(family["base"] / "model.safetensors"))
    other = load_file(str(family["m0"] / "model.safetensors"))
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(out["model.layers.2.mlp.up_proj.weight"], other["model.layers.2.mlp.up_proj.weight"])
    torch.testing.assert_close(out["model.layers.2.self_attn.q_proj.weight"], base["model.layers.2.self_attn.q_proj.weight"])
    mid = out["model.layers.1.mlp.up_proj.weight"]
    assert not torch.allclose(mid, base["model.layers.1.mlp.up_proj.weight"])
    assert not torch.allclose(mid, other["model.layers.1.mlp.up_proj.weight"])


def _dare(tmp_path, family, seed=7):
    return _recipe(tmp_path, {"merge_method": "dare_ties", "base_model": str(family["base"]), "models": [
        {"model": str(family[m]), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("m0", "m1", "m2")]},
        name=f"dare{seed}.yml")


def test_dare_is_byte_identical_across_thread_counts(tmp_path, family):
    r = _dare(tmp_path, family)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = file_digests(merge(r, tmp_path / "t1", MergeOptions(seed=7)))
        torch.set_num_threads(2)
        two = file_digests(merge(r, tmp_path / "t2", MergeOptions(seed=7, read_ahead_bytes=0)))
    finally:
        torch.set_num_threads(threads)
    assert one == two
    other_seed = file_digests(merge(r, tmp_path / "s8", MergeOptions(seed=8)))
    assert other_seed["model.safetensors"] != one["model.safetensors"]


def test_worker_threads_compute_as_one_thread_does(seed):
    """Dot products (model_stock's cosines, DARE's L1 norms) on the merge's workers give the bits
    of a one-thread run, whatever the machine's core count (MKL once used every core per call)."""
    a, b = torch.randn(1 << 20), torch.randn(1 << 20)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = torch.dot(a, b)
    finally:
        torch.set_num_threads(threads)
    with engine_module._workers() as pool:
        assert torch.equal(pool.submit(torch.dot, a, b).result(), expected)


def test_shards_and_index_cover_every_tensor(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                           "models": [{"model": str(family["m2"]), "parameters": {"weight": 1.0}}]})
    out = merge(r, tmp_path / "out", MergeOptions(out_shard_size=2000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    merged = load_dir(out)
    assert set(index["weight_map"]) == set(merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    for f in files:
        tensors = load_file(str(out / f))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 2000 or len(tensors) == 1
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_weight_files_are_hashed_as_written(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                           "models": [{"model": str(family["m2"]), "parameters": {"weight": 1.0}}]})
    sums = {"stale.safetensors": "0" * 64}  # left from another merge: cleared
    out = merge(r, tmp_path / "out", MergeOptions(out_shard_size=2000, sha256=sums))
    files = {name: sha for name, sha in file_digests(out).items() if name.endswith(".safetensors")}
    assert len(files) > 2 and sums == files


def test_writes_batched_or_one_by_one_give_the_same_files(tmp_path, seed, monkeypatch):
    """Tensors finished while the writer is busy go to it as one batch; the files do not depend on
    how they were batched (shards end inside batches; bodies are written from their own buffers)."""
    from mergekit_ops import safetensors_io

    probe = safetensors_io.SequentialFile(tmp_path / "probe")
    direct = probe.stage is not None
    probe.close()
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT: every write goes at once")
    monkeypatch.setattr(safetensors_io, "DIRECT_MIN_BYTES", safetensors_io.BLOCK)  # 16 KiB tensors skip the stage
    family = write_family(tmp_path, llama_state(hidden=64, inter=96, seed=seed), seed)
    r = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                           "models": [{"model": str(family[m]), "parameters": {"weight": 0.7}} for m in ("m0", "m2")]})
    batches = []
    real_flush = safetensors_io.ShardWriter.flush

    def slow_flush(self):  # a slow disk: tensors pile up while a batch is written
        batches.append(self._pos)
        time.sleep(0.05)
        real_flush(self)
    monkeypatch.setattr(safetensors_io.ShardWriter, "flush", slow_flush)
    monkeypatch.setattr(engine_module, "WRITE_BATCH_BYTES", 0)  # wait for each batch: one tensor each
    one_by_one = file_digests(merge(r, tmp_path / "one", MergeOptions(out_shard_size=100_000)))
    assert len(batches) == len(load_dir(tmp_path / "one"))
    batches.clear()
    monkeypatch.setattr(engine_module, "WRITE_BATCH_BYTES", 1 << 40)
    batched = file_digests(merge(r, tmp_path / "batched", MergeOptions(out_shard_size=100_000)))
    assert len(batches) < len(load_dir(tmp_path / "batched")) / 2
    assert batched == one_by_one


def test_a_failed_write_leaves_no_output(tmp_path, seed, monkeypatch):
    """A write that fails on the writer thread, mid-merge (a full disk), ends the merge with a
    one-line error naming the output and leaves neither an output nor a temporary directory."""
    from mergekit_ops import safetensors_io

    monkeypatch.setattr(safetensors_io, "DIRECT_MIN_BYTES", safetensors_io.BLOCK)
    family = write_family(tmp_path, llama_state(hidden=64, inter=96, seed=seed), seed)
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family[m]), "parameters": {"weight": 1.0}} for m in ("m0", "m1")]})
    calls = {"n": 0}
    real_writev, real_write = safetensors_io.os.writev, safetensors_io.os.write

    def failing(call):
        def write(fd, data):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(28, "No space left on device")
            return call(fd, data)
        return write
    monkeypatch.setattr(safetensors_io.os, "writev", failing(real_writev))
    monkeypatch.setattr(safetensors_io.os, "write", failing(real_write))
    with pytest.raises(MergeError, match=f"disk filled up while writing {tmp_path / 'out'}: the output needs"):
        merge(r, tmp_path / "out", MergeOptions(out_shard_size=100_000))
    assert calls["n"] == 3
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_merge_leaves_no_finished_output(tmp_path, family, monkeypatch):
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family[m]), "parameters": {"weight": 1.0}} for m in ("m0", "m1")]})
    target = tmp_path / "out"
    merge(r, target)
    before = file_digests(target)
    calls = {"n": 0}
    real = engine_module.merge_task

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "merge_task", dying)
    with pytest.raises(KeyboardInterrupt):
        merge(r, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        merge(r, target)
    assert file_digests(target) == before  # the previous complete output is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_shape_mismatch_names_tensor_shapes_and_models(tmp_path, family):
    odd = llama_state(inter=14)
    write_model(tmp_path / "odd", odd)
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family["m0"]), "parameters": {"weight": 1.0}},
        {"model": str(tmp_path / "odd"), "parameters": {"weight": 1.0}}]})
    with pytest.raises(CheckpointError) as info:
        merge(r, tmp_path / "out")
    msg = str(info.value)
    assert "mlp.down_proj.weight" in msg and "[8, 14]" in msg and "[8, 12]" in msg
    assert "odd" in msg and "m0" in msg
    assert not (tmp_path / "out").exists()


def test_vocab_and_architecture_mismatch_are_reported(tmp_path, family):
    state = finetune(load_file(str(family["base"] / "model.safetensors")), 5)
    write_model(tmp_path / "bigvocab", state, vocab=99)
    write_model(tmp_path / "mistral", state, arch="MistralForCausalLM")
    for name, pattern in (("bigvocab", "vocabulary size mismatch.*20.*99"), ("mistral", "architecture mismatch")):
        r = _recipe(tmp_path, {"merge_method": "linear", "models": [
            {"model": str(family["m0"]), "parameters": {"weight": 1.0}},
            {"model": str(tmp_path / name), "parameters": {"weight": 1.0}}]})
        with pytest.raises(CheckpointError, match=pattern):
            merge(r, tmp_path / "out")


def test_missing_tensor_is_named(tmp_path, family):
    state = load_file(str(family["m0"] / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    write_model(tmp_path / "holey", state)
    r = _recipe(tmp_path, {"merge_method": "ties", "base_model": str(family["base"]), "models": [
        {"model": str(tmp_path / "holey"), "parameters": {"weight": 1.0, "density": 0.5}}]})
    with pytest.raises(CheckpointError, match=r"holey.*no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        merge(r, tmp_path / "out")


NAN_CASES = {  # method: (recipe keys, per-model parameters), one for each way an output is checked
    "linear": ({}, {"weight": 1.0}),  # weighted_sum stores slices
    "ties": ({"base_model": "base"}, {"weight": 1.0, "density": 0.5}),  # map_chunks stores slices
    "nearswap": ({"base_model": "base", "parameters": {"t": 0.5}}, None),  # one model
    "karcher": ({}, None),  # a whole-tensor result, checked in one pass
}


@pytest.mark.parametrize("method", list(NAN_CASES))
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nan_output_is_an_error_naming_the_tensor(tmp_path, family, method, bad, monkeypatch):
    """Streamed outputs are checked slice by slice as they are stored: the bad entry lands in a
    random slice of many (7-element slices here), and any slice's NaN/Inf must be found."""
    monkeypatch.setattr("mergekit_ops.methods.job.span", lambda device: 7)
    name = "model.layers.2.self_attn.v_proj.weight"
    state = load_file(str(family["m0"] / "model.safetensors"))
    flat = state[name].view(-1)
    flat[int(torch.randint(0, flat.numel(), ()))] = bad
    write_model(tmp_path / "bad", state)
    keys, model_params = NAN_CASES[method]
    models = ([str(family["m1"])] if method != "nearswap" else []) + [str(tmp_path / "bad")]
    body = {"merge_method": method, **keys, "models": [
        {"model": m, **({"parameters": model_params} if model_params else {})} for m in models]}
    if "base_model" in body:
        body["base_model"] = str(family["base"])
    r = _recipe(tmp_path, body)
    with pytest.raises(MergeError, match=rf"{re.escape(name)}.*NaN or Inf"):
        merge(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overflow_to_the_output_dtype_is_an_error(tmp_path, family, monkeypatch):
    """Finite in the compute dtype, infinite once stored as float16: the check is of the output."""
    monkeypatch.setattr("mergekit_ops.methods.job.span", lambda device: 7)
    name = "model.layers.1.mlp.down_proj.weight"
    states = {m: load_file(str(family[m] / "model.safetensors")) for m in ("m0", "m1")}
    at = int(torch.randint(0, states["m0"][name].numel(), ()))
    for m, state in states.items():
        state[name].view(-1)[at] = 40000.0  # the sum, 80000, is above float16's 65504
        write_model(tmp_path / m, state)
    r = _recipe(tmp_path, {"merge_method": "linear", "out_dtype": "float16", "parameters": {"normalize": False}, "models": [
        {"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in states]})
    with pytest.raises(MergeError, match=rf"{re.escape(name)}.*NaN or Inf"):
        merge(r, tmp_path / "out")


def test_zero_weight_sum_with_normalize_is_a_recipe_error(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family["m0"]), "parameters": {"weight": 1.0}},
        {"model": str(family["m1"]), "parameters": {"weight": -1.0}}]})
    with pytest.raises(RecipeError, match="sum to 0"):
        merge(r, tmp_path / "out")


def test_pickle_weights_are_refused_unless_opted_in(tmp_path, family):
    state = load_file(str(family["m0"] / "model.safetensors"))
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text((family["m0"] / "config.json").read_text())
    torch.save(state, tmp_path / "pkl" / "pytorch_model.bin")
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "pkl"), "parameters": {"weight": 1.0}}]})
    with pytest.raises(CheckpointError, match="only pickle weights.*pytorch_model.bin.*refused"):
        merge(r, tmp_path / "out")
    out = load_dir(merge(r, tmp_path / "out", MergeOptions(allow_pickle=True)))
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_tied_embeddings_write_no_lm_head(tmp_path, seed):
    base = llama_state(seed=seed, tied=True)
    write_model(tmp_path / "b", base, tied=True)
    write_model(tmp_path / "f", finetune(base, seed + 1), tied=True)
    r = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "b"),
                           "models": [{"model": str(tmp_path / "f"), "parameters": {"weight": 1.0}}]})
    out = load_dir(merge(r, tmp_path / "out"))
    assert "lm_head.weight" not in out and "model.embed_tokens.weight" in out


def test_untied_head_of_one_input_uses_embeddings_of_tied_ones(tmp_path, seed):
    base = llama_state(seed=seed, tied=True)
    write_model(tmp_path / "tied", base, tied=True)
    untied = finetune(base, seed + 1)
    untied["lm_head.weight"] = torch.randn_like(base["model.embed_tokens.weight"])
    write_model(tmp_path / "untied", untied)
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "tied"), "parameters": {"weight": 1.0}},
        {"model": str(tmp_path / "untied"), "parameters": {"weight": 1.0}}]})
    out = load_dir(merge(r, tmp_path / "out"))
    torch.testing.assert_close(out["lm_head.weight"],
                               (base["model.embed_tokens.weight"] + untied["lm_head.weight"]) / 2)


def test_passthrough_slices_stack_layers_and_rewrite_layer_count(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family["m0"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(family["m1"]), "layer_range": [1, 3]}]}]})
    out_dir = merge(r, tmp_path / "out")
    out = load_dir(out_dir)
    a, b = load_file(str(family["m0"] / "model.safetensors")), load_file(str(family["m1"] / "model.safetensors"))
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 4
    for out_layer, (src, layer) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(out[name.format(out_layer)], src[name.format(layer)])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert not any(".layers.4." in k for k in out)


def test_out_dtype_and_compute_in_float32(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "linear", "out_dtype": "bfloat16", "models": [
        {"model": str(family[m]), "parameters": {"weight": 1.0}} for m in ("m0", "m1")]})
    out_dir = merge(r, tmp_path / "out")
    out = load_dir(out_dir)
    a, b = load_file(str(family["m0"] / "model.safetensors")), load_file(str(family["m1"] / "model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], ((a[k] + b[k]) / 2).to(torch.bfloat16))
    assert json.loads((out_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_multi_document_recipe_merges_a_merge(tmp_path, family):
    text = f"""
name: soup
merge_method: linear
models:
  - {{model: {family['m0']}, parameters: {{weight: 1.0}}}}
  - {{model: {family['m1']}, parameters: {{weight: 1.0}}}}
---
merge_method: slerp
base_model: {family['base']}
models: [{{model: soup}}]
parameters: {{t: 1.0}}
"""
    r = _recipe(tmp_path, text)
    out = load_dir(merge(r, tmp_path / "out"))
    a, b = load_file(str(family["m0"] / "model.safetensors")), load_file(str(family["m1"] / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(out[k], (a[k] + b[k]) / 2, atol=1e-6, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_hub_id_resolves_from_local_cache_without_network(tmp_path, family, monkeypatch):
    cache = tmp_path / "hub"
    sha = "a" * 40
    snap = cache / "models--org--tiny" / "snapshots" / sha
    snap.parent.mkdir(parents=True)
    snap.symlink_to(family["m0"], target_is_directory=True)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [{"model": "org/tiny", "parameters": {"weight": 1.0}}]})
    out = load_dir(merge(r, tmp_path / "out"))
    assert torch.equal(out["model.norm.weight"], load_file(str(family["m0"] / "model.safetensors"))["model.norm.weight"])
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [{"model": "org/absent", "parameters": {"weight": 1.0}}]},
                name="absent.yml")
    with pytest.raises(CheckpointError, match="org/absent.*does not download"):
        merge(r, tmp_path / "out2")


def test_cli_merges_and_reports_errors(tmp_path, family):
    r = _recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family[m]), "parameters": {"weight": 1.0}} for m in ("m0", "m1")]})
    run = subprocess.run([sys.executable, "-m", "mergekit_ops", str(r), str(tmp_path / "out"), "--seed", "3",
                          "--out-shard-size", "1KB"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "merged model written to" in run.stderr and "tensor" in run.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    bad = _recipe(tmp_path, {"merge_method": "lineer", "models": [str(family["m0"])]}, name="bad.yml")
    run = subprocess.run([sys.executable, "-m", "mergekit_ops", str(bad), str(tmp_path / "o2"), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "bad.yml" in run.stderr and "did you mean 'linear'" in run.stderr


def test_ties_model_scope_keeps_the_global_top_k(tmp_path, family):
    density = 0.3
    r = _recipe(tmp_path, {"merge_method": "ties", "base_model": str(family["base"]),
                           "parameters": {"trim_scope": "model", "normalize": False},
                           "models": [{"model": str(family["m2"]), "parameters": {"weight": 1.0, "density": density}}]})
    out = load_dir(merge(r, tmp_path / "out"))
    base, ft = load_dir(family["base"]), load_dir(family["m2"])
    names = sorted(base)
    delta = torch.cat([(ft[k] - base[k]).reshape(-1) for k in names])
    k = int(density * delta.numel())
    threshold = delta.abs().sort(descending=True).values[k - 1]
    kept = torch.cat([(out[n] - base[n]).reshape(-1) for n in names]) != 0
    assert int(kept.sum()) == k
    assert bool((delta.abs()[kept] >= threshold).all())
    per_tensor = [int(((out[n] - base[n]) != 0).sum()) for n in names]
    assert len(set(p / base[n].numel() for p, n in zip(per_tensor, names))) > 1  # shares differ per tensor


def test_cli_lists_methods_with_their_parameters():
    run = subprocess.run([sys.executable, "-m", "mergekit_ops", "--list-methods"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0
    assert "ties: TIES" in run.stdout and "trim_scope=tensor" in run.stdout and "density=1.0" in run.stdout
    from mergekit_ops.methods import METHODS

    assert run.stdout.count("\n    base model:") == len(METHODS)
    assert all(f"\n{name}: " in "\n" + run.stdout for name in METHODS)


def test_cli_method_list_into_a_closed_pipe_ends_quietly():
    """`--list-methods | head -1`: a reader that stops early gets no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_ops", "--list-methods"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the CLI writes a byte
    err = proc.stderr.read()
    assert proc.wait() == 0 and err == ""
