"""Merging models whose tokenizers differ: tokenizer_source base / union / a model, checked against a
direct per-token computation of mergekit's alignment rules."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ops import merge
from mergekit_ops.errors import CheckpointError, RecipeError
from tiny import finetune, llama_state, write_model, write_recipe

VOCAB = 12
TOKENS = [f"t{i}" for i in range(VOCAB)]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _model(path, base_state, seed, tokens):
    """A fine-tune of the base whose vocabulary is `tokens`: a base token keeps its (fine-tuned) row
    wherever it sits; a new token gets a fresh random row."""
    tuned = finetune(base_state, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for name in VOCAB_TENSORS:
        rows = [tuned[name][TOKENS.index(t)] if t in TOKENS else torch.randn(tuned[name].shape[1], generator=g)
                for t in tokens]
        tuned[name] = torch.stack(rows)
    write_model(path, tuned, tokens=tokens)
    return {name: dict(zip(tokens, tuned[name])) for name in VOCAB_TENSORS}, tuned


@pytest.fixture
def vocab_family(tmp_path, seed):
    base = llama_state(vocab=VOCAB, seed=seed)
    write_model(tmp_path / "base", base)
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed)).tolist()
    models = {"base": ({n: dict(zip(TOKENS, base[n])) for n in VOCAB_TENSORS}, base)}
    models["shuffled"] = _model(tmp_path / "shuffled", base, seed + 1, [TOKENS[i] for i in perm] + ["x_a"])
    models["narrow"] = _model(tmp_path / "narrow", base, seed + 2, TOKENS[:VOCAB - 2] + ["x_b", "x_a"])
    return models


def _expected_rows(models: dict, order: list[str], tensor: str, tokens: list[str], base: str | None):
    """mergekit's rules, one token at a time: own row; else the only holder's; zero if none; the
    base's if it has it; else the mean of the holders'."""
    out = {m: [] for m in order}
    for tok in tokens:
        rows = {m: models[m][0][tensor].get(tok) for m in order}
        holders = [m for m in order if rows[m] is not None]
        if len(holders) == 1:
            default = rows[holders[0]]
        elif not holders:
            default = torch.zeros_like(next(iter(models["base"][0][tensor].values())))
        elif base in holders:
            default = rows[base]
        else:
            default = torch.stack([rows[m] for m in holders]).mean(0)
        for m in order:
            out[m].append(rows[m] if rows[m] is not None else default)
    return {m: torch.stack(v) for m, v in out.items()}


def _merge(tmp_path, body, out="out"):
    recipe = write_recipe(tmp_path / f"{out}.yml", body)
    path = merge(recipe, tmp_path / out)
    return path, load_file(str(path / "model.safetensors"))


def test_union_linear_matches_per_token_computation(tmp_path, vocab_family):
    weights = {"base": 0.2, "shuffled": 0.5, "narrow": 0.3}
    path, out = _merge(tmp_path, {"merge_method": "linear", "tokenizer_source": "union", "models": [
        {"model": str(tmp_path / m), "parameters": {"weight": w}} for m, w in weights.items()]})
    tokens = TOKENS + ["x_a", "x_b"]  # base order, then new tokens by model order and id
    for tensor in VOCAB_TENSORS:
        rows = _expected_rows(vocab_family, list(weights), tensor, tokens, base=None)
        expected = sum(w * rows[m] for m, w in weights.items()) / sum(weights.values())
        torch.testing.assert_close(out[tensor], expected, atol=1e-6, rtol=1e-6)
    plain = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert out["model.norm.weight"].shape == plain["model.norm.weight"].shape
    assert json.loads((path / "config.json").read_text())["vocab_size"] == len(tokens)
    tok = json.loads((path / "tokenizer.json").read_text())
    assert [(t["content"], t["id"]) for t in tok["added_tokens"]] == [("x_a", VOCAB), ("x_b", VOCAB + 1)]


def test_task_arithmetic_with_base_source_prefers_the_base_row(tmp_path, vocab_family):
    lam = 0.7
    path, out = _merge(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "tokenizer_source": "base",
        "parameters": {"lambda": lam},
        "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("shuffled", "narrow")]})
    for tensor in VOCAB_TENSORS:
        rows = _expected_rows(vocab_family, ["base", "shuffled", "narrow"], tensor, TOKENS, base="base")
        expected = rows["base"] + lam * ((rows["shuffled"] - rows["base"]) + (rows["narrow"] - rows["base"]))
        torch.testing.assert_close(out[tensor], expected, atol=1e-5, rtol=1e-5)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == VOCAB
    assert json.loads((path / "tokenizer.json").read_text())["model"]["vocab"] == {t: i for i, t in enumerate(TOKENS)}


def test_a_shuffled_copy_of_the_base_merges_back_to_the_base(tmp_path, seed):
    base = llama_state(vocab=VOCAB, seed=seed)
    write_model(tmp_path / "base", base)
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = dict(base)
    for name in VOCAB_TENSORS:
        shuffled[name] = base[name][perm]
    write_model(tmp_path / "shuffled", shuffled, tokens=[TOKENS[i] for i in perm])
    _, out = _merge(tmp_path, {"merge_method": "linear", "tokenizer_source": "base", "models": [
        {"model": str(tmp_path / "base"), "parameters": {"weight": 0.5}},
        {"model": str(tmp_path / "shuffled"), "parameters": {"weight": 0.5}}]})
    assert all(torch.equal(out[k], base[k]) for k in base)


def test_pad_to_multiple_of_fills_padding_with_the_mean_row(tmp_path, vocab_family):
    path, out = _merge(tmp_path, {
        "merge_method": "linear", "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
        "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("base", "narrow")]})
    tokens = VOCAB + 2
    for tensor in VOCAB_TENSORS:
        assert out[tensor].shape[0] == 16
        torch.testing.assert_close(out[tensor][tokens:], out[tensor][:tokens].mean(0).expand(16 - tokens, -1),
                                   atol=1e-6, rtol=1e-6)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 16


def test_model_source_takes_that_models_vocabulary(tmp_path, vocab_family):
    path, out = _merge(tmp_path, {
        "merge_method": "linear", "tokenizer_source": str(tmp_path / "narrow"),
        "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("base", "narrow")]})
    narrow_tokens = TOKENS[:VOCAB - 2] + ["x_b", "x_a"]
    rows = _expected_rows(vocab_family, ["base", "narrow"], "lm_head.weight", narrow_tokens, base=None)
    torch.testing.assert_close(out["lm_head.weight"], (rows["base"] + rows["narrow"]) / 2, atol=1e-6, rtol=1e-6)
    assert (path / "tokenizer.json").read_bytes() == (tmp_path / "narrow" / "tokenizer.json").read_bytes()


def test_union_tokenizer_loads_in_transformers_and_ids_match_rows(tmp_path, vocab_family):
    transformers = pytest.importorskip("transformers")
    path, _ = _merge(tmp_path, {"merge_method": "linear", "tokenizer_source": "union", "models": [
        {"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("base", "shuffled", "narrow")]})
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    assert tok("t3 x_a x_b")["input_ids"] == [3, VOCAB, VOCAB + 1]
    assert len(tok) == json.loads((path / "config.json").read_text())["vocab_size"]


def test_tokens_past_the_embedding_rows_are_stripped(tmp_path, seed):
    base = llama_state(vocab=VOCAB, seed=seed)
    write_model(tmp_path / "base", base, added_tokens=["<unused>"])  # id VOCAB: no embedding row
    write_model(tmp_path / "other", finetune(base, seed + 1))
    path, out = _merge(tmp_path, {"merge_method": "linear", "tokenizer_source": "base", "models": [
        {"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("base", "other")]})
    assert out["lm_head.weight"].shape[0] == VOCAB
    assert json.loads((path / "tokenizer.json").read_text())["added_tokens"] == []
    assert "added_tokens_decoder" not in json.loads((path / "tokenizer_config.json").read_text())


def test_vocab_errors_name_the_fix(tmp_path, vocab_family):
    models = [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("base", "narrow")]
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": models})
    with pytest.raises(CheckpointError, match="id 10 is token 't10' in .*base.* but 'x_b' in .*narrow.*set tokenizer_source"):
        merge(r, tmp_path / "out")
    shuffled = [{"model": str(tmp_path / "shuffled"), "parameters": {"weight": 1.0}}] + models
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": shuffled})
    with pytest.raises(CheckpointError, match="vocabulary size mismatch.*set tokenizer_source"):
        merge(r, tmp_path / "out")
    (tmp_path / "narrow" / "tokenizer.json").unlink()
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "tokenizer_source": "union", "models": models})
    with pytest.raises(CheckpointError, match="narrow.*no tokenizer.json"):
        merge(r, tmp_path / "out")
    bad = [({"tokenizer": {"source": "union", "tokens": {"x": {"source": "base"}}}}, "tokenizer.tokens"),
           ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
           ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "positive integer"),
           ({"tokenizer": {"sauce": "union"}}, "did you mean 'source'"),
           ({"tokenizer_source": "elsewhere"}, "neither 'base', 'union' nor one of the recipe's models")]
    for extra, pattern in bad:
        r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": models, **extra})
        with pytest.raises(RecipeError, match=pattern):
            merge(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokens_added_in_padding_rows_merge_without_a_tokenizer_source(tmp_path, seed):
    base = llama_state(vocab=VOCAB, seed=seed)
    write_model(tmp_path / "base", base, tokens=TOKENS[:VOCAB - 2])  # two padding rows
    write_model(tmp_path / "chat", finetune(base, seed + 1), tokens=TOKENS[:VOCAB - 2], added_tokens=["<s>", "</s>"])
    _, out = _merge(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("base", "chat")]})
    chat = load_file(str(tmp_path / "chat" / "model.safetensors"))
    torch.testing.assert_close(out["lm_head.weight"], (base["lm_head.weight"] + chat["lm_head.weight"]) / 2)


def test_a_model_source_tokenizer_is_taken_unstripped(tmp_path, seed):
    base = llama_state(vocab=VOCAB, seed=seed)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "chat", finetune(base, seed + 1), added_tokens=["<unused>"])  # id VOCAB: no row
    path, out = _merge(tmp_path, {"merge_method": "linear", "tokenizer_source": str(tmp_path / "chat"), "models": [
        {"model": str(tmp_path / m), "parameters": {"weight": 1.0}} for m in ("base", "chat")]})
    assert (path / "tokenizer.json").read_bytes() == (tmp_path / "chat" / "tokenizer.json").read_bytes()
    assert out["lm_head.weight"].shape[0] == VOCAB + 1  # the unused token's row: the default rule's zero
    assert torch.equal(out["lm_head.weight"][VOCAB], torch.zeros(out["lm_head.weight"].shape[1]))


def test_token_sources_zero_model_model_token_and_force(tmp_path, vocab_family):
    """`tokenizer.tokens`: configured rows fill the models that lack a token (all of them with
    force); unconfigured tokens keep mergekit's rules; a new token is added to the vocabulary."""
    base, shuffled, narrow = (str(tmp_path / m) for m in ("base", "shuffled", "narrow"))
    weights = {"base": 0.2, "shuffled": 0.5, "narrow": 0.3}
    tokens = {"t5": {"source": {"kind": "zero"}},  # every model has it: no effect
              "x_a": {"source": {"kind": "zero"}},  # the base lacks it: zeros there
              "x_b": {"source": {"kind": "model_token", "model": narrow, "token": "t0"}},  # narrow's t0 row
              "t3": {"source": shuffled, "force": True},  # every model takes shuffled's row
              "new": {"source": {"kind": "model_token", "model": base, "token_id": 4}}}  # added, base's t4
    path, out = _merge(tmp_path, {"merge_method": "linear", "tokenizer": {"source": "union", "tokens": tokens},
                                  "models": [{"model": str(tmp_path / m), "parameters": {"weight": w}}
                                             for m, w in weights.items()]})
    order = TOKENS + ["x_a", "x_b", "new"]
    for tensor in VOCAB_TENSORS:
        rows = _expected_rows(vocab_family, list(weights), tensor, order[:-1], base=None)
        own = {m: vocab_family[m][0][tensor] for m in weights}
        for m in weights:
            r = rows[m]
            if "x_a" not in own[m]:
                r[order.index("x_a")] = 0
            if "x_b" not in own[m]:
                r[order.index("x_b")] = own["narrow"]["t0"]
            r[order.index("t3")] = own["shuffled"]["t3"]
            rows[m] = torch.cat([r, own["base"]["t4"][None]])
        expected = sum(w * rows[m] for m, w in weights.items()) / sum(weights.values())
        torch.testing.assert_close(out[tensor], expected, atol=1e-6, rtol=1e-6)
    added = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["content"], t["id"]) for t in added][-1] == ("new", len(order) - 1)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == len(order)


