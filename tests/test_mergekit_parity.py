"""Parity with mergekit 0.1.5: every recipe goes through mergekit_ops and mergekit on the same tiny
float32 checkpoints, and every output tensor must agree.

mergekit is never our dependency: it lives in a side environment whose python is found from
MERGEFORGE_MERGEKIT (a python, or the `mergekit-yaml` beside it), else `.venv-mergekit/bin/python`
in the repository (`.ci/run` builds it). Without one the module is skipped, unless
MERGEFORGE_REQUIRE_ALL=1 (CI), which makes that a failure.

Cases: every case of bench/parity.py (methods, gradients, filter lists, slices), plus `filter: "*"`,
tokenizer modes (`tokenizer_source` union / base / a model, `pad_to_multiple_of`, `tokens` with
`kind: zero`, a model, `kind: model_token` by token and by id, `force`) on models whose tokenizers
differ, LoRA references (`model: BASE+ADAPTER`) in a linear and a ties recipe, and `modules:` (Llama's
one module `default`, and the three modules of a Qwen2.5-VL checkpoint), and karcher on a deep
family whose inputs are nearly parallel (where float32 rounding picks the fixed point). mergekit runs
once, in one process (bench/mergekit_batch.py), for all selected cases; ours runs in-process.

Agreement, per entry: |ours - mergekit| <= ATOL + RTOL * |mergekit|, i.e. relative difference
|ours - mergekit| / max(|mergekit|, ATOL / RTOL) <= RTOL (the reported "max rel"). Same tensor
names, shapes, dtypes and config.json keys; for tokenizer cases the same vocabulary (token -> id)
and the vocabulary tensors compared token by token. Documented differences allowed
(docs/mergekit-differences.md):
- Tie-break: in a sparsifying method (ties, breadcrumbs, sce, ...), an entry may differ only if the
  magnitude that ranks it (|delta| of some model, or sce's variance across the deltas) sits in a
  tie: another entry of the same tensor has exactly the same value, so a top-k threshold there
  keeps an arbitrary subset in mergekit. Any other differing entry fails.
- Union order: with `union` and new tokens from several models, mergekit orders the new tokens by
  hash-map iteration; they may then take each other's ids (only among the appended ids), and
  their rows are compared by token.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import make_checkpoints  # noqa: E402
import parity  # noqa: E402  (its cases() is the shared list of method recipes)
from compare import CONFIG_KEYS, tensor_files  # noqa: E402
from tiny import fresh_seed, write_causal_lm, write_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

RTOL = 1e-5
ATOL = 1e-8  # float32 rounding of sums of values around 0.02 is ~2e-9; this only matters for |x| < 1e-3
SPARSIFYING = ("ties", "dare", "breadcrumbs", "della", "sce")  # methods with a top-k threshold
BATCH_TIMEOUT_S = 1800
MERGEKIT_VERSION = "0.1.5"

TOKENS = [f"t{i}" for i in range(make_checkpoints.SIZES["tiny"]["vocab_size"])]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
DEEP = {**make_checkpoints.SIZES["tiny"], "num_hidden_layers": 150}
NEAR = 0.03


@dataclass
class Case:
    recipe: dict
    tokenizer: bool = False  # compare the output tokenizer, vocabulary tensors by token
    union_order_free: bool = False  # union with new tokens from several models (see the docstring)


@dataclass
class Paths:
    B: str = "B"
    F1: str = "F1"
    F2: str = "F2"
    F3: str = "F3"
    DB: str = "DB"  # deep family (DEEP): a base, a fine-tune, and one NEAR times as far from the base,
    DF: str = "DF"  # so that hundreds of small tensors' spherical means land within acos' float32
    DN: str = "DN"  # floor (~3e-4 rad) of an input
    TB: str = "TB"  # tokenizer family: base (t0..t31)
    TS: str = "TS"  # ft1, shuffled vocabulary + x_a + added special token <extra>
    TN: str = "TN"  # ft2, t0..t29 + x_b, x_a
    LB: str = "LB"  # LoRA family: a transformers-loadable base, a fine-tune of it, two adapters
    LF: str = "LF"
    A1: str = "A1"
    A2: str = "A2"
    VA: str = "VA"  # modules: two Qwen2.5-VL-shaped checkpoints (text decoder, vision tower, projector)
    VB: str = "VB"


def all_cases(p: Paths) -> dict[str, Case]:
    """Every case by name: bench/parity.py's, then the ones only this test has."""
    fp32 = {"dtype": "float32"}
    out = {name: Case(r) for name, r in parity.cases(p.B, p.F1, p.F2, p.F3).items()}

    def lin(*weights, **extra):
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in weights],
                **extra, **fp32}

    def tok_lin(*weights, **extra):  # with a base_model: else mergekit's donor (a set's first) varies
        return lin(*weights, base_model=p.TB, **extra)

    out.update({
        "linear_filter_star": Case(lin((p.F1, [{"filter": "mlp", "value": 0.2}, {"filter": "*", "value": [0.3, 0.9]},
                                               {"value": 5.0}]), (p.F2, 0.5))),
        "ties_filter_star": Case({"merge_method": "ties", "base_model": p.B, "models": [
            {"model": p.F1, "parameters": {"weight": 0.6, "density": [{"filter": "*", "value": 0.4}]}},
            {"model": p.F2, "parameters": {"weight": [{"filter": "self_attn", "value": 0.1},
                                                      {"filter": "*", "value": [0.2, 0.8]}], "density": 0.6}}],
            **fp32}),
        "tok_union": Case(tok_lin((p.TB, 0.5), (p.TS, 0.5), tokenizer_source="union"), tokenizer=True),
        "tok_union_three": Case(tok_lin((p.TB, 0.2), (p.TS, 0.5), (p.TN, 0.3), tokenizer_source="union"),
                                tokenizer=True, union_order_free=True),
        "tok_base": Case({"merge_method": "task_arithmetic", "base_model": p.TB, "tokenizer_source": "base",
                          "models": [{"model": p.TS, "parameters": {"weight": 0.7}},
                                     {"model": p.TN, "parameters": {"weight": 0.4}}], **fp32}, tokenizer=True),
        "tok_model": Case(tok_lin((p.TB, 0.3), (p.TS, 0.3), (p.TN, 0.4), tokenizer_source=p.TS), tokenizer=True),
        "tok_union_pad8": Case(tok_lin((p.TB, 0.6), (p.TS, 0.4), tokenizer={"source": "union", "pad_to_multiple_of": 8}),
                               tokenizer=True),
        # source base: only tokens the base has (mergekit 0.1.5 adds new ones to the base's own
        # tokenizer object, then fails with a KeyError building the permutations)
        "tok_tokens_base": Case(tok_lin((p.TB, 0.3), (p.TS, 0.3), (p.TN, 0.4), tokenizer={"source": "base", "tokens": {
            "t5": {"source": p.TS, "force": True},
            "t7": {"source": {"kind": "zero"}, "force": True},
            "t30": {"source": {"kind": "model_token", "model": p.TN, "token": "t3"}},  # fills narrow's gap
            "t31": {"source": {"kind": "model_token", "model": p.TS, "token_id": 4}, "force": True},
            "t1": {"source": {"kind": "zero"}}}}), tokenizer=True),  # every model has t1: no effect
        "tok_tokens_union": Case(tok_lin((p.TB, 0.5), (p.TS, 0.5), tokenizer={"source": "union", "tokens": {
            "x_a": {"source": p.TS, "force": True},
            "<extra>": {"source": {"kind": "model_token", "model": p.TB, "token_id": 0}},
            "x_new": {"source": {"kind": "model_token", "model": p.TS, "token": "t9"}, "force": True},
            "x_id": {"source": {"kind": "model_token", "model": p.TB, "token_id": 6}},
            "x_zero": {"source": {"kind": "zero"}},
            "t2": {"source": {"kind": "zero"}, "force": True}}}), tokenizer=True),
        "modules_default": Case({"merge_method": "ties", "base_model": p.B, "parameters": {"weight": 0.3},
                                 "modules": {"default": {
                                     "parameters": {"density": [{"filter": "mlp", "value": 0.4}], "weight": 0.6},
                                     "models": [{"model": p.F1, "parameters": {"density": 0.7}},
                                                {"model": p.F2, "parameters": {"weight": [0.2, 0.9]}}]}},
                                 "dtype": "float32"}),
        "modules_qwen2_5_vl": Case({"merge_method": "linear", "dtype": "float32", "modules": {
            "text_decoder": {"models": [{"model": p.VA, "parameters": {"weight": 0.25}},
                                        {"model": p.VB, "parameters": {"weight": 0.75}}]},
            "vision_tower": {"parameters": {"weight": [0.0, 1.0]},  # t over the tower's own layers
                             "models": [{"model": p.VA}, {"model": p.VB, "parameters": {"weight": 1.0}}]},
            "multi_modal_projector": {"parameters": {"weight": 0.2},
                                      "models": [{"model": p.VB}, {"model": p.VA, "parameters": {"weight": 0.5}}]}}}),
        # near-parallel inputs: which angles round to 0 decides the fixed point (methods/spherical.py)
        "karcher_near": Case({"merge_method": "karcher", "base_model": p.DB,
                              "models": [{"model": p.DN}, {"model": p.DF}],
                              "parameters": {"max_iter": 20, "tol": 1e-7}, **fp32}),
        "lora_linear": Case(lin((f"{p.LB}+{p.A1}", 0.6), (p.LF, 0.4))),
        "lora_ties": Case({"merge_method": "ties", "base_model": p.LB, "models": [
            {"model": f"{p.LB}+{p.A1}", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": f"{p.LF}+{p.A2}", "parameters": {"weight": 0.5, "density": 0.7}}], **fp32}),
    })
    return out


CASE_NAMES = list(all_cases(Paths()))


# ---------------------------------------------------------------------------------------------
# mergekit's environment


def mergekit_python() -> tuple[str | None, str]:
    """(mergekit's python or None, where it was looked for)."""
    given = os.environ.get("MERGEFORGE_MERGEKIT")
    if given:
        path = Path(given)
        if path.name.startswith("mergekit"):  # the mergekit-yaml script: its environment's python
            path = path.parent / "python"
        return (str(path) if os.access(path, os.X_OK) else None), f"MERGEFORGE_MERGEKIT={given}"
    local = REPO / ".venv-mergekit" / "bin" / "python"
    return (str(local) if os.access(local, os.X_OK) else None), f"{local} (MERGEFORGE_MERGEKIT unset)"


def _unavailable(reason: str):
    if os.environ.get("MERGEFORGE_REQUIRE_ALL") == "1":
        pytest.fail(f"MERGEFORGE_REQUIRE_ALL=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason}; set MERGEFORGE_MERGEKIT to a python with mergekit=={MERGEKIT_VERSION} "
                "(.ci/run builds .venv-mergekit)")


# ---------------------------------------------------------------------------------------------
# checkpoints


@functools.lru_cache(maxsize=16)
def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (cached: read once per comparison; treat as read-only)."""
    out = {}
    for name, file in tensor_files(str(path)).items():
        with safe_open(file, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _tokenizer_model(src: Path, out: Path, tokens: list[str], added: list[str], seed: int) -> str:
    """Model `src` with vocabulary `tokens` (+ `added` special tokens): a token of TOKENS keeps its
    row wherever it sits, a new one gets a fresh random row. Config and tokenizer load in transformers."""
    state = _read_dir(src)
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        x = state[name]
        state[name] = torch.stack([x[TOKENS.index(t)] if t in TOKENS else 0.02 * torch.randn(x.shape[1], generator=g)
                                   for t in tokens + added]).contiguous()
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = make_checkpoints.llama_config({**make_checkpoints.SIZES["tiny"], "vocab_size": len(tokens) + len(added)},
                                        "float32")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out, tokens, added)
    return str(out)


def _lora_family(root: Path, seed: int) -> tuple[str, str, str, str]:
    """A transformers Llama, a fine-tune of it, and two PEFT adapters made on the base."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    peft = pytest.importorskip("peft")

    base = write_causal_lm(root / "base", seed)
    tuned = root / "tuned"
    shutil.copytree(base, tuned)
    g = torch.Generator().manual_seed(seed + 1)
    state = load_file(str(tuned / "model.safetensors"))
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    adapters = []
    for i, config in enumerate([dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "down_proj"])]):
        torch.manual_seed(seed + 10 + i)
        model = AutoModelForCausalLM.from_pretrained(base)
        peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config)).save_pretrained(
            root / f"adapter{i + 1}")
        adapters.append(str(root / f"adapter{i + 1}"))
    return str(base), str(tuned), adapters[0], adapters[1]


