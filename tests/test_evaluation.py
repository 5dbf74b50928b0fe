"""The evaluation harness agrees with direct computations on a tiny random model: perplexity from
summed token NLL, exact match from an unbatched greedy loop."""
import json
import math
import random

import pytest
import torch

from stages.common.errors import EvalError
from stages.evaluate.suites import exact_match, load, perplexity, read_cases, run_suite
from tiny import write_causal_lm


@pytest.fixture
def lm(tmp_path, seed):
    return load(write_causal_lm(tmp_path / "lm", seed))


def _docs(rng, n, lo=1, hi=30):
    return [" ".join(f"w{rng.randrange(21)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@torch.no_grad()
def _direct_perplexity(model, tok, docs, max_length):
    nll, count = 0.0, 0
    for doc in docs:
        ids = tok(doc)["input_ids"]
        for start in range(0, len(ids), max_length):
            window = torch.tensor(ids[start:start + max_length])
            if len(window) < 2:
                continue
            logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            nll -= logp[torch.arange(len(window) - 1), window[1:]].sum().item()
            count += len(window) - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("max_length", [64, 7])
def test_perplexity_is_exp_of_summed_token_nll(lm, seed, max_length):
    model, tok = lm
    docs = _docs(random.Random(seed), 9)
    got = perplexity(model, tok, docs, max_length=max_length, batch_size=4)
    assert got == pytest.approx(_direct_perplexity(model, tok, docs, max_length), rel=1e-5)


@torch.no_grad()
def _greedy(model, tok, prompt, steps):
    ids = tok(prompt)["input_ids"]
    out = []
    for _ in range(steps):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_exact_match_scores_greedy_answers_in_padded_batches(lm, seed):
    model, tok = lm
    rng = random.Random(seed)
    cases, expected = [], 0
    for prompt in _docs(rng, 12, 1, 6):  # prompts of different lengths share left-padded batches
        answer = _greedy(model, tok, prompt, 3)
        right = rng.random() < 0.5
        expected += right
        cases.append((prompt, answer if right else answer + " w99"))
    assert exact_match(model, tok, cases, max_new_tokens=3, batch_size=5) == pytest.approx(expected / len(cases))


def test_suite_scores_each_task_from_its_file(tmp_path, lm, seed):
    model, tok = lm
    rng = random.Random(seed)
    docs = _docs(rng, 5)
    (tmp_path / "text.txt").write_text("\n\n".join(docs) + "\n")
    prompts = _docs(rng, 4, 1, 4)
    answers = [_greedy(model, tok, p, 2) for p in prompts[:3]] + ["w99"]  # the 4th is wrong, past the limit
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                                               for p, a in zip(prompts, answers)))
    ppl = run_suite("lm", {"kind": "perplexity", "tasks": {"text": {"test": str(tmp_path / "text.txt")}}, "max_length": 64,
                           "batch_size": 2}, model, tok)
    assert ppl == {"text": pytest.approx(_direct_perplexity(model, tok, docs, 64), rel=1e-5)}
    em = run_suite("qa", {"kind": "exact_match", "tasks": {"qa": {"test": str(tmp_path / "qa.jsonl")}}, "max_new_tokens": 2,
                          "batch_size": 3, "limit": 3}, model, tok)
    assert em == {"qa": 1.0}


def test_bad_case_line_is_named(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "no answer"}\n')
    with pytest.raises(EvalError, match=r"qa\.jsonl:2: expected a JSON object with 'prompt' and 'answer'"):
        read_cases(path)


def test_pickle_only_model_is_not_loaded(tmp_path, seed):
    path = write_causal_lm(tmp_path / "lm", seed)
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(EvalError, match="cannot load the model"):
        load(path)


@pytest.mark.slow
def test_lm_eval_task_from_local_files_matches_choice_loglikelihoods(tmp_path, lm, seed, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    model, tok = lm
    rng = random.Random(seed)
    rows = [{"prompt": _docs(rng, 1, 2, 5)[0], "choices": _docs(rng, 3, 1, 2), "label": rng.randrange(3)}
            for _ in range(12)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tiny_mc.yaml"
    task.write_text(f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{prompt}}'\n"
                    "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")

    @torch.no_grad()
    def loglikelihood(context, choice):  # lm-eval's convention: the tokenizer's own BOS, " " before the choice
        whole, ctx = tok(context + " " + choice)["input_ids"], tok(context)["input_ids"]
        cont = whole[len(ctx):]
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))

    expected = sum(max(range(3), key=lambda i: loglikelihood(r["prompt"], r["choices"][i])) == r["label"]
                   for r in rows) / len(rows)
    suite = {"kind": "lm_eval", "tasks": {"mc": {"test": str(task)}}, "metric": "acc,none", "batch_size": 4}
    assert run_suite("mc", suite, model, tok) == {"mc": pytest.approx(expected)}
    with pytest.raises(EvalError, match="reported no metric 'f1,none'"):
        run_suite("mc", suite | {"metric": "f1,none"}, model, tok)


def test_one_file_splits_by_its_share_and_seed_into_disjoint_validation_and_test(tmp_path, seed):
    from stages.evaluate.suites import read_lines, split_items

    rng = random.Random(seed)
    lines = [f"doc {i} {rng.random()}" for i in range(rng.randint(10, 200))]
    (tmp_path / "all.txt").write_text("\n".join(lines) + "\n")
    share = rng.uniform(0.1, 0.9)
    suite = {"kind": "perplexity", "tasks": {"t": {"file": str(tmp_path / "all.txt")}},
             "split": {"validation": share, "seed": seed}}
    val, test = (split_items(suite, "t", s, read_lines) for s in ("validation", "test"))
    assert len(val) == round(share * len(lines)) and sorted(val + test) == sorted(lines) and not set(val) & set(test)
    assert val == [x for x in lines if x in set(val)]  # file order kept
    assert split_items(suite, "t", "validation", read_lines) == val  # the same on every run
    other = dict(suite, split={"validation": share, "seed": seed + 1})
    assert split_items(other, "t", "validation", read_lines) != val or len(val) in (0, len(lines))