@pytest.mark.parametrize("tokens, error, pattern", [
    ({"t1": {"source": "elsewhere"}}, RecipeError, r"key 'tokenizer\.tokens\.t1\.source'.*not one of the recipe's models"),
    ({"t1": {"source": {"kind": "one"}}}, RecipeError, r"key 'tokenizer\.tokens\.t1\.source\.kind'"),
    ({"t1": {"source": {"kind": "model_token", "model": "BASE"}}}, RecipeError, r"exactly one of 'token' or 'token_id'"),
    ({"t1": {"source": {"kind": "zero"}, "forced": True}}, RecipeError, r"key 'tokenizer\.tokens\.t1\.forced'"),
    ({"x_a": {"source": "BASE"}}, CheckpointError, r"token 'x_a' takes its row from model .*base', whose vocabulary lacks it"),
    ({"t1": {"source": {"kind": "model_token", "model": "BASE", "token_id": VOCAB}}}, CheckpointError,
     rf"token id {VOCAB} of model .*which its vocabulary \({VOCAB} rows\) lacks"),
])
def test_token_source_errors_name_the_token(tmp_path, vocab_family, tokens, error, pattern):
    base = str(tmp_path / "base")
    tokens = json.loads(json.dumps(tokens).replace('"BASE"', json.dumps(base)))
    with pytest.raises(error, match=pattern):
        _merge(tmp_path, {"merge_method": "linear", "tokenizer": {"source": "union", "tokens": tokens},
                          "models": [{"model": base, "parameters": {"weight": 1.0}},
                                     {"model": str(tmp_path / "shuffled"), "parameters": {"weight": 1.0}}]})
    assert not (tmp_path / "out").exists()
