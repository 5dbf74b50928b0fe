"""How much of the demo's published merge a LoRA adapter over its base keeps, by rank.

For each rank (default 4, 16, 64), the merge is extracted twice (the block weights only, and with
--embeddings lora --norms), and each adapter, applied by PEFT to the base, is compared with the
full merge: adapter size, relative weight error (mean and max over modules, and of the whole
change), the largest logit difference on the validation prompts, and exact-match accuracy on the
test prompts (stages/demo's held-out splits). Prints a markdown table. Needs the demo's artifacts
(`dvc repro`); reads params.yaml for where they lie.

    python bench/lora_rank_error.py [--merge NAME] [--ranks 4,16,64] [--prompts 50]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from mergekit_ops.lora_extract import ADAPTER_WEIGHTS, ExtractOptions, extract_lora  # noqa: E402
from stages.common import layout  # noqa: E402
from stages.demo.stage import BOS, SKILLS, VOCAB, accuracy, encode, held_out  # noqa: E402

VARIANTS = {"blocks": {}, "blocks + embeddings + norms": {"embeddings": "lora", "norms": True}}


def published_merge(params: dict) -> str:
    """The merge the first publish target ships."""
    return next(iter(params["publish"].values()))["model"]


@torch.no_grad()
def prompt_logits(model, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's logits at every position, as the demo feeds prompts (BOS first)."""
    return [model(torch.tensor([[VOCAB.index(BOS)] + encode(p)])).logits[0] for p in prompts]


def test_accuracy(model, cases: dict[str, list]) -> float:
    """Exact match over every skill's test prompts."""
    return sum(accuracy(model, c) * len(c) for c in cases.values()) / sum(len(c) for c in cases.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", help="the merge to extract (default: the published one)")
    parser.add_argument("--ranks", default="4,16,64")
    parser.add_argument("--prompts", type=int, default=50, help="validation prompts per skill for the logits")
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    name = args.merge or published_merge(params)
    merge = REPO / layout.merge_dir(name, params)
    base = REPO / layout.model_dir(params["merges"][name]["recipe"]["base_model"], params)
    held = held_out()
    prompts = [p for s in SKILLS for p, _ in held[s]["validation"][:args.prompts]]
    tests = {s: held[s]["test"] for s in SKILLS}

    full = AutoModelForCausalLM.from_pretrained(merge).eval()
    want = prompt_logits(full, prompts)
    rows = [f"| full merge `{name}` | - | {sum(f.stat().st_size for f in merge.glob('*.safetensors')):,} | - | - | - "
            f"| 0 | {test_accuracy(full, tests):.3f} |"]
    with tempfile.TemporaryDirectory() as work:
        for rank in map(int, args.ranks.split(",")):
            for variant, extra in VARIANTS.items():
                out = Path(work) / f"{variant}-{rank}".replace(" ", "")
                report = extract_lora(str(merge), str(base), out, ExtractOptions(rank=rank, **extra))
                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
                diff = max((g - w).abs().max().item() for g, w in zip(prompt_logits(model, prompts), want))
                s = report["summary"]
                rows.append(f"| {variant} | {rank} | {(out / ADAPTER_WEIGHTS).stat().st_size:,} "
                            f"| {s['mean_relative_error']:.3g} | {s['max_relative_error']:.3g} "
                            f"| {s['total_relative_error']:.3g} | {diff:.3g} | {test_accuracy(model, tests):.3f} |")
                print(rows[-1], file=sys.stderr)  # progress: a row takes a while
    print(f"LoRA extraction of merge `{name}` over `{base.relative_to(REPO)}`; logits: {len(prompts)} validation "
          f"prompts; accuracy: exact match on {sum(map(len, tests.values()))} test prompts\n")
    print("| adapter | rank | bytes | mean rel. error | max rel. error | whole-change error | max abs logit diff "
          "| test accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
