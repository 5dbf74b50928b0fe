"""Vocabulary alignment: merge models whose tokenizers differ (mergekit's `tokenizer_source`).

With a tokenizer source (`base`, `union` or one model), the output vocabulary is that tokenizer's
(for `union`: the base's, then every token the other models add, in model order, then id order;
tokens that are added tokens in a model's tokenizer come after the plain ones, as in mergekit).
Each model's embedding-like tensors (embeddings, lm_head) are permuted into the output order
before the merge method sees them. A token a model lacks gets, in mergekit's order of
rules: the row of the only model that has it; zero if none has it; the base model's row if the base
has it; else the mean of the rows of the models that have it. Rows past the vocabulary (from
`pad_to_multiple_of`) get the mean of the token rows. The recipe's `tokenizer.tokens` give chosen
tokens a row of their own: a model's, another token's of a model, or zeros. Only `tokenizer.json` (fast tokenizers) is
read, as plain JSON: no tokenizer library is needed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import model_file
from .errors import CheckpointError

VOCAB_TENSORS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                 "embed_out.weight", "lm_head.weight")
ADDED_DEFAULTS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSORS)


@dataclass
class Tokenizer:
    """A model's tokenizer.json, as JSON, and the id of every token it can produce."""

    path: Path
    data: dict
    ids: dict[str, int]

    @classmethod
    def read(cls, model_dir: Path, ref: str) -> "Tokenizer":
        path = model_file(model_dir, "tokenizer.json", ref)
        if path is None:
            raise CheckpointError(f"model '{ref}': no tokenizer.json in {model_dir}; aligning vocabularies "
                                  "(tokenizer_source) needs every model's fast tokenizer")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab = data["model"]["vocab"]
            ids = dict(vocab) if isinstance(vocab, dict) else {piece[0]: i for i, piece in enumerate(vocab)}
            ids.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"model '{ref}': {path} is not a tokenizer.json with a model vocabulary "
                                  f"({type(exc).__name__}: {exc})") from exc
        return cls(path, data, ids)


@dataclass
class VocabPlan:
    """The output vocabulary and, per model, where each output row comes from (-1: missing)."""

    source: int  # checkpoint index whose tokenizer the output's starts from
    rows: int  # output rows of every vocabulary tensor (tokens, padded)
    tokens: int  # rows that belong to a token; rows past it are padding
    perms: dict[int, torch.Tensor]  # checkpoint index -> int64 (tokens,) source row or -1
    tokenizer: dict | None  # a tokenizer.json to write (union, or a stripped base), else None: copy the donor's
    added: list[dict]  # tokens appended to the donor's tokenizer (written to tokenizer_config.json too)
    rules: dict[int, TokenRule] = field(default_factory=dict)  # output row -> its configured source


@dataclass(frozen=True)
class TokenRule:
    """A configured token's row (`tokenizer.tokens`): checkpoint `model`'s row `row`, or zeros
    (model None); with `force`, it replaces the rows of models that have the token too."""

    token: str
    model: int | None
    row: int | None
    force: bool


def plan_vocab(source: str, tokenizers: list[Tokenizer], limits: list[int], out_index: int,
               pad_to_multiple_of: int | None, refs: list[str], tokens: dict | None = None) -> VocabPlan:
    """Build the output vocabulary from model `out_index`'s tokenizer (the base for `base` and
    `union`). `limits[i]` is model i's embedding rows: ids past it are unused tokens, missing from
    that model (and stripped from a `base`/`union` output tokenizer, as mergekit does). `tokens`:
    the recipe's per-token sources (recipe.TokenSource by token), added to the vocabulary if new."""
    tokens = tokens or {}
    usable = [{t: i for t, i in tok.ids.items() if i < limit} for tok, limit in zip(tokenizers, limits)]
    strip = source in ("base", "union")  # a model source's tokenizer is taken as it is
    out = dict(usable[out_index] if strip else tokenizers[out_index].ids)
    stripped = strip and len(out) != len(tokenizers[out_index].ids)
    added: list[dict] = []
    if source == "union":
        specs = {t["content"]: t for tok in tokenizers for t in tok.data.get("added_tokens") or []}
        new = [t for ids in usable for t, _ in sorted(ids.items(), key=lambda kv: kv[1]) if t not in out]
        new = list(dict.fromkeys(new))
        for token in [t for t in new if t not in specs] + [t for t in new if t in specs]:
            added.append({"id": len(out), "content": token,
                          **{k: specs.get(token, {}).get(k, v) for k, v in ADDED_DEFAULTS.items()}})
            out[token] = len(out)
    for token in tokens:  # as mergekit's tokenizer.add_tokens: plain added tokens, after the others
        if token not in out:
            added.append({"id": len(out), "content": token, **ADDED_DEFAULTS})
            out[token] = len(out)
    if sorted(out.values()) != list(range(len(out))):
        raise CheckpointError(f"model '{refs[out_index]}': the tokenizer's token ids are not 0..{len(out) - 1} "
                              "without gaps; cannot lay out the merged vocabulary")
    rows = len(out)
    if pad_to_multiple_of:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    order = sorted(out, key=out.get)
    perms = {i: torch.tensor([ids.get(t, -1) for t in order], dtype=torch.int64) for i, ids in enumerate(usable)}
    tokenizer = None
    if added or stripped:
        tokenizer = _stripped(tokenizers[out_index].data, limits[out_index])
        tokenizer["added_tokens"] = (tokenizer.get("added_tokens") or []) + added
    rules = {out[t]: _rule(t, spec, out[t], perms, tokenizers, limits, refs) for t, spec in tokens.items()}
    return VocabPlan(out_index, rows, len(out), perms, tokenizer, added, rules)