def _vl_model(path: Path, seed: int, text_layers: int = 3, vision_layers: int = 4, h: int = 8) -> str:
    """A checkpoint with every tensor mergekit's Qwen2.5-VL definition names (random, small), and a
    config transformers reads (mergekit takes the layer counts from it). Values of the parity models'
    scale (0.02), which ATOL assumes."""
    g = torch.Generator().manual_seed(seed)
    state = {"lm_head.weight": torch.randn(20, h, generator=g),
             "model.embed_tokens.weight": torch.randn(20, h, generator=g), "model.norm.weight": torch.randn(h, generator=g), "visual.merger.ln_q.weight": torch.randn(h, generator=g),
             "visual.patch_embed.proj.weight": torch.randn(h, 6, generator=g)}
    layers = [(f"model.layers.{i}.", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj"],
               ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               ["input_layernorm", "post_attention_layernorm"])
              for i in range(text_layers)]
    layers += [(f"visual.blocks.{i}.", [], ["attn.proj", "attn.qkv", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"],
                ["norm1", "norm2"]) for i in range(vision_layers)]
    layers += [("visual.merger.", [], ["mlp.0", "mlp.2"], [])]
    for prefix, plain, biased, norms in layers:
        for n in plain + biased:
            state[f"{prefix}{n}.weight"] = torch.randn(h, h, generator=g)
        for n in biased:
            state[f"{prefix}{n}.bias"] = torch.randn(h, generator=g)
        for n in norms:
            state[f"{prefix}{n}.weight"] = torch.randn(h, generator=g)
    path.mkdir(parents=True)
    state = {k: 0.02 * v for k, v in state.items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "tie_word_embeddings": False,
        "text_config": {"model_type": "qwen2_5_vl_text", "num_hidden_layers": text_layers, "hidden_size": h,
                        "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": h, "vocab_size": 20},
        "vision_config": {"model_type": "qwen2_5_vl", "depth": vision_layers, "hidden_size": h, "num_heads": 2,
                          "out_hidden_size": h}}))
    return str(path)


