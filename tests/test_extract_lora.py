"""LoRA extraction: exact at full rank, the SVD's tail error below it, loadable by PEFT, same bytes
every run, and clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ops.errors import CheckpointError, MergeError
from mergekit_ops.lora_extract import ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT, PREFIX, ExtractOptions, extract_lora
from mergekit_ops.extract_lora_cli import main as cli_main
from tiny import file_digests, load_dir, write_causal_lm

HIDDEN = 16  # write_causal_lm's: every block weight has rank at most 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_target(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(f"{t}.weight" for t in TARGETS))


def write_tuned(path: Path, base: Path, state: dict[str, torch.Tensor]) -> Path:
    """A transformers-loadable model: the base's config and tokenizer with these weights."""
    path.mkdir(parents=True)
    for f in base.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, path / f.name)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def tuned_of(tmp_path: Path, seed: int, delta_rank: int | None = None, everything: bool = False):
    """(base dir, tuned dir): block weights changed by random deltas (of rank delta_rank if
    given); with `everything`, embeddings, lm_head and norms changed too."""
    base = write_causal_lm(tmp_path / "base", seed)
    g = torch.Generator().manual_seed(seed)
    state = load_dir(base)
    for name, w in state.items():
        out, inp = (w.shape[0], w.shape[1]) if w.dim() == 2 else (w.shape[0], 1)
        if delta_rank and is_target(name):
            delta = torch.randn(out, delta_rank, generator=g) @ torch.randn(delta_rank, inp, generator=g)
            state[name] = w + 0.02 * delta.reshape(w.shape)
        elif is_target(name) or everything:
            state[name] = w + 0.05 * torch.randn(w.shape, generator=g)
    return base, write_tuned(tmp_path / "tuned", base, state)


def module_errors(out: Path) -> dict[str, float]:
    return {m: v["relative_error"] for m, v in json.loads((out / REPORT).read_text())["modules"].items()}


