"""Merges with the math on a GPU (`device: cuda`): every method agrees with the CPU and is
byte-identical on reruns. Skipped where torch sees no CUDA device (CI); run on a GPU machine."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ops import MergeOptions, merge
from mergekit_ops.chunks import CHUNK
from mergekit_ops.errors import MergeError
from mergekit_ops.methods import METHODS
from test_vocab import vocab_family  # noqa: F401 (a fixture)
from tiny import file_digests, llama_state, load_dir, write_family, write_recipe

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")

BF16_ULP = 2.0 ** -7  # bf16 keeps 8 significant bits: one or two units in the last place, relative


def _recipes(paths: dict[str, Path]) -> dict[str, dict]:
    """One recipe per method over base + three fine-tunes, in bf16 (ties at top-k thresholds)."""
    base, fts = str(paths["base"]), [str(paths[f"m{i}"]) for i in range(3)]

    def recipe(method, params=None, models=fts, base_model=base, **per_model):
        return {"merge_method": method, "base_model": base_model, "dtype": "bfloat16", "parameters": params or {},
                "models": [{"model": p, "parameters": dict(per_model)} for p in models]}

    sparse = {"weight": 0.5, "density": 0.4}
    return {
        "linear": recipe("linear", base_model=None, weight=1.0),
        "slerp": recipe("slerp", {"t": 0.3}, [base, fts[0]]),
        "nearswap": recipe("nearswap", {"t": 0.01}, [base, fts[0]]),
        "passthrough": recipe("passthrough", models=fts[:1], base_model=None, scale=0.5),
        "model_stock": recipe("model_stock"),
        "sce": recipe("sce", {"select_topk": 0.5}),
        "nuslerp": recipe("nuslerp", models=fts[:2], weight=0.5),
        "multislerp": recipe("multislerp", weight=1.0),
        "karcher": recipe("karcher"),
        "task_arithmetic": recipe("task_arithmetic", weight=0.5),
        "ties": recipe("ties", **sparse),
        "ties_model_scope": recipe("ties", {"trim_scope": "model"}, **sparse),
        "dare_linear": recipe("dare_linear", **sparse),
        "dare_ties": recipe("dare_ties", **sparse),
        "breadcrumbs": recipe("breadcrumbs", **sparse, gamma=0.05),
        "breadcrumbs_ties": recipe("breadcrumbs_ties", **sparse, gamma=0.05),
        "della": recipe("della", **sparse, epsilon=0.1),
        "della_linear": recipe("della_linear", **sparse, epsilon=0.1),
        "ram": recipe("ram", {"epsilon": 0.02}),
        "ramplus_tl": recipe("ramplus_tl", {"epsilon": 0.05, "r": 0.5}),
        "arcee_fusion": recipe("arcee_fusion", models=[base, fts[0]]),
    }


@pytest.fixture
def wide_family(tmp_path, seed):
    """bf16 base + three fine-tunes whose MLP matrices (1.5M entries) span two streamed chunks."""
    base = llama_state(layers=2, hidden=1024, inter=1536, vocab=64, seed=seed, dtype=torch.bfloat16)
    assert base["model.layers.0.mlp.up_proj.weight"].numel() > CHUNK
    return write_family(tmp_path, base, seed)


def _far_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Entries more than 2^-7 relative (one to two bf16 ulps) plus 1e-3 apart. The devices add and
    reduce in different orders; where terms cancel, or an angle near zero goes through acos (the
    spherical methods), the few fp32 ulps that makes are many bf16 ulps of a small result. A
    device-side error (an entry dropped on one device only, a wrong draw) moves entries by the size
    of a task vector's entries, here 0.05 on average."""
    a, b = a.float(), b.float()
    return int(((a - b).abs() > BF16_ULP * torch.maximum(a.abs(), b.abs()) + 1e-3).sum())


@needs_cuda
def test_every_method_on_cuda_matches_the_cpu_and_reruns_byte_identical(tmp_path, wide_family):
    recipes = _recipes(wide_family)
    assert {body["merge_method"] for body in recipes.values()} == set(METHODS)
    torch.cuda.reset_peak_memory_stats()
    mismatches = {}
    for name, body in recipes.items():
        recipe = write_recipe(tmp_path / f"{name}.yml", body)
        cpu = merge(recipe, tmp_path / f"{name}-cpu", MergeOptions(seed=5))
        gpu = merge(recipe, tmp_path / f"{name}-cuda", MergeOptions(seed=5, device="cuda"))
        again = merge(recipe, tmp_path / f"{name}-cuda-again", MergeOptions(seed=5, device="cuda"))
        assert file_digests(gpu) == file_digests(again), f"{name}: two CUDA merges differ"
        want, got = load_dir(cpu), load_dir(gpu)
        assert got.keys() == want.keys()
        far = {k: n for k in want if (n := _far_apart(got[k], want[k]))}
        if far:
            mismatches[name] = far
    assert torch.cuda.max_memory_allocated() > 0  # the math did run on the GPU
    assert not mismatches, f"entries far apart on CUDA and CPU: {mismatches}"


@needs_cuda
def test_vocabulary_alignment_and_integer_tensors_on_cuda_match_the_cpu(tmp_path, vocab_family):
    """tokenizer_source: union (rows moved and averaged on the device) and a non-float tensor
    (checked equal across models on the device, then copied) give the CPU's result."""
    steps = torch.randint(0, 100, (4,), dtype=torch.int64)
    for name in ("base", "shuffled", "narrow"):
        file = tmp_path / name / "model.safetensors"
        save_file({**load_file(str(file)), "model.extra.steps": steps}, str(file))
    recipe = write_recipe(tmp_path / "union.yml", {
        "merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "tokenizer_source": "union",
        "models": [{"model": str(tmp_path / m), "parameters": {"weight": w}} for m, w in (("shuffled", 0.5),
                                                                                        ("narrow", 0.3))]})
    want = load_dir(merge(recipe, tmp_path / "cpu"))
    got = load_dir(merge(recipe, tmp_path / "cuda", MergeOptions(device="cuda")))
    assert got.keys() == want.keys() and torch.equal(got["model.extra.steps"], steps)
    assert got["model.embed_tokens.weight"].shape[0] > 12  # the union's extra tokens
    assert not {k: n for k in want if (n := _far_apart(got[k], want[k]))}


@needs_cuda
def test_cli_merges_on_cuda(tmp_path, wide_family):
    recipe = write_recipe(tmp_path / "dare.yml", _recipes(wide_family)["dare_ties"])
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "mergekit_ops", str(recipe), str(out), "--device", "cuda",
                          "--seed", "3", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert file_digests(out) == file_digests(merge(recipe, tmp_path / "lib", MergeOptions(seed=3, device="cuda")))


@pytest.mark.parametrize("device, gpus, error", [("cuda", 0, "device 'cuda'.*no CUDA device"),
                                                 ("cuda:1", 1, r"device 'cuda:1': torch sees 1 CUDA device\(s\)"),
                                                 ("gpu", 0, "device 'gpu': use cpu, cuda or cuda:N"),
                                                 ("meta", 0, "device 'meta': use cpu, cuda or cuda:N")])
def test_a_device_torch_cannot_merge_on_is_a_clear_error_and_writes_nothing(tmp_path, family, monkeypatch,
                                                                           device, gpus, error):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(family["m0"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MergeError, match=error):
        merge(recipe, tmp_path / "out", MergeOptions(device=device))
    assert not any(tmp_path.glob("*out*"))