# ---------------------------------------------------------------------------------------------
# the batch: checkpoints once, mergekit once


@dataclass
class Batch:
    root: Path
    cases: dict[str, Case]
    recipes: dict[str, Path]
    results: dict[str, dict]
    seconds: float
    import_seconds: float
    version: str
    maxrel: dict[str, float] = field(default_factory=dict)


def _selected(session, module_file: Path) -> list[str]:
    """The cases this session runs (all when none is selected, e.g. the fixture used elsewhere)."""
    names = {item.callspec.params["case"] for item in session.items
             if getattr(item, "path", None) == module_file and hasattr(item, "callspec")}
    return [n for n in CASE_NAMES if n in names] or CASE_NAMES


@pytest.fixture(scope="module")
def batch(request, tmp_path_factory) -> Batch:
    python, where = mergekit_python()
    if python is None:
        _unavailable(f"no mergekit python at {where}")
    seed = fresh_seed()
    root = tmp_path_factory.mktemp("mergekit-parity")
    B, F1, F2, F3 = make_checkpoints.build(str(root / "ckpt"), "tiny", "float32", 3, seed=seed, verbose=False)
    perm = torch.randperm(len(TOKENS), generator=torch.Generator().manual_seed(seed)).tolist()
    tok = root / "tok"
    DB, DF = make_checkpoints.build(str(root / "deep"), DEEP, "float32", 1, seed=seed, verbose=False)
    DN = str(root / "deep" / "near")
    make_checkpoints.write_model(DN, DEEP, 2, seed, "float32", 1 << 30, delta_scale=NEAR)
    p = Paths(B, F1, F2, F3, DB, DF, DN,
              _tokenizer_model(Path(B), tok / "base", TOKENS, [], seed),
              _tokenizer_model(Path(F1), tok / "shuffled", [TOKENS[i] for i in perm] + ["x_a"], ["<extra>"], seed + 1),
              _tokenizer_model(Path(F2), tok / "narrow", TOKENS[:-2] + ["x_b", "x_a"], [], seed + 2),
              *_lora_family(root / "lora", seed),
              _vl_model(root / "vl" / "a", seed), _vl_model(root / "vl" / "b", seed + 1))
    cases = all_cases(p)
    names = _selected(request.session, Path(request.module.__file__))
    recipes, jobs = {}, []
    for name in names:
        d = root / "cases" / name
        d.mkdir(parents=True)
        recipes[name] = d / "recipe.yml"
        recipes[name].write_text(yaml.safe_dump(cases[name].recipe, sort_keys=False))
        jobs.append({"name": name, "recipe": str(recipes[name]), "out": str(d / "mergekit"),
                     "copy_tokenizer": cases[name].tokenizer})
    spec, out = root / "jobs.json", root / "results.json"
    spec.write_text(json.dumps({"lora_merge_cache": str(root / "lora-cache"), "jobs": jobs}))
    env = parity.mk_env()
    env.pop("PYTHONPATH", None)  # nothing of ours on mergekit's path
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(REPO / "bench" / "mergekit_batch.py"), str(spec), str(out)], env=env,
                          capture_output=True, text=True, timeout=BATCH_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"mergekit batch failed (rc {proc.returncode}) with {python}:\n{proc.stderr[-4000:]}", pytrace=False)
    data = json.loads(out.read_text())
    version = data["mergekit_version"]
    print(f"mergekit {version} ({python}): {len(jobs)} cases in {seconds:.1f} s "
          f"(imports {data['import_seconds']:.1f} s)")
    b = Batch(root, cases, recipes, data["results"], seconds, data["import_seconds"], version)
    yield b
    if b.maxrel:
        print("\nmax relative difference per case: " + ", ".join(f"{k} {v:.2g}" for k, v in b.maxrel.items()))


