"""mergekit_ops.merge_tensors: the in-memory merge a search's trials use equals, bit for bit, what
`merge` writes to files, for every method (the same tensors in the same dtypes)."""
import torch

from mergekit_ops import MergeOptions, merge, merge_tensors, parse_recipe
from mergekit_ops.chunks import CHUNK
from mergekit_ops.methods import METHODS
from test_cuda import _recipes
from tiny import llama_state, load_dir, write_family


def test_every_method_in_memory_equals_the_files_merge_writes(tmp_path, seed):
    base = llama_state(layers=2, hidden=64, inter=96, vocab=32, seed=seed, dtype=torch.bfloat16)
    base["model.layers.0.mlp.up_proj.weight"] = torch.randn(CHUNK // 64 + 8, 64).bfloat16()  # two chunks
    base["model.layers.0.mlp.gate_proj.weight"] = torch.randn(CHUNK // 64 + 8, 64).bfloat16()
    base["model.layers.0.mlp.down_proj.weight"] = torch.randn(64, CHUNK // 64 + 8).bfloat16()
    family = write_family(tmp_path, base, seed)
    recipes = _recipes(family)
    assert {body["merge_method"] for body in recipes.values()} == set(METHODS)
    opened: dict = {}
    for name, body in recipes.items():
        options = MergeOptions(seed=seed)
        files = load_dir(merge(parse_recipe(body, name), tmp_path / "out" / name, options))
        memory = merge_tensors(parse_recipe(body, name), options, checkpoints=opened)
        assert set(memory) == set(files), name
        for tensor, value in files.items():
            assert memory[tensor].dtype == value.dtype, (name, tensor)
            assert torch.equal(memory[tensor].view(torch.uint8), value.view(torch.uint8)), (name, tensor)
    assert set(opened) == {str(p) for p in family.values()}  # opened once, reused by every recipe


def test_a_seeded_method_draws_by_seed_in_memory_as_in_files(tmp_path, seed):
    family = write_family(tmp_path, llama_state(layers=1, hidden=16, inter=24, seed=seed), seed)
    body = _recipes(family)["dare_ties"]
    one, two = (merge_tensors(parse_recipe(body, "dare"), MergeOptions(seed=s)) for s in (seed, seed + 1))
    assert any(not torch.equal(one[k], two[k]) for k in one)
    again = merge_tensors(parse_recipe(body, "dare"), MergeOptions(seed=seed))
    assert all(torch.equal(one[k], again[k]) for k in one)