def _rule(token: str, spec, out_id: int, perms: dict[int, torch.Tensor], tokenizers: list[Tokenizer],
          limits: list[int], refs: list[str]) -> TokenRule:
    """Where a configured token's row comes from, checked against the model's vocabulary now."""
    if spec.kind == "zero":
        return TokenRule(token, None, None, spec.force)
    model = refs.index(spec.model)
    if spec.kind == "model":
        row = int(perms[model][out_id])
        if row < 0:
            raise CheckpointError(f"tokenizer.tokens: token {token!r} takes its row from model '{spec.model}', "
                                  "whose vocabulary lacks it (use kind: model_token to take another token's row)")
        return TokenRule(token, model, row, spec.force)
    row = spec.token_id if spec.token is None else tokenizers[model].ids.get(spec.token, -1)
    if not 0 <= row < limits[model]:
        what = f"token {spec.token!r}" if spec.token is not None else f"token id {spec.token_id}"
        raise CheckpointError(f"tokenizer.tokens: token {token!r} takes the row of {what} of model '{spec.model}', "
                              f"which its vocabulary ({limits[model]} rows) lacks")
    return TokenRule(token, model, row, spec.force)


def _stripped(data: dict, limit: int) -> dict:
    """A copy of a tokenizer.json without the tokens whose id is past the model's embedding rows."""
    data = json.loads(json.dumps(data))
    model = data["model"]
    if isinstance(model["vocab"], dict):
        dropped = {t for t, i in model["vocab"].items() if i >= limit}
        model["vocab"] = {t: i for t, i in model["vocab"].items() if i < limit}
        if "merges" in model:
            model["merges"] = [m for m in model["merges"]
                               if not set(m.split(" ") if isinstance(m, str) else m) & dropped]
    else:
        model["vocab"] = model["vocab"][:limit]
    data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t["id"] < limit]
    return data


def align(tensors: list[torch.Tensor], perms: list[torch.Tensor], base: int | None, rows: int,
          rules: dict[int, tuple[int | None, int | None, bool]] | None = None) -> list[torch.Tensor]:
    """Permute each model's vocabulary rows into the output order, filling the rows a model lacks.

    `tensors[i]` is read with `perms[i]`; `base` is the position of the base model among them (its
    rows win for tokens some models lack). `rules`: output row -> (position of the model whose row
    it takes, or None for zeros; that row; force) for the recipe's configured tokens, which then
    fill that row of the models that lack it (of all models, forced). Filled rows are computed in float32.
    """
    device = tensors[0].device
    perms = [p.to(device) for p in perms]
    tokens = perms[0].numel()
    present = torch.stack([p >= 0 for p in perms])  # (models, tokens)
    gathered = [x.index_select(0, p.clamp(min=0)) for x, p in zip(tensors, perms)]
    gaps = (~present.all(0)).nonzero().flatten()
    if gaps.numel():
        have = present[:, gaps]
        at_gaps = [g[gaps].float() for g in gathered]
        count = have.sum(0)
        shape = (-1,) + (1,) * (tensors[0].dim() - 1)
        fill = sum(r * h.view(shape) for r, h in zip(at_gaps, have)) / count.clamp(min=1).view(shape)
        if base is not None:
            use_base = have[base] & (count > 1)
            fill[use_base] = at_gaps[base][use_base]
    configured = {row: (tensors[pos][src].float() if pos is not None else tensors[0].new_zeros(tensors[0].shape[1:]),
                        force) for row, (pos, src, force) in (rules or {}).items()}
    out = []
    for i, (x, g) in enumerate(zip(tensors, gathered)):
        full = g.new_empty((rows, *x.shape[1:]))
        full[:tokens] = g
        if gaps.numel():
            missing = ~present[i, gaps]
            full[gaps[missing]] = fill[missing].to(x.dtype)
        for row, (value, force) in configured.items():
            if force or not present[i, row]:
                full[row] = value.to(x.dtype)
        if rows > tokens:
            full[tokens:] = full[:tokens].float().mean(0).to(x.dtype)
        out.append(full)
    return out