# ---------------------------------------------------------------------------------------------
# comparison


def _vocab(model_dir: Path) -> dict[str, int]:
    """token -> id of a directory's tokenizer.json (model vocabulary and added tokens)."""
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    ids = dict(vocab) if isinstance(vocab, dict) else {piece[0]: i for i, piece in enumerate(vocab)}
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return ids


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _model_dirs(recipe: dict) -> tuple[str | None, list[str]]:
    """(base, other inputs) of a recipe without slices (enough for the tie-break check)."""
    base = recipe.get("base_model")
    return base, [m["model"] for m in recipe.get("models") or [] if m["model"] != base]


def _tied(x: torch.Tensor) -> torch.Tensor:
    """Entries whose value another entry of x shares exactly."""
    flat = x.flatten()
    _, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    return (counts[inverse] > 1).view(x.shape)


def _tie_mask(recipe: dict, name: str) -> torch.Tensor | None:
    """Entries of tensor `name` whose ranking magnitude sits in a tie (see the module docstring)."""
    base, others = _model_dirs(recipe)
    if base is None or not others:
        return None
    read = lambda d: _read_dir(Path(d))[name].float()  # noqa: E731
    b = read(base)
    deltas = [read(d) - b for d in others]
    mask = torch.zeros(b.shape, dtype=torch.bool)
    for d in deltas:
        mask |= _tied(d.abs())
    if len(deltas) > 1:
        mask |= _tied(torch.stack(deltas).var(0, unbiased=False))
    return mask


