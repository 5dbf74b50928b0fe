"""Offline demo inputs: a tiny Llama-shaped base and two 'experts' derived from it.

Deterministic (fixed seeds, no timestamps), so `dvc repro` on a fresh clone rebuilds the same
bytes that dvc.lock records. Usage: python -m stages.demo_models OUT_DIR
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4, "vocab_size": 256,
         "num_attention_heads": 4, "num_key_value_heads": 4}
EXPERTS = {"expert_a": 1, "expert_b": 2}


def base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            for k, s in sorted(shapes.items())}


def expert_state(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + torch.randn(v.shape, generator=g) * 0.004).to(torch.bfloat16) for k, v in base.items()}


def write(out: Path, state: dict[str, torch.Tensor]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5, **SHAPE}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, out)


def main(out_dir: str) -> None:
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = base_state()
    write(root / "base", base)
    for name, seed in EXPERTS.items():
        write(root / name, expert_state(base, seed))
    print(f"demo checkpoints written to {root}: base, {', '.join(EXPERTS)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.demo_models OUT_DIR")
    main(sys.argv[1])
