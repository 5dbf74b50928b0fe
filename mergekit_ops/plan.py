"""Recipe + checkpoint headers -> the ordered list of output tensors and where their inputs live.

Everything here reads only configs and safetensors headers, so a recipe that cannot work fails
before the first byte of weights is read: missing tensors, shape mismatches (naming both models
and both shapes), architecture and vocabulary mismatches, parameter values out of range.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .arch_modules import modules_of, owner
from .checkpoint import Checkpoint
from .errors import CheckpointError, RecipeError
from .methods.base import REQUIRED, Param
from .params import resolve
from .recipe import Recipe, Source
from .vocab import Tokenizer, VocabPlan, is_vocab_tensor, plan_vocab

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
LM_HEAD = "lm_head.weight"


@dataclass
class TensorTask:
    """One output tensor: its inputs (model index, stored tensor name) and resolved parameters."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[tuple[int, str]]
    base: tuple[int, str] | None
    model_params: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    copy: bool = False  # non-float tensors (buffers): must be equal in every input, copied unchanged
    vocab: bool = False  # rows are tokens: inputs are aligned to the output vocabulary before the merge
    base_model: int | None = None  # checkpoint index of the base model (its rows win in vocabulary gaps)


@dataclass
class MergePlan:
    """The checked, ordered work of one merge."""

    recipe: Recipe
    checkpoints: list[Checkpoint]
    reference: int  # the model whose config and tokenizer the output inherits
    tasks: list[TensorTask]
    num_layers: int | None  # set for slice merges: the output's layer count
    load_dtype: torch.dtype | None  # recipe `dtype`: inputs are rounded to it before the math
    vocab: VocabPlan | None = None  # set with a tokenizer source: the output vocabulary
    layer_counts: dict[str, int] = field(default_factory=dict)  # `modules:` slices: config key -> layers


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def with_layer(name: str, new: int) -> str:
    m = LAYER_RE.search(name)
    return name[:m.start(1)] + str(new) + name[m.end(1):]


def section(name: str) -> int:
    """0 before the layer stack (embeddings), 1 inside it, 2 after it (final norm, lm_head)."""
    if layer_index(name) is not None:
        return 1
    return 2 if ("norm" in name or "lm_head" in name or name.startswith(("ln_f", "transformer.ln_f"))) else 0


def natural_key(name: str) -> tuple:
    layer = layer_index(name)
    return section(name), layer if layer is not None else -1, name


def layer_count(ckpt: Checkpoint) -> int:
    for key in LAYER_COUNT_KEYS:
        if isinstance(ckpt.config.get(key), int):
            return ckpt.config[key]
    found = [i for i in map(layer_index, ckpt.tensors) if i is not None]
    return max(found) + 1 if found else 0


def build_plan(recipe: Recipe, checkpoints: dict[str, Checkpoint], allow_crimes: bool = False) -> MergePlan:
    """Check the inputs against the recipe and lay out every output tensor, reading headers only."""
    refs = list(checkpoints)
    ckpts = [checkpoints[r] for r in refs]
    index = {r: i for i, r in enumerate(refs)}
    reference = index[recipe.base_model] if recipe.base_model else index[recipe.groups()[0][1][0].model]
    _check_compatible(recipe, ckpts, reference, allow_crimes)
    if recipe.tokenizer_source:
        vocab = _plan_vocab(recipe, ckpts, reference, index)
    else:
        vocab = None
        _check_same_token_ids(ckpts, reference)
    load = TORCH_DTYPES[recipe.dtype] if recipe.dtype else None
    if recipe.modules:
        return _plan_modules(recipe, ckpts, index, reference, vocab, load)
    planner = _Planner(recipe, ckpts, index, vocab)
    if recipe.models:
        tasks, num_layers = planner.whole_model(reference), None
    else:
        tasks, num_layers = planner.sliced()
    return MergePlan(recipe, ckpts, reference, tasks, num_layers, load, vocab)