def test_exact_rank_delta_is_recovered(tmp_path, seed):
    base, tuned = tuned_of(tmp_path, seed, delta_rank=3)
    for rank in (3, 5):
        report = extract_lora(str(tuned), str(base), tmp_path / f"r{rank}", ExtractOptions(rank=rank))
        assert report["summary"]["modules"] == 2 * len(TARGETS)
        assert report["summary"]["max_relative_error"] < 1e-5
        assert report["uncaptured"]["count"] == 0
    config = json.loads((tmp_path / "r3" / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"], config["task_type"]) == (3, 3, "LORA", "CAUSAL_LM")
    assert sorted(config["target_modules"]) == sorted(TARGETS) and config["rank_pattern"] == {}


def test_error_is_the_svd_tail_and_falls_with_rank(tmp_path, seed):
    base, tuned = tuned_of(tmp_path, seed)
    tuned_state, base_state = load_dir(tuned), load_dir(base)
    previous = None
    for rank in (1, 2, 4, 8, 16, 20):
        extract_lora(str(tuned), str(base), tmp_path / f"r{rank}", ExtractOptions(rank=rank))
        errors = module_errors(tmp_path / f"r{rank}")
        for module, error in errors.items():
            s = torch.linalg.svdvals(tuned_state[module + ".weight"] - base_state[module + ".weight"])
            tail = (s[rank:].square().sum().sqrt() / s.square().sum().sqrt()).item()
            assert error == pytest.approx(tail, abs=2e-5), module
            assert previous is None or error <= previous[module] + 1e-6
        previous = errors
    assert max(previous.values()) < 1e-5  # full rank: exact
    factors = load_file(str(tmp_path / "r20" / ADAPTER_WEIGHTS))
    assert factors[f"{PREFIX}model.layers.0.mlp.down_proj.lora_A.weight"].shape == (HIDDEN, 2 * HIDDEN)
    config = json.loads((tmp_path / "r20" / ADAPTER_CONFIG).read_text())
    assert config["rank_pattern"]["model.layers.1.self_attn.q_proj"] == HIDDEN == config["alpha_pattern"][
        "model.layers.1.self_attn.q_proj"]  # modules smaller than r: their full rank, scale still 1


def test_factors_multiply_to_the_truncated_delta(tmp_path, seed):
    base, tuned = tuned_of(tmp_path, seed)
    extract_lora(str(tuned), str(base), tmp_path / "a", ExtractOptions(rank=4))
    factors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    name = "model.layers.1.mlp.up_proj"
    delta = load_dir(tuned)[name + ".weight"] - load_dir(base)[name + ".weight"]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    product = factors[f"{PREFIX}{name}.lora_B.weight"] @ factors[f"{PREFIX}{name}.lora_A.weight"]
    torch.testing.assert_close(product, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=0)


def test_same_bytes_every_run_and_thread_count(tmp_path, seed):
    base, tuned = tuned_of(tmp_path, seed, everything=True)
    options = ExtractOptions(rank=5, embeddings="lora", norms=True)
    before = torch.get_num_threads()
    try:
        digests = []
        for i, threads in enumerate((1, 2, 1)):
            torch.set_num_threads(threads)
            extract_lora(str(tuned), str(base), tmp_path / f"out{i}", options)
            digests.append(file_digests(tmp_path / f"out{i}"))
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1] == digests[2]
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, REPORT} <= set(digests[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_changes_outside_the_targets_are_reported(tmp_path, seed, caplog):
    base, tuned = tuned_of(tmp_path, seed, everything=True)
    report = extract_lora(str(tuned), str(base), tmp_path / "a", ExtractOptions(rank=16))
    left = report["uncaptured"]
    assert left["count"] == 2 + 2 * 2 + 1  # embeddings, lm_head, two norms per layer, the final norm
    assert "model.norm.weight" in left["tensors"] and 0 < left["delta_norm_share"] < 1
    assert report["summary"]["total_relative_error"] == pytest.approx(left["delta_norm_share"], abs=1e-5)
    assert "7 changed tensors are not in the adapter" in caplog.text
    full = extract_lora(str(tuned), str(base), tmp_path / "b", ExtractOptions(rank=16, embeddings="full", norms=True))
    assert full["uncaptured"]["count"] == 0 and full["summary"]["total_relative_error"] < 1e-5
    config = json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm",
                                         "model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm",
                                         "model.layers.1.post_attention_layernorm", "model.norm"]


def _peft_model(base: Path, adapter: Path):
    """The base with the adapter, loaded by PEFT; fails on any missing or unexpected adapter key."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter, adapter_name="x")
    # load again under a second name to see PEFT's load result (from_pretrained only warns)
    result = model.load_adapter(adapter, adapter_name="check")
    assert not result.unexpected_keys and not result.missing_keys
    model.delete_adapter("check")
    model.set_adapter("x")
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    ExtractOptions(rank=16),
    ExtractOptions(rank=16, embeddings="lora", norms=True),
    ExtractOptions(rank=16, embeddings="full", norms=True, dtype=torch.float32),
], ids=["blocks", "lora-embeddings", "full-embeddings"])
def test_peft_loads_it_and_merges_to_the_tuned_model(tmp_path, seed, options):
    from transformers import AutoModelForCausalLM

    base, tuned = tuned_of(tmp_path, seed, everything=options.embeddings is not None)
    extract_lora(str(tuned), str(base), tmp_path / "a", options)
    model = _peft_model(base, tmp_path / "a")
    ids = torch.randint(3, 24, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tuned).eval()(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    merged = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    for name, weight in load_dir(tuned).items():
        torch.testing.assert_close(merged[name], weight, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_peft_merge_is_base_plus_ba_below_full_rank(tmp_path, seed):
    base, tuned = tuned_of(tmp_path, seed)
    extract_lora(str(tuned), str(base), tmp_path / "a", ExtractOptions(rank=3))
    factors, base_state = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS)), load_dir(base)
    merged = _peft_model(base, tmp_path / "a").merge_and_unload().state_dict()
    for name, weight in base_state.items():
        module = name.removesuffix(".weight")
        if is_target(name):
            weight = weight + factors[f"{PREFIX}{module}.lora_B.weight"] @ factors[f"{PREFIX}{module}.lora_A.weight"]
        torch.testing.assert_close(merged[name], weight, atol=2e-6, rtol=1e-5, msg=name)


def test_errors_name_what_is_wrong(tmp_path, seed):
    base, tuned = tuned_of(tmp_path, seed)
    with pytest.raises(MergeError, match="rank 0"):
        extract_lora(str(tuned), str(base), tmp_path / "a", ExtractOptions(rank=0))
    with pytest.raises(CheckpointError, match="target module 'qkv_proj' names no 2-D weight"):
        extract_lora(str(tuned), str(base), tmp_path / "a", ExtractOptions(target_modules=["q_proj", "qkv_proj"]))
    state = load_dir(tuned)
    wide = dict(state, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(2 * HIDDEN + 1, HIDDEN)})
    write_tuned(tmp_path / "wide", base, wide)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight': shape \[33, 16\] in model"):
        extract_lora(str(tmp_path / "wide"), str(base), tmp_path / "a")
    del state["model.layers.0.self_attn.k_proj.weight"]
    write_tuned(tmp_path / "short", base, state)
    with pytest.raises(CheckpointError, match="tensor 'model.layers.0.self_attn.k_proj.weight' of '.*base'"):
        extract_lora(str(tmp_path / "short"), str(base), tmp_path / "a")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        extract_lora(str(tuned), str(base), tmp_path / "busy")
    assert not (tmp_path / "a").exists()


def test_pickle_weights_are_refused(tmp_path, seed):
    base, tuned = tuned_of(tmp_path, seed)
    (tuned / "model.safetensors").unlink()
    torch.save(load_dir(base), tuned / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="Pickle files can run arbitrary code"):
        extract_lora(str(tuned), str(base), tmp_path / "a")


def test_command(tmp_path, seed, capsys):
    base, tuned = tuned_of(tmp_path, seed)
    out = tmp_path / "a"
    assert cli_main([str(tuned), str(base), str(out), "--rank", "4", "--target-modules", "q_proj,v_proj",
                     "--dtype", "bfloat16", "--base-name", "org/base", "--quiet"]) == 0
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["target_modules"], config["base_model_name_or_path"]) == (["q_proj", "v_proj"], "org/base")
    assert {t.dtype for t in load_file(str(out / ADAPTER_WEIGHTS)).values()} == {torch.bfloat16}
    assert json.loads((out / REPORT).read_text())["uncaptured"]["count"] == 10  # the other five per layer
    assert cli_main([str(tuned), str(base), str(out), "--rank", "8"]) == 0
    captured = capsys.readouterr()
    assert "14 modules at rank 8: relative error mean" in captured.out
    assert cli_main([str(tuned), str(base), str(out), "--rank", "0"]) == 2
    assert "error: rank 0" in capsys.readouterr().err
