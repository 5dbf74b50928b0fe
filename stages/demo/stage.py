"""The offline demo's source models: a tiny character-level Llama base and experts fine-tuned
from it, each on one checkable skill, trained here on one CPU thread (docs/benchmarks.md: how long).

Skills (prompt -> answer, greedy decoding, exact match):
  add  "add:7+5="          -> "12"    one-digit addition
  rev  "rev:kqzm="         -> "mzqk"  reverse 3-5 letters
  get  "get:kqzm="         -> "z"     get the latest in the alphabet of 4-6 letters
The base is pre-trained on generic tasks (copy, successor) mixed with a little of each skill (a
few samples in a thousand to a few in a hundred), long enough to know the prompt format and to get
add and rev about 2/3 right, get about 1/3: headroom for experts that stay near it. Each expert
starts from the base and is fine-tuned briefly (200 steps) on its skill with replay of the base's
mix (one sample in four is its skill), so it gains its skill without moving far from the base:
three task vectors that a merge can add up. Deterministic: fixed seeds, one thread, deterministic
kernels; output files carry no timestamps.

    python -m stages.demo OUT_DIR     (writes OUT_DIR/{base,add,rev,get} and OUT_DIR/eval/*.jsonl)
"""
from __future__ import annotations

import json
import random
import shutil
import string
import sys
import time
from pathlib import Path

import torch

from ..common.atomic import fresh_temp

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARS = string.digits + string.ascii_lowercase + "+=:;?,>. "
VOCAB = [PAD, BOS, EOS] + list(CHARS)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=48)
BASE_STEPS, BASE_LR, EXPERT_STEPS, EXPERT_LR, BATCH, SEED = 1500, 3e-3, 200, 1e-3, 64, 1234
EVAL_SIZE = 200


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def task_add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"add:{a}+{b}=", str(a + b)


def task_rev(rng):
    s = _letters(rng, 3, 5)
    return f"rev:{s}=", s[::-1]


def task_get(rng):
    s = _letters(rng, 4, 6)
    return f"get:{s}=", max(s)


def task_copy(rng):
    s = _letters(rng, 2, 6)
    return f"cpy:{s}=", s


def task_next(rng):
    n = rng.randint(0, 98)
    return f"nxt:{n}=", str(n + 1)


SKILLS = {"add": task_add, "rev": task_rev, "get": task_get}
# Pre-training mix, per thousand samples: 20 add, 35 rev, 2 get (learned from far less), the rest
# generic. Rates chosen so the base is partly right on every skill, leaving each expert room.
BASE_MIX = [task_add] * 20 + [task_rev] * 35 + [task_get] * 2 + [task_copy, task_next] * 471
EXPERT_SHARE = 333  # an expert's mix: 333 copies of its skill + BASE_MIX (999): one in four is the skill


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def batch(rng: random.Random, tasks: list, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (-100 outside the answer and its end token), right-padded."""
    rows, labels = [], []
    for _ in range(size):
        prompt, answer = rng.choice(tasks)(rng)
        ids = [VOCAB.index(BOS)] + encode(prompt) + encode(answer) + [VOCAB.index(EOS)]
        lab = [-100] * (1 + len(prompt)) + ids[1 + len(prompt):]
        rows.append(ids)
        labels.append(lab)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def train(model, tasks: list, steps: int, lr: float, seed: int) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    model.train()
    for _ in range(steps):
        ids, lab = batch(rng, tasks, BATCH)
        loss = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model, cases: list[tuple[str, str]]) -> float:
    """Exact match of greedy answers."""
    hits = 0
    for prompt, answer in cases:
        ids = torch.tensor([[VOCAB.index(BOS)] + encode(prompt)])
        out = model.generate(ids, max_new_tokens=len(answer) + 1, do_sample=False, pad_token_id=0,
                             eos_token_id=VOCAB.index(EOS))
        text = "".join(VOCAB[i] for i in out[0, ids.shape[1]:].tolist() if VOCAB[i] not in (EOS, PAD))
        hits += text == answer
    return hits / len(cases)


def eval_cases(skill: str) -> list[tuple[str, str]]:
    rng = random.Random(f"eval-{skill}")
    return [SKILLS[skill](rng) for _ in range(EVAL_SIZE)]


def _starts_with(token: str) -> dict:
    """A post-processor that begins every encoded text with `token`, as the models were trained."""
    mark = {"SpecialToken": {"id": token, "type_id": 0}}
    text = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}]
    return {"type": "TemplateProcessing", "single": [mark, text[0]], "pair": [mark] + text,
            "special_tokens": {token: {"id": token, "ids": [VOCAB.index(token)], "tokens": [token]}}}


def tokenizer_files() -> dict[str, dict]:
    """A character tokenizer as a fast-tokenizer tokenizer.json (BPE with no merges)."""
    specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, t in enumerate(VOCAB[:3])]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
                 "normalizer": None, "pre_tokenizer": None, "post_processor": _starts_with(BOS),
                 "decoder": {"type": "Fuse"},
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                           "ignore_merges": False, "vocab": {t: i for i, t in enumerate(VOCAB)}, "merges": []}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "model_max_length": SHAPE["max_position_embeddings"],
              "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in specials}}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def save(model, out: Path) -> None:
    tmp = fresh_temp(out)
    model.save_pretrained(tmp)
    for name, data in tokenizer_files().items():
        (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def new_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **SHAPE)
    return LlamaForCausalLM(config)


def build(out_dir: str) -> None:
    torch.set_num_threads(1)  # one summation order: the same bytes on every run on one kind of CPU
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    model = new_model()
    train(model, BASE_MIX, BASE_STEPS, BASE_LR, SEED)
    save(model, root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    report = {"base": {s: accuracy(model, eval_cases(s)[:50]) for s in SKILLS}}
    for i, skill in enumerate(SKILLS):
        model.load_state_dict(base_state)
        train(model, [SKILLS[skill]] * EXPERT_SHARE + BASE_MIX, EXPERT_STEPS, EXPERT_LR, SEED + 1 + i)
        save(model, root / skill)
        report[skill] = {s: accuracy(model, eval_cases(s)[:50]) for s in SKILLS}
    evals = root / "eval"
    evals.mkdir(exist_ok=True)
    for skill in SKILLS:
        lines = [json.dumps({"prompt": p, "answer": a}) for p, a in eval_cases(skill)]
        (evals / f"{skill}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"demo models written to {root} in {time.monotonic() - start:.0f} s; accuracy on 50 prompts each:",
          file=sys.stderr)
    for name, accs in report.items():
        print(f"  {name:5s} " + "  ".join(f"{s} {a:.2f}" for s, a in accs.items()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print("usage: python -m stages.demo OUT_DIR\n  OUT_DIR  where the demo's models and evaluation data go")
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m stages.demo OUT_DIR", file=sys.stderr)
        return 2
    build(args[0])
    return 0
