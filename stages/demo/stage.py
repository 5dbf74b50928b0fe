"""The offline demo's source models: a tiny character-level Llama base and experts fine-tuned
from it, each on one checkable skill, trained here on one CPU thread (docs/benchmarks.md: how long).

Skills (prompt -> answer, greedy decoding, exact match):
  add  "add:7+5+3="  -> "15"    the sum of three digits
  rev  "rev:kqzm="   -> "mzqk"  reverse 3-5 letters
  get  "get:kqzm="   -> "z"     get the latest in the alphabet of 4-6 letters
Each skill's evaluation prompts (a validation and a test split, disjoint) are drawn first and never
trained on, by the base or any expert: every score measures generalisation, and a search tuned on
the validation split is judged on test prompts nothing has seen. A sum of three digits has 1000
prompts, so 400 held out leave the rest to learn from.
The base is pre-trained on generic tasks (copy, successor) mixed with a little of each skill (a
few samples in a thousand to a few in a hundred), long enough to know the prompt format and to get
each skill partly right: headroom for experts that stay near it. Each expert starts from the base
and is fine-tuned briefly (200 steps) on its skill with replay of the base's mix (one sample in
four is its skill), so it gains its skill without moving far from the base: three task vectors
that a merge can add up. Deterministic: fixed seeds, one thread, deterministic kernels; output
files carry no timestamps.

    python -m stages.demo OUT_DIR
    (writes OUT_DIR/{base,add,rev,get} and OUT_DIR/eval/SKILL.{validation,test}.jsonl)
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
SPLITS = {"validation": 200, "test": 200}  # held-out prompts per skill and split


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def task_add(rng):
    digits = [rng.randint(0, 9) for _ in range(3)]
    return "add:" + "+".join(map(str, digits)) + "=", str(sum(digits))


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


def held_out() -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{skill: {split: cases}}: distinct prompts, drawn before any training and never trained on."""
    out = {}
    for skill, task in SKILLS.items():
        rng, seen, cases = random.Random(f"held-out-{skill}"), set(), []
        while len(cases) < sum(SPLITS.values()):
            prompt, answer = task(rng)
            if prompt not in seen:
                seen.add(prompt)
                cases.append((prompt, answer))
        out[skill], start = {}, 0
        for split, n in SPLITS.items():
            out[skill][split], start = cases[start:start + n], start + n
    return out


_HELD_PROMPTS = {p for splits in held_out().values() for cases in splits.values() for p, _ in cases}


def trained(task):
    """The task with every held-out prompt drawn again."""
    def draw(rng):
        while True:
            prompt, answer = task(rng)
            if prompt not in _HELD_PROMPTS:
                return prompt, answer
    return draw


ADD, REV, GET, COPY, NEXT = map(trained, (task_add, task_rev, task_get, task_copy, task_next))
TRAIN = {"add": ADD, "rev": REV, "get": GET}
# Pre-training mix, per thousand samples: ADD_RATE add, 35 rev, 2 get (learned from far less), the
# rest generic. Rates chosen so the base is partly right on every skill, leaving each expert room.
ADD_RATE = 40
BASE_MIX = [ADD] * ADD_RATE + [REV] * 35 + [GET] * 2 + [COPY, NEXT] * ((1000 - ADD_RATE - 37) // 2)
EXPERT_SHARE = len(BASE_MIX) // 3  # an expert's mix: this many copies of its skill + BASE_MIX: one in four is the skill


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
    held = held_out()
    report = {"base": {s: accuracy(model, held[s]["validation"][:50]) for s in SKILLS}}
    for i, skill in enumerate(SKILLS):
        model.load_state_dict(base_state)
        train(model, [TRAIN[skill]] * EXPERT_SHARE + BASE_MIX, EXPERT_STEPS, EXPERT_LR, SEED + 1 + i)
        save(model, root / skill)
        report[skill] = {s: accuracy(model, held[s]["validation"][:50]) for s in SKILLS}
    evals = root / "eval"
    if evals.exists():  # files of an older layout must not linger
        shutil.rmtree(evals)
    evals.mkdir()
    for skill, splits in held.items():
        for split, cases in splits.items():
            lines = [json.dumps({"prompt": p, "answer": a}) for p, a in cases]
            (evals / f"{skill}.{split}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"demo models written to {root} in {time.monotonic() - start:.0f} s; accuracy on 50 validation "
          "prompts each:", file=sys.stderr)
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