def _plan_modules(recipe: Recipe, ckpts: list[Checkpoint], index: dict[str, int], reference: int,
                  vocab: VocabPlan | None, load: torch.dtype | None) -> MergePlan:
    """A `modules:` recipe: each module planned as a recipe of its own over the tensors it holds
    (arch_modules.py), in the recipe's order; modules it leaves out are not in the output."""
    arch = modules_of(ckpts[reference].config)
    unknown = [name for name in recipe.modules if name not in arch]
    if unknown:
        what = (ckpts[reference].config.get("architectures") or ["this architecture"])[0]
        raise RecipeError(f"{what} has no module '{unknown[0]}'; its modules: {', '.join(arch)}",
                          recipe.source, f"modules.{unknown[0]}")
    single = list(arch) == ["default"]  # one module holding every tensor: a plain recipe, module parameters
    tasks, num_layers, counts = [], None, {}
    for name, module in recipe.modules.items():
        only = None if single else (lambda tensor, name=name: owner(arch, tensor) == name)
        planner = _Planner(module, ckpts, index, vocab, only)
        if module.models:
            tasks += planner.whole_model(reference)
            continue
        module_tasks, layers = planner.sliced()
        tasks += module_tasks
        if single:
            num_layers = layers
        elif arch[name].layers_key:
            counts[arch[name].layers_key] = layers
    # the one module's recipe stands for a single-module model: its slices give the output's layer types
    return MergePlan(recipe.modules["default"] if single else recipe, ckpts, reference, tasks, num_layers, load,
                     vocab, counts)


def _plan_vocab(recipe: Recipe, ckpts: list[Checkpoint], reference: int, index: dict[str, int]) -> VocabPlan:
    source = recipe.tokenizer_source
    out_index = reference if source in ("base", "union") else index[source.removeprefix("model:")]
    limits = []  # token ids past a model's embedding rows (or its config's vocab_size) are unused
    for c in ckpts:
        rows = [t.shape[0] for n, t in c.tensors.items() if is_vocab_tensor(n)]
        configured = c.config.get("vocab_size")
        limits.append(min(rows + ([configured] if isinstance(configured, int) else [])) if rows else 0)
    tokenizers = [Tokenizer.read(c.path, c.ref) for c in ckpts]
    return plan_vocab(source, tokenizers, limits, out_index, recipe.pad_to_multiple_of, [c.ref for c in ckpts],
                      recipe.tokens)


def _check_compatible(recipe: Recipe, ckpts: list[Checkpoint], reference: int, allow_crimes: bool) -> None:
    ref = ckpts[reference]
    for c in ckpts:
        arch, ref_arch = c.config.get("architectures"), ref.config.get("architectures")
        if ref_arch and arch and arch != ref_arch and not allow_crimes:
            raise CheckpointError(
                f"architecture mismatch: '{ref.ref}' is {ref_arch} but '{c.ref}' is {arch} "
                "(allow_crimes / --allow-crimes merges them anyway)")
        vocab, ref_vocab = c.config.get("vocab_size"), ref.config.get("vocab_size")
        if vocab and ref_vocab and vocab != ref_vocab and not recipe.tokenizer_source:
            raise CheckpointError(
                f"vocabulary size mismatch: '{ref.ref}' has {ref_vocab} tokens, '{c.ref}' has {vocab}; "
                "set tokenizer_source (base, union or one of the models) to align their embeddings")


def _check_same_token_ids(ckpts: list[Checkpoint], reference: int) -> None:
    """Without a tokenizer source, rows are merged by index: an id that is one token in one model and
    another token in the next would mix unrelated rows. An id only one model uses (a token added in
    padding rows) is fine."""
    ref_file = ckpts[reference].file("tokenizer.json")
    if ref_file is None:
        return
    ref_bytes, ref_tokens = ref_file.read_bytes(), None
    for c in ckpts:
        file = c.file("tokenizer.json")
        if file is None or file.read_bytes() == ref_bytes:
            continue
        if ref_tokens is None:
            ref_tokens = {i: t for t, i in Tokenizer.read(ckpts[reference].path, ckpts[reference].ref).ids.items()}
        tokens = {i: t for t, i in Tokenizer.read(c.path, c.ref).ids.items()}
        clash = next((i for i in sorted(tokens) if i in ref_tokens and tokens[i] != ref_tokens[i]), None)
        if clash is not None:
            raise CheckpointError(
                f"tokenizers differ: id {clash} is token {ref_tokens[clash]!r} in '{ckpts[reference].ref}' but "
                f"{tokens[clash]!r} in '{c.ref}'; set tokenizer_source (base, union or one of the models) to "
                "align their embeddings")


