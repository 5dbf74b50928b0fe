"""The evaluation harness: what a suite of conf/eval measures on one model directory.

Suite kinds (each task names a data file per split, or one file split by a seeded share; see
stages/compose/eval_conf.py):
  perplexity   text file, one document per non-empty line: exp(summed token NLL / predicted tokens),
               each document scored from its first token in windows of `max_length` (lower is better)
  exact_match  JSONL of {"prompt", "answer"}: greedy decoding, the answer compared after stripping
               whitespace (higher is better)
  lm_eval      an lm-evaluation-harness task YAML whose dataset is local files (`pip install
               mergeforge[lm-eval]`); the suite's `metric` (e.g. "acc,none") is reported

Models load from safetensors only and without remote code.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from ..common.errors import EvalError
from ..common.metrics import HIGHER_IS_BETTER
from ..common.splits import has_split


def load(model_dir: Path):
    """Model and tokenizer, eval mode; a tokenizer without a pad token pads with its end token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise EvalError(f"{model_dir}: cannot load the model or its tokenizer: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def read_lines(path: Path) -> list[str]:
    try:
        return [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"{path}: {exc}") from None


def read_cases(path: Path) -> list[tuple[str, str]]:
    cases = []
    for i, line in enumerate(read_lines(path), 1):
        try:
            row = json.loads(line)
            cases.append((str(row["prompt"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{path}:{i}: expected a JSON object with 'prompt' and 'answer'") from None
    if not cases:
        raise EvalError(f"{path}: no cases")
    return cases


@torch.no_grad()
def perplexity(model, tok, documents: list[str], max_length: int = 1024, batch_size: int = 16) -> float:
    """exp(sum of token NLLs / number of predicted tokens) over every document."""
    windows = []
    for doc in documents:
        ids = tok(doc)["input_ids"]
        windows += [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
    if not windows:
        raise EvalError("no document has two tokens to score")
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([w + [tok.pad_token_id] * (width - len(w)) for w in chunk])
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in chunk])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        keep = mask[:, 1:].bool()
        nll += token_nll[keep].double().sum().item()
        count += int(keep.sum())
    return math.exp(nll / count)


@torch.no_grad()
def exact_match(model, tok, cases: list[tuple[str, str]], max_new_tokens: int = 32, batch_size: int = 16) -> float:
    """Fraction of prompts whose greedy continuation, up to the end token, is the answer."""
    tok.padding_side = "left"  # generation continues from the last column
    hits = 0
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for row, (_, answer) in zip(out[:, enc["input_ids"].shape[1]:].tolist(), chunk):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            hits += tok.decode(row, skip_special_tokens=True).strip() == answer.strip()
    return hits / len(cases)


def lm_eval_score(model, tok, task_yaml: Path, metric: str, limit: int | None, batch_size: int) -> float:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("suite kind 'lm_eval' needs lm-evaluation-harness: pip install 'mergeforge[lm-eval]'") from None
    task = _yaml_task_name(task_yaml)
    manager = TaskManager(include_path=str(Path(task_yaml).parent))
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), tasks=[task],
                              task_manager=manager, limit=limit, log_samples=False)
    scores = results["results"].get(task, {})
    if metric not in scores:
        raise EvalError(f"{task_yaml}: lm-eval reported no metric '{metric}' (it reported: {', '.join(scores)})")
    return float(scores[metric])


def _yaml_task_name(path: Path) -> str:
    import yaml

    try:
        return str(yaml.safe_load(Path(path).read_text())["task"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise EvalError(f"{path}: an lm-eval task YAML with a 'task' key is needed") from None


def split_items(suite: dict, task: str, split: str, read) -> list:
    """The items of one split of a task, `read` from its file: a one-file task's items shuffled by
    the suite's seed, the first `split.validation` share validation and the rest test, each in file
    order; then the suite's `limit`."""
    data = suite["tasks"][task]
    if "file" not in data:
        return read(data[split])[:suite.get("limit")]
    items = read(data["file"])
    order = list(range(len(items)))
    random.Random(f"{suite['split']['seed']}\0{task}").shuffle(order)
    cut = round(suite["split"]["validation"] * len(items))
    chosen = sorted(order[:cut] if split == "validation" else order[cut:])
    if not chosen:
        raise EvalError(f"{data['file']}: {len(items)} items leave its {split} split empty")
    return [items[i] for i in chosen][:suite.get("limit")]


def run_suite(name: str, suite: dict, model, tok, split: str = "test") -> dict[str, float]:
    """{task: score} for one split of a suite, over the tasks that have that split."""
    kind, scores = suite["kind"], {}
    for task in sorted(t for t in suite["tasks"] if has_split(suite, t, split)):
        if kind == "perplexity":
            docs = split_items(suite, task, split, read_lines)
            scores[task] = perplexity(model, tok, docs, suite["max_length"], suite["batch_size"])
        elif kind == "exact_match":
            cases = split_items(suite, task, split, read_cases)
            scores[task] = exact_match(model, tok, cases, suite["max_new_tokens"], suite["batch_size"])
        elif kind == "lm_eval":
            path = suite["tasks"][task][split]
            scores[task] = lm_eval_score(model, tok, path, suite["metric"], suite.get("limit"), suite["batch_size"])
        else:
            raise EvalError(f"conf/eval/{name}.yaml: key 'kind': one of {', '.join(HIGHER_IS_BETTER)}, got {kind!r}")
    return scores
