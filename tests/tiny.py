"""Tiny Llama-shaped checkpoints for tests, written with the reference safetensors writer."""
from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def fresh_seed() -> int:
    """MERGEFORGE_TEST_SEED when set (to replay a failing draw), else a fresh one; printed either way."""
    value = int(os.environ.get("MERGEFORGE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: {value}")
    return value


def llama_state(layers: int = 3, hidden: int = 8, inter: int = 12, vocab: int = 20, seed: int = 0,
                dtype: torch.dtype = torch.float32, tied: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    state = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": 1 + 0.1 * rnd(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(hidden, hidden),
            p + "self_attn.v_proj.weight": rnd(hidden, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": 1 + 0.1 * rnd(hidden), p + "post_attention_layernorm.weight": 1 + 0.1 * rnd(hidden),
        })
    if not tied:
        state["lm_head.weight"] = rnd(vocab, hidden)
    return state


def finetune(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A 'fine-tune': the base plus small random deltas."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in state.items()}


def write_model(path: Path, state: dict[str, torch.Tensor], shards: int = 1, tied: bool = False,
                vocab: int | None = None, arch: str = "LlamaForCausalLM", extra_config: dict | None = None,
                tokens: list[str] | None = None, added_tokens: list[str] = ()) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    emb = state["model.embed_tokens.weight"]
    config = {"architectures": [arch], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_size": emb.shape[1], "vocab_size": vocab or emb.shape[0], "tie_word_embeddings": tied,
              **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path, tokens or [f"t{i}" for i in range(emb.shape[0])], added_tokens)
    names = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_tokenizer(path: Path, tokens: list[str], added: list[str] = ()) -> None:
    """A whitespace-split WordLevel fast tokenizer: `tokens` get ids 0.., then `added` as special tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    added_tokens = [{"id": len(tokens) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True} for i, t in enumerate(added)]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
            "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": tokens[0]}}
    (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": tokens[0],
         "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added_tokens}}))


def write_family(root: Path, base: dict[str, torch.Tensor], seed: int) -> dict[str, Path]:
    """The base and three fine-tunes of it on disk (the third one sharded), by name: base, m0..m2."""
    paths = {"base": write_model(root / "base", base)}
    for i in range(3):
        paths[f"m{i}"] = write_model(root / f"m{i}", finetune(base, seed + i + 1), shards=2 if i == 2 else 1)
    return paths


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def file_digests(path: Path) -> dict[str, str]:
    """sha256 of every file in a directory, by name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(path).iterdir())}


def tree_digests(root: Path) -> dict[str, str]:
    """Everything under root, recursively: sha256 of each file, 'dir' or the target of each link."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("-> " + str(p.readlink()) if p.is_symlink() else "dir" if p.is_dir()
                    else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def write_recipe(path: Path, recipe: dict | str) -> Path:
    import yaml

    path = Path(path)
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


SPECIALS = ["<pad>", "<s>", "</s>"]


def write_causal_lm(path: Path, seed: int, words: int = 21, layers: int = 2, hidden: int = 16) -> Path:
    """A random transformers Llama that AutoModelForCausalLM and AutoTokenizer load: a whitespace
    word-level tokenizer over <pad> <s> </s> w0..w{words-1} that starts every text with <s>."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokens = SPECIALS + [f"w{i}" for i in range(words)]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is near-uniform; sharper logits make greedy answers vary
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True} for i, t in enumerate(SPECIALS)]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                               "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": None, "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)},
                                       "unk_token": "<pad>"}}
    (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "model_max_length": 64}))
    return path