def compare(ours: Path, mk: Path, case: Case) -> tuple[float, list[str], list[str]]:
    """(max relative difference, failures, notes)."""
    failures, notes = [], []
    fo, fm = tensor_files(str(ours)), tensor_files(str(mk))
    if set(fo) != set(fm):
        failures.append(f"tensor sets differ: only ours {sorted(set(fo) - set(fm))}, "
                        f"only mergekit {sorted(set(fm) - set(fo))}")
    rows = None
    if case.tokenizer:
        vo, vm = _vocab(ours), _vocab(mk)
        if set(vo) != set(vm):
            failures.append(f"vocabularies differ: only ours {sorted(set(vo) - set(vm))}, "
                            f"only mergekit {sorted(set(vm) - set(vo))}")
        else:
            moved = sorted(t for t in vo if vo[t] != vm[t])
            if moved:
                first_new = min(vo[t] for t in moved)
                appended = all(vo[t] >= first_new and vm[t] >= first_new for t in moved)
                if case.union_order_free and appended and {vo[t] for t in moved} == {vm[t] for t in moved}:
                    notes.append(f"union order: {moved} at ids ours {[vo[t] for t in moved]}, "
                                 f"mergekit {[vm[t] for t in moved]}")
                else:
                    failures.append("token ids differ: " + ", ".join(f"{t!r} {vo[t]} vs {vm[t]}" for t in moved))
            order = sorted(vo, key=vo.get)
            rows = torch.tensor([vm[t] for t in order])
    co, cm = _config(ours), _config(mk)
    for key in CONFIG_KEYS:
        if co.get(key) != cm.get(key):
            failures.append(f"config.json {key}: ours {co.get(key)!r}, mergekit {cm.get(key)!r}")
    sparse = any(case.recipe.get("merge_method", "").startswith(m) for m in SPARSIFYING)
    maxrel = 0.0
    allowed_total = 0
    for name in sorted(set(fo) & set(fm)):
        a, b = _read_dir(ours)[name], _read_dir(mk)[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            failures.append(f"{name}: ours {a.dtype} {tuple(a.shape)}, mergekit {b.dtype} {tuple(b.shape)}")
            continue
        a, b = a.float(), b.float()
        if rows is not None and name.endswith(VOCAB_TENSORS):
            n = rows.numel()
            b = torch.cat([b[rows], b[n:]])  # token rows in our order; padding rows stay
        rel = (a - b).abs() / b.abs().clamp(min=ATOL / RTOL)
        rel = rel.nan_to_num(nan=float("inf"))
        bad = rel > RTOL
        if bad.any() and sparse:
            tied = _tie_mask(case.recipe, name)
            if tied is not None:
                allowed = bad & tied
                allowed_total += int(allowed.sum())
                bad &= ~tied
                rel = rel.masked_fill(allowed, 0.0)
        maxrel = max(maxrel, float(rel.max()) if rel.numel() else 0.0)
        if bad.any():
            idx = bad.flatten().nonzero()[0].item()
            failures.append(f"{name}: {int(bad.sum())}/{bad.numel()} entries beyond rtol {RTOL:g} "
                            f"(max rel {float(rel.max()):.3g}; first at flat {idx}: ours {a.flatten()[idx].item()!r}, "
                            f"mergekit {b.flatten()[idx].item()!r})")
    if allowed_total:
        notes.append(f"{allowed_total} entries differ at a magnitude tie (documented tie-break)")
    return maxrel, failures, notes


@pytest.mark.parametrize("case", CASE_NAMES)
def test_matches_mergekit(case, batch):
    from mergekit_ops import merge_file

    assert batch.version == MERGEKIT_VERSION, f"the side environment has mergekit {batch.version!r}"
    result = batch.results[case]
    assert result["ok"], f"mergekit failed on {case}:\n{result['error']}"
    recipe = batch.recipes[case]
    ours = merge_file(recipe, recipe.parent / "ours")
    maxrel, failures, notes = compare(ours, recipe.parent / "mergekit", batch.cases[case])
    batch.maxrel[case] = maxrel
    print(f"{case}: max rel {maxrel:.3g}" + "".join(f"; {n}" for n in notes))
    assert not failures, f"{case} differs from mergekit:\n" + "\n".join(failures)
