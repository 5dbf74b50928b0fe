"""Before a model's weights are downloaded: can the recipes that use it work?

Reads only config.json and safetensors headers (the hub serves headers by range request) of the
model and of the other models each recipe reads, and compares architecture, vocabulary and every
tensor's name and shape. A merge of a whole-model merge is compared through that merge's
reference model, whose tensors it inherits; a frankenmerge parent, or one that aligns vocabularies,
is skipped (its layout is only known once built), and the merge stage's own checks still run
before any tensor is merged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergekit_ops import Checkpoint, MergeError, Recipe, is_vocab_tensor, parse_recipe

from ..common.errors import FetchError
from ..common.hub import SMALL_FILES, download, read_json, remote_headers, snapshot_dir
from ..common.layout import model_dir

LM_HEAD = "lm_head.weight"


@dataclass
class ModelMeta:
    """What the checks need of a model: its config and {tensor: (dtype, shape)}."""

    name: str
    config: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]


def local_meta(name: str, path: Path) -> ModelMeta:
    try:
        ckpt = Checkpoint.open(str(path))
    except MergeError as exc:
        raise FetchError(f"model '{name}': {exc}") from None
    return ModelMeta(name, ckpt.config, {n: (str(t.dtype), t.shape) for n, t in ckpt.tensors.items()})


def hub_meta(name: str, repo_id: str, sha: str) -> ModelMeta:
    """From the cache if the weights are there, else config.json plus the hub's headers (the small
    files are downloaded into the cached snapshot on the way)."""
    snapshot = snapshot_dir(repo_id, sha)
    if any(snapshot.glob("*.safetensors")):
        try:
            return local_meta(name, snapshot)
        except FetchError:  # an interrupted download (shards missing): ask the hub instead
            pass
    small = download(repo_id, sha, SMALL_FILES)
    config = read_json(small / "config.json") if (small / "config.json").is_file() else {}
    return ModelMeta(name, config, {n: (d, tuple(s)) for n, (d, s) in remote_headers(repo_id, sha).items()})


def meta_of(name: str, params: dict) -> ModelMeta | None:
    """A source model's metadata from wherever it is now: local, fetched, or on the hub."""
    spec = params["models"][name]
    if spec["source"] == "local":
        return local_meta(name, Path(spec["path"])) if Path(spec["path"]).is_dir() else None
    fetched = model_dir(name, params)
    if any(fetched.glob("*.safetensors")):
        return local_meta(name, fetched)
    return hub_meta(name, spec["repo_id"], spec["sha"])


def check_model(name: str, meta: ModelMeta, params: dict) -> None:
    """Check `meta` (model `name`) against the other inputs of every recipe that reads it."""
    metas = {name: meta}
    for merge, spec in params["merges"].items():
        if name not in spec["inputs"] or "recipe" not in spec:  # a search's recipe is known once it has run
            continue
        recipe = parse_recipe(spec["recipe"], f"conf/merges/{merge}.yaml")
        others = {}
        for ref in recipe.model_refs():
            leaf = _leaf(ref, params)
            if leaf is not None and leaf != name:
                if leaf not in metas:
                    try:
                        metas[leaf] = meta_of(leaf, params)
                    except FetchError:  # that model's own fetch reports it; check against the others
                        metas[leaf] = None
                if metas[leaf] is not None:
                    others[ref] = metas[leaf]
        for other in others.values():
            compare(merge, recipe, meta, other)


def _leaf(ref: str, params: dict) -> str | None:
    """The source model whose tensors `ref` has: itself, or a whole-model merge's reference model."""
    seen = set()
    while ref in params["merges"] and ref not in seen:
        seen.add(ref)
        body = params["merges"][ref].get("recipe")
        if body is None or not body.get("models") or body.get("tokenizer_source") or body.get("tokenizer"):
            return None  # a search, a frankenmerge, or a vocabulary of its own: known only once built
        first = body["models"][0]
        ref = body.get("base_model") or (first["model"] if isinstance(first, dict) else first)
    return ref if ref in params["models"] else None


def compare(merge: str, recipe: Recipe, a: ModelMeta, b: ModelMeta) -> None:
    where = f"merge '{merge}' (conf/merges/{merge}.yaml)"
    arch_a, arch_b = a.config.get("architectures"), b.config.get("architectures")
    if arch_a and arch_b and arch_a != arch_b:
        raise FetchError(f"{where}: model '{a.name}' is {arch_a} but '{b.name}' is {arch_b}")
    aligned = recipe.tokenizer_source is not None
    vocab_a, vocab_b = a.config.get("vocab_size"), b.config.get("vocab_size")
    if vocab_a and vocab_b and vocab_a != vocab_b and not aligned:
        raise FetchError(f"{where}: model '{a.name}' has {vocab_a} tokens but '{b.name}' has {vocab_b}; "
                         "set tokenizer_source in the recipe to align their vocabularies")
    if recipe.models:
        for x, y in ((a, b), (b, a)):
            missing = sorted(n for n in x.tensors if n not in y.tensors and n != LM_HEAD)
            if missing:
                raise FetchError(f"{where}: model '{x.name}' has tensor '{missing[0]}' but '{y.name}' does not"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for n in sorted(set(a.tensors) & set(b.tensors)):
        sa, sb = a.tensors[n][1], b.tensors[n][1]
        if aligned and is_vocab_tensor(n):
            sa, sb = sa[1:], sb[1:]
        if tuple(sa) != tuple(sb):
            raise FetchError(f"{where}: tensor '{n}' has shape {list(a.tensors[n][1])} in model '{a.name}' but "
                             f"{list(b.tensors[n][1])} in model '{b.name}'")
