"""`modules:` recipes: each module of the architecture merged by its own models or slices and
parameters (between a slice's and the recipe's); a multimodal checkpoint's modules hold the tensors
mergekit assigns them; the modules a recipe leaves out are not in the output."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergekit_ops import merge
from mergekit_ops.errors import RecipeError
from tiny import finetune, llama_state, load_dir, write_model, write_recipe


def _merge(tmp_path, body, out="out"):
    return load_dir(merge(write_recipe(tmp_path / f"{out}.yml", body), tmp_path / out)), tmp_path / out


def test_a_default_module_is_the_plain_recipe_with_its_parameters_in_between(tmp_path, seed):
    """Llama has one module, `default`: its parameters override the recipe's, a model's override both."""
    base = llama_state(seed=seed)
    a, b = (write_model(tmp_path / n, finetune(base, seed + i)) for i, n in enumerate("ab", 1))
    modules, _ = _merge(tmp_path, {"merge_method": "linear", "dtype": "float32",
                                   "parameters": {"weight": 0.1, "normalize": False},
                                   "modules": {"default": {"parameters": {"weight": [{"filter": "mlp", "value": 0.7}]},
                                                           "models": [{"model": str(a)},
                                                                      {"model": str(b), "parameters": {"weight": 0.4}}]}}})
    a_w, b_w = load_dir(a), load_dir(b)
    for name, value in modules.items():
        wa = 0.7 if "mlp" in name else 0.1  # the module's filter list applies to mlp only; else the top's
        torch.testing.assert_close(value, wa * a_w[name] + 0.4 * b_w[name], rtol=1e-6, atol=1e-6)


def _vl_state(seed: int, text_layers: int = 3, vision_layers: int = 4) -> dict[str, torch.Tensor]:
    """A tiny checkpoint with Qwen2-VL's tensor names: a text decoder, a vision tower, a projector."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in llama_state(layers=text_layers, seed=seed).items()}
    state["visual.patch_embed.proj.weight"] = torch.randn(8, 6, generator=g)
    for i in range(vision_layers):
        state[f"visual.blocks.{i}.attn.qkv.weight"] = torch.randn(12, 8, generator=g)
        state[f"visual.blocks.{i}.norm1.weight"] = torch.randn(8, generator=g)
    state["visual.merger.mlp.0.weight"] = torch.randn(8, 8, generator=g)
    return state


def _write_vl(path, state):
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "num_hidden_layers": 3, "hidden_size": 8, "vocab_size": 20, "vision_config": {"depth": 4, "embed_dim": 8}}))
    return path


@pytest.fixture
def vl_pair(tmp_path, seed):
    a = _write_vl(tmp_path / "a", _vl_state(seed))
    b = _write_vl(tmp_path / "b", _vl_state(seed + 1))
    return a, b, load_dir(a), load_dir(b)


def test_multimodal_modules_merge_their_own_tensors_and_unlisted_ones_are_left_out(tmp_path, vl_pair):
    a, b, wa, wb = vl_pair
    out, _ = _merge(tmp_path, {"merge_method": "linear", "dtype": "float32", "modules": {
        "text_decoder": {"models": [{"model": str(a), "parameters": {"weight": 0.25}},
                                    {"model": str(b), "parameters": {"weight": 0.75}}]},
        "vision_tower": {"parameters": {"weight": [0.0, 1.0]},  # a gradient over the tower's own 4 layers
                         "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 1.0}}]}}})
    assert not any(n.startswith("visual.merger.") for n in out)  # the projector was not asked for
    assert set(out) == {n for n in wa if not n.startswith("visual.merger.")}
    for name, value in out.items():
        if name.startswith("visual."):
            layer = int(name.split(".")[2]) if ".blocks." in name else 0
            w = layer / 3  # t = layer / (4 - 1): the tower's layers, not the decoder's 3
            expected = (w * wa[name] + wb[name]) / (w + 1)
        else:
            expected = 0.25 * wa[name] + 0.75 * wb[name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_module_slices_stack_layers_and_set_that_modules_layer_count(tmp_path, vl_pair):
    a, b, wa, wb = vl_pair
    out, path = _merge(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "vision_tower": {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                                    {"sources": [{"model": str(b), "layer_range": [2, 4]}]}]},
        "text_decoder": {"models": [{"model": str(b)}]},
        "multi_modal_projector": {"models": [{"model": str(a)}]}}})
    blocks = sorted({int(n.split(".")[2]) for n in out if ".blocks." in n})
    assert blocks == [0, 1, 2, 3, 4]
    for i, (src, j) in enumerate([(wa, 0), (wa, 1), (wa, 2), (wb, 2), (wb, 3)]):
        assert torch.equal(out[f"visual.blocks.{i}.attn.qkv.weight"], src[f"visual.blocks.{j}.attn.qkv.weight"])
    assert torch.equal(out["visual.patch_embed.proj.weight"], wa["visual.patch_embed.proj.weight"])
    assert torch.equal(out["visual.merger.mlp.0.weight"], wa["visual.merger.mlp.0.weight"])
    assert all(torch.equal(out[n], wb[n]) for n in out if not n.startswith("visual."))
    config = json.loads((path / "config.json").read_text())
    assert config["vision_config"] == {"depth": 5, "embed_dim": 8} and config["num_hidden_layers"] == 3


@pytest.mark.parametrize("modules, pattern", [
    ({"vision": {"models": ["A"]}}, r"key 'modules\.vision'.*Qwen2VLForConditionalGeneration has no module 'vision'; "
                                    r"its modules: text_decoder, multi_modal_projector, vision_tower"),
    ({"text_decoder": {"models": ["A"], "slices": []}}, r"key 'modules\.text_decoder'.*exactly one of 'models' or 'slices'"),
    ({"text_decoder": {"model": ["A"]}}, r"key 'modules\.text_decoder\.model'.*did you mean 'models'"),
    ({"text_decoder": {"models": ["A"], "parameters": {"wieght": 1}}},
     r"module 'text_decoder'.*key 'modules\.text_decoder\.parameters\.wieght'"),
])
def test_module_errors_name_the_module_and_key(tmp_path, vl_pair, modules, pattern):
    a = str(vl_pair[0])
    modules = json.loads(json.dumps(modules).replace('"A"', json.dumps(a)))
    with pytest.raises(RecipeError, match=pattern):
        merge(write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                                "modules": modules}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_modules_with_models_is_refused(tmp_path, vl_pair):
    a = str(vl_pair[0])
    with pytest.raises(RecipeError, match=r"exactly one of 'models', 'slices' or 'modules'"):
        merge(write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [a],
                                                "modules": {"text_decoder": {"models": [a]}}}), tmp_path / "out")
