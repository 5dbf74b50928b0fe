"""LoRA adapters as merge inputs (`base+adapter`): the merge equals PEFT's merge_and_unload."""
from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ops.engine import merge_file
from mergekit_ops.errors import MergeError
from mergekit_ops.recipe import load_recipes
from tiny import load_dir, write_causal_lm, write_recipe


def make_adapter(base_dir, out, seed, **config):
    """A PEFT LoRA adapter of the model in base_dir with random (non-zero) A and B; returns PEFT's
    own merge_and_unload state dict, the reference."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def peft_merged(base_dir, adapter_dir):
    """PEFT loading a saved adapter and merging it: what `base+adapter` must equal."""
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def passthrough(tmp_path, ref, name="out"):
    recipe = write_recipe(tmp_path / f"{name}.yml", {"merge_method": "passthrough", "models": [{"model": ref}],
                                                     "dtype": "float32"})
    return load_dir(merge_file(recipe, tmp_path / name))


def assert_close_all(ours, ref):
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3}, alpha_pattern={"v_proj": 5}),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"]),
    "modules_to_save": dict(r=2, lora_alpha=2, modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_base_plus_adapter_equals_peft_merge_and_unload(tmp_path, seed, kind):
    base = write_causal_lm(tmp_path / "base", seed)
    expected = make_adapter(base, tmp_path / "adapter", seed + 1, **CONFIGS[kind])
    changed = [k for k in expected if not torch.equal(expected[k], load_dir(base)[k])]
    assert changed, "the adapter changes nothing: the test would prove nothing"
    assert_close_all(passthrough(tmp_path, f"{base}+{tmp_path / 'adapter'}"), expected)
    assert_close_all(passthrough(tmp_path, f"{base}+{tmp_path / 'adapter'}", "again"),
                     peft_merged(base, tmp_path / "adapter"))


def test_fan_in_fan_out_adapter_of_a_conv1d_model(tmp_path, seed):
    """GPT-2 stores its linears as Conv1D (in x out): PEFT's fan_in_fan_out adapters transpose B @ A."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    expected = make_adapter(tmp_path / "gpt2", tmp_path / "adapter", seed + 1, r=4, lora_alpha=6,
                            target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ours = passthrough(tmp_path, f"{tmp_path / 'gpt2'}+{tmp_path / 'adapter'}")
    for k, v in ours.items():  # GPT-2's state dict also holds non-persistent buffers and a tied head
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(ours[k], load_dir(tmp_path / "gpt2")[k]) for k in ours if "c_attn" in k)


def test_merge_of_adapters_equals_merge_of_their_merged_models(tmp_path, seed):
    """A recipe over two `base+adapter` inputs streams the same tensors as one over their merged folders."""
    from transformers import AutoModelForCausalLM

    base = write_causal_lm(tmp_path / "base", seed)
    for i in (1, 2):
        make_adapter(base, tmp_path / f"a{i}", seed + i, r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "gate_proj"][: i + 1])
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / f"a{i}")
        model.merge_and_unload().save_pretrained(tmp_path / f"m{i}")
    shutil.copy(base / "config.json", tmp_path / "m1")

    def ties(a, b):
        return {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                "models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                           {"model": b, "parameters": {"weight": 0.4, "density": 0.7}}]}

    ours = merge_file(write_recipe(tmp_path / "a.yml", ties(f"{base}+{tmp_path / 'a1'}", f"{base}+{tmp_path / 'a2'}")),
                      tmp_path / "from_adapters")
    ref = merge_file(write_recipe(tmp_path / "b.yml", ties(str(tmp_path / "m1"), str(tmp_path / "m2"))),
                     tmp_path / "from_folders")
    assert_close_all(load_dir(ours), load_dir(ref))


def test_long_form_reference_and_relative_paths(tmp_path, seed):
    """mergekit's `{model: {path}, lora: {path}}` form, paths relative to the recipe's folder."""
    base = write_causal_lm(tmp_path / "base", seed)
    expected = make_adapter(base, tmp_path / "adapter", seed + 1, r=2, lora_alpha=4)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "passthrough", "dtype": "float32", "models": [
        {"model": {"model": {"path": "base"}, "lora": {"path": "adapter"}}}]})
    assert load_recipes(recipe)[0].models[0].model == "base+adapter"
    assert_close_all(load_dir(merge_file(recipe, tmp_path / "out")), expected)


@pytest.fixture
def adapter_pair(tmp_path, seed):
    base = write_causal_lm(tmp_path / "base", seed)
    make_adapter(base, tmp_path / "adapter", seed + 1, r=2, lora_alpha=4)
    return base, tmp_path / "adapter"


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("change, words", [
    ({"use_dora": True}, ["use_dora", "DoRA"]),
    ({"peft_type": "IA3"}, ["peft_type IA3", "only LoRA"]),
    ({"lora_bias": True}, ["lora_bias"]),
    ({"bias": "all"}, ["bias"]),
    ({"r": 3}, ["rank 3", "adapter_config.json"]),
])
def test_unsupported_or_inconsistent_adapters_are_named(tmp_path, adapter_pair, change, words):
    base, adapter = adapter_pair
    edit_config(adapter, **change)
    with pytest.raises(MergeError) as err:
        passthrough(tmp_path, f"{base}+{adapter}")
    assert all(w in str(err.value) for w in words) and str(adapter) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_base_is_named(tmp_path, adapter_pair, seed):
    base, adapter = adapter_pair
    other = write_causal_lm(tmp_path / "wide", seed, hidden=24)
    with pytest.raises(MergeError, match=r"q_proj.*is it an adapter of another base"):
        passthrough(tmp_path, f"{other}+{adapter}")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 16)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(16, 2)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"changes 'model\.layers\.7\.self_attn\.q_proj\.weight', which model"):
        passthrough(tmp_path, f"{base}+{adapter}")


def test_adapter_files_missing_or_pickled(tmp_path, adapter_pair):
    base, adapter = adapter_pair
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(MergeError, match=r"no adapter_model\.safetensors .*adapter_model\.bin: pickle adapters are refused"):
        passthrough(tmp_path, f"{base}+{adapter}")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(MergeError, match=r"no adapter_config\.json .*not a PEFT adapter folder"):
        passthrough(tmp_path, f"{base}+{adapter}")


def test_lora_part_without_partner_is_named(tmp_path, adapter_pair):
    base, adapter = adapter_pair
    tensors = load_file(adapter / "adapter_model.safetensors")
    lone = next(k for k in tensors if k.endswith("lora_B.weight"))
    del tensors[lone.replace("lora_B", "lora_A")]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=rf"'{lone}' but not its lora_A partner"):
        passthrough(tmp_path, f"{base}+{adapter}")


@pytest.mark.parametrize("ref", ["a+b+c", "+adapter", "base+"])
def test_malformed_lora_references_are_named(tmp_path, ref):
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "passthrough", "models": [{"model": ref}]})
    with pytest.raises(MergeError, match=r"key 'models\[0\]\.model'.*MODEL\+ADAPTER"):
        load_recipes(recipe)


def test_output_inside_an_adapter_folder_is_refused(tmp_path, adapter_pair):
    base, adapter = adapter_pair
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]})
    for out in (adapter, adapter / "merged"):
        with pytest.raises(MergeError, match=rf"adapter '{adapter}'"):
            merge_file(recipe, out)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
