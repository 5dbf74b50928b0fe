"""Synthetic Llama-shaped checkpoints for benchmarks and parity checks.

Builds a base model and N fine-tunes (base + small random deltas) as sharded safetensors with a
LlamaForCausalLM config.json that mergekit accepts. Everything is deterministic from the seed: each
tensor is drawn from its own generator seeded from (seed, model index, tensor name), so a model can
be generated tensor by tensor with little memory and the base never has to be kept around.

    python bench/make_checkpoints.py OUT_DIR [--size default|small|tiny] [--dtype bfloat16]
                                     [--finetunes 3] [--seed 0] [--shard-size 1GB]

Writes OUT_DIR/base, OUT_DIR/ft1 .. OUT_DIR/ftN and OUT_DIR/stamp.json; a second run with the same
parameters does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import save_file

# name -> (hidden, intermediate, layers, vocab, heads, kv_heads)
SIZES = {
    # ~0.95B parameters, 1.9 GB per model in bf16 (TinyLlama widths, 16 layers, full MHA)
    "default": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, vocab_size=32000,
                    num_attention_heads=16, num_key_value_heads=16),
    # ~33M parameters
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, vocab_size=8000,
                  num_attention_heads=8, num_key_value_heads=4),
    # for parity checks: a few thousand parameters
    "tiny": dict(hidden_size=16, intermediate_size=40, num_hidden_layers=3, vocab_size=32,
                 num_attention_heads=4, num_key_value_heads=2),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STAMP = "stamp.json"
FORMAT_VERSION = 1

BASE_STD = 0.02      # std of the base weight matrices
DELTA_STD = 0.001    # std of a fine-tune's delta on the weight matrices (5% of the base)
NORM_STD = 0.02      # norms: 1 + N(0, NORM_STD)
NORM_DELTA_STD = 0.002


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint, in HF order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def num_params(cfg: dict) -> int:
    n = 0
    for _, shape in tensor_specs(cfg):
        k = 1
        for s in shape:
            k *= s
        n += k
    return n


def _generator(seed: int, model: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def make_tensor(name: str, shape: tuple[int, ...], model: int, seed: int, dtype: torch.dtype,
                delta_scale: float = 1.0) -> torch.Tensor:
    """Tensor `name` of model `model` (0 = base, k = k-th fine-tune), computed in fp32 then rounded."""
    is_norm = len(shape) == 1
    t = torch.randn(shape, generator=_generator(seed, 0, name), dtype=torch.float32)
    t.mul_(NORM_STD if is_norm else BASE_STD)
    if is_norm:
        t.add_(1.0)
    if model:
        d = torch.randn(shape, generator=_generator(seed, model, name), dtype=torch.float32)
        t.add_(d, alpha=(NORM_DELTA_STD if is_norm else DELTA_STD) * delta_scale)
        del d
    return t.to(dtype) if dtype != torch.float32 else t


def llama_config(cfg: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }


def write_model(out_dir: str, cfg: dict, model: int, seed: int, dtype: str, shard_bytes: int,
                delta_scale: float = 1.0) -> int:
    """Write one model tensor by tensor, one shard in memory at a time. Returns bytes written."""
    tdtype = DTYPES[dtype]
    elem = torch.empty((), dtype=tdtype).element_size()
    specs = tensor_specs(cfg)
    # plan shards first so that the file names (…-of-N) are known up front
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = elem
        for s in shape:
            nbytes *= s
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n = len(shards)
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = make_tensor(name, shape, model, seed, tdtype, delta_scale)
            total += tensors[name].numel() * elem
            weight_map[name] = fname
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(llama_config(cfg, dtype), f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return total


def parse_size(text: str) -> int:
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "K": 10**3, "M": 10**6, "G": 10**9}
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    return int(float(num) * units[t[len(num):]])


def build(out_dir: str, size: str | dict = "default", dtype: str = "bfloat16", finetunes: int = 3,
          seed: int = 0, shard_size: str | int = "1GB", delta_scale: float = 1.0,
          verbose: bool = True) -> list[str]:
    """Build (or reuse) base + `finetunes` fine-tunes under out_dir. Returns absolute model dirs,
    base first."""
    cfg = dict(SIZES[size]) if isinstance(size, str) else dict(size)
    shard_bytes = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    out_dir = os.path.abspath(out_dir)
    names = ["base"] + [f"ft{k}" for k in range(1, finetunes + 1)]
    paths = [os.path.join(out_dir, n) for n in names]
    stamp = {"format": FORMAT_VERSION, "config": cfg, "dtype": dtype, "finetunes": finetunes, "seed": seed,
             "shard_bytes": shard_bytes, "delta_scale": delta_scale,
             "base_std": BASE_STD, "delta_std": DELTA_STD, "norm_std": NORM_STD, "norm_delta_std": NORM_DELTA_STD}
    stamp_path = os.path.join(out_dir, STAMP)
    try:
        with open(stamp_path) as f:
            if json.load(f) == stamp and all(os.path.exists(os.path.join(p, "config.json")) for p in paths):
                if verbose:
                    print(f"checkpoints up to date in {out_dir}", file=sys.stderr)
                return paths
    except (OSError, ValueError):
        pass
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    if verbose:
        print(f"building {len(paths)} models of {num_params(cfg) / 1e6:.1f}M params ({dtype}) in {out_dir}",
              file=sys.stderr)
    for k, path in enumerate(paths):
        t0 = time.perf_counter()
        nbytes = write_model(path, cfg, k, seed, dtype, shard_bytes, delta_scale)
        if verbose:
            print(f"  {names[k]}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f, indent=2)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--finetunes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--delta-scale", type=float, default=1.0, help="multiplies the fine-tune delta std")
    a = p.parse_args(argv)
    for path in build(a.out_dir, a.size, a.dtype, a.finetunes, a.seed, a.shard_size, a.delta_scale):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