class _Planner:
    def __init__(self, recipe: Recipe, ckpts: list[Checkpoint], index: dict[str, int], vocab: VocabPlan | None,
                 only: Callable[[str], bool] | None = None):
        self.recipe, self.ckpts, self.index, self.vocab = recipe, ckpts, index, vocab
        self.method = recipe.method
        self.only = only  # a module's tensors (`modules:`); None: every tensor

    def _names(self, ckpt: Checkpoint) -> list[str]:
        return [n for n in ckpt.tensors if self.only is None or self.only(n)]

    def whole_model(self, reference: int) -> list[TensorTask]:
        _, sources, base = self.recipe.groups()[0]
        ref = self.ckpts[reference]
        names = set(self._names(ref))
        layers = [i for i in map(layer_index, names) if i is not None]
        n = layer_count(ref) if self.only is None else (max(layers) + 1 if layers else 0)
        if self.only is None and LM_HEAD not in names and any(
                LM_HEAD in self.ckpts[self.index[s.model]].tensors for s in sources):
            names.add(LM_HEAD)  # some inputs have an untied head: the others contribute their embeddings
        for s in sources:  # a tensor the reference lacks would be dropped from the output unseen
            extra = sorted(set(self._names(self.ckpts[self.index[s.model]])) - names)
            if extra:
                raise CheckpointError(
                    f"model '{s.model}' has tensor '{extra[0]}' but '{ref.ref}', whose tensors the output "
                    f"takes, does not" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        tasks = []
        for name in sorted(names, key=natural_key):
            layer = layer_index(name)
            t = (layer / (n - 1) if n > 1 else 1.0) if layer is not None else 0.0
            tasks.append(self._task(name, [(s, name) for s in sources], base, {}, t))
        return tasks

    def sliced(self) -> tuple[list[TensorTask], int]:
        slices = self.recipe.slices
        layered: list[TensorTask] = []
        out_layer = 0
        for sl in slices:
            base = sl.base_model or self.recipe.base_model
            ref_source = self._slice_reference(sl)
            ref = self.ckpts[self.index[ref_source.model]]
            by_layer: dict[int, list[str]] = {}
            for n in sorted(self._names(ref), key=natural_key):
                by_layer.setdefault(layer_index(n), []).append(n)
            start, end = ref_source.layer_range
            for k in range(end - start):
                names = by_layer.get(start + k)
                if not names:
                    raise CheckpointError(f"model '{ref.ref}' has no layer {start + k} "
                                          f"(slice layer_range {list(ref_source.layer_range)})")
                t = k / (end - start - 1) if end - start > 1 else 1.0
                for name in names:
                    inputs = [(s, with_layer(name, s.layer_range[0] + k)) for s in sl.sources]
                    layered.append(self._task(with_layer(name, out_layer + k), inputs, base, sl.parameters, t))
            out_layer += end - start
        pre, post = (self._edge_tasks(slices[0], 0), self._edge_tasks(slices[-1], 2))
        return pre + layered + post, out_layer

    def _edge_tasks(self, sl, which: int) -> list[TensorTask]:
        """Tensors before (0) or after (2) the layer stack, merged from one slice's sources at t = 0."""
        ref = self.ckpts[self.index[self._slice_reference(sl).model]]
        return [self._task(name, [(s, name) for s in sl.sources], sl.base_model or self.recipe.base_model,
                           sl.parameters, 0.0)
                for name in sorted((n for n in self._names(ref) if section(n) == which), key=natural_key)]

    def _slice_reference(self, sl) -> Source:
        base = sl.base_model or self.recipe.base_model
        return next((s for s in sl.sources if s.model == base), sl.sources[0])

    def _task(self, out_name: str, inputs: list[tuple[Source, str]], base: str | None,
              slice_params: dict, t: float) -> TensorTask:
        method, recipe = self.method, self.recipe
        split_base = method.base != "input" and base is not None
        named = [(s, self.index[s.model], self._tensor_name(self.index[s.model], n)) for s, n in inputs]
        others = [x for x in named if not (split_base and x[0].model == base)]
        base_in = next(((i, n) for s, i, n in named if s.model == base), None) if split_base else None
        ref_idx, ref_name = base_in or others[0][1:]
        info = self.ckpts[ref_idx].tensors[ref_name]
        vocab = self.vocab is not None and is_vocab_tensor(out_name)
        for _, i, n in named:
            self._check_same(info, ref_idx, i, n, vocab)
        if not info.dtype.is_floating_point:
            return TensorTask(out_name, info.shape, info.dtype, [(i, n) for _, i, n in named], None, copy=True)
        shape = (self.vocab.rows, *info.shape[1:]) if vocab else info.shape
        out_dtype_name = recipe.out_dtype or recipe.dtype
        if out_dtype_name:
            out_dtype = TORCH_DTYPES[out_dtype_name]
        else:
            out_dtype = info.dtype
            for _, i, n in named:
                out_dtype = torch.promote_types(out_dtype, self.ckpts[i].tensors[n].dtype)
        scopes = [slice_params, recipe.module_parameters, recipe.parameters]
        model_params = [{p.name: self._value(p, [s.parameters] + scopes, n, t, s.model) for p in method.model_params}
                        for s, _, n in others]
        params = {p.name: self._value(p, scopes, out_name, t, None) for p in method.params}
        if method.check:
            problem = method.check(params, model_params)
            if problem:
                raise RecipeError(f"tensor '{out_name}': {problem}", recipe.source, "parameters")
        return TensorTask(out_name, shape, out_dtype, [(i, n) for _, i, n in others], base_in,
                          model_params, params, vocab=vocab, base_model=self.index[base] if base else None)

    def _value(self, p: Param, scopes: list[dict], tensor: str, t: float, model: str | None):
        """The first scope whose value applies to this tensor wins (a filter list may not apply)."""
        for scope in scopes:
            if p.name in scope:
                raw = resolve(scope[p.name], tensor, t)
                if raw is not None:
                    return p.coerce(raw)
        if p.default is REQUIRED:
            where = f" for model '{model}'" if model else ""
            raise RecipeError(f"no value of '{p.name}'{where} applies to tensor '{tensor}' "
                              "(a filter list without a fallback entry?)", self.recipe.source, f"parameters.{p.name}")
        return p.default

    def _tensor_name(self, idx: int, name: str) -> str:
        """The stored name of a tensor; a missing lm_head of a tied model reads its input embeddings."""
        ckpt = self.ckpts[idx]
        if name in ckpt.tensors:
            return name
        if name == LM_HEAD and ckpt.config.get("tie_word_embeddings", True):
            tied = next((k for k in ckpt.tensors if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
            if tied:
                return tied
        raise CheckpointError(f"model '{ckpt.ref}' has no tensor '{name}' ({ckpt.path})")

    def _check_same(self, ref_info, ref_idx: int, idx: int, name: str, vocab: bool) -> None:
        """Same shape; vocabulary tensors may differ in rows (aligned later), not in the other dims."""
        info = self.ckpts[idx].tensors[name]
        if (info.shape[1:] if vocab else info.shape) != (ref_info.shape[1:] if vocab else ref_info.shape):
            raise CheckpointError(
                f"tensor '{name}': shape {list(info.shape)} in model '{self.ckpts[idx].ref}' but "
                f"{list(ref_info.shape)} in model '{self.ckpts[ref_idx].ref}'")


def output_config(plan: MergePlan) -> dict:
    """The reference model's config.json, with the layer count rewritten for slice merges."""
    config = dict(plan.checkpoints[plan.reference].config)
    if plan.num_layers is not None:
        for key in LAYER_COUNT_KEYS:
            if key in config:
                config[key] = plan.num_layers
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = [t for sl in plan.recipe.slices
                                     for t in config["layer_types"][slice(*sl.sources[0].layer_range)]]
    for key, layers in plan.layer_counts.items():  # a module's stack, e.g. vision_config.depth
        *path, last = key.split(".")
        node = config
        for part in path:  # copies: the reference checkpoint's config stays as read
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[last] = layers
    if plan.vocab is not None:
        config["vocab_size"] = plan.vocab.rows
    dtype = plan.recipe.out_dtype or plan.recipe.dtype
    if dtype:
        config["dtype" if "dtype" in config else "torch_dtype"] = dtype
    return config
