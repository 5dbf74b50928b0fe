"""mergekit-compatible recipe YAML -> validated dataclasses.

Everything that can be checked without touching weights is checked here, and every error names
the recipe file (and document, for multi-document files) and the key at fault.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .methods import METHODS
from .methods.base import REQUIRED, Method
from .params import check_value, values_in
from .safe_yaml import load_file

DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
SLICE_KEYS = ("sources", "parameters", "base_model")
SOURCE_KEYS = ("model", "parameters", "layer_range")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a document name becomes a directory name
TOP_KEYS = {"name", "merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "modules"}


@dataclass
class Source:
    """One input model, with its own parameters, optionally restricted to a layer range."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass
class Slice:
    """An output slice: its sources cover layer ranges of equal length."""

    sources: list[Source]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None


@dataclass
class TokenSource:
    """Where one output token's embedding rows come from (mergekit's `tokenizer.tokens`): a model's
    row of that token, a model's row of another token (`token` or `token_id`), or zeros."""

    kind: str  # "model", "model_token" or "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False  # also replace the rows of models that have the token


@dataclass
class Recipe:
    """One merge: a mergekit document, validated."""

    merge_method: str
    method: Method
    source: str  # "file" or "file (document 'name')" for messages
    models: list[Source] | None = None
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # 'base', 'union' or a model: align vocabularies (vocab.py)
    pad_to_multiple_of: int | None = None  # with a tokenizer source: round the vocabulary rows up
    tokens: dict[str, TokenSource] = field(default_factory=dict)  # with a tokenizer source: per-token rows
    chat_template: str | None = None
    name: str | None = None
    modules: dict[str, "Recipe"] = field(default_factory=dict)  # `modules:`: one recipe per module, by name
    module: str | None = None  # the module this recipe is, in a `modules:` recipe
    module_parameters: dict[str, Any] = field(default_factory=dict)  # a module's: between a slice's and the top

    def groups(self) -> list[tuple[str, list[Source], str | None]]:
        """(key, sources, base) per merge group. With `models:`, a base_model that is not listed is
        appended as one more source (mergekit does the same): methods that merge the base like any
        other model then see it as an input."""
        if self.modules:
            return [group for module in self.modules.values() for group in module.groups()]
        if self.models:
            sources = list(self.models)
            if self.base_model and all(s.model != self.base_model for s in sources):
                sources.append(Source(self.base_model))
            return [("models", sources, self.base_model)]
        return [(f"slices[{i}].sources", sl.sources, sl.base_model or self.base_model)
                for i, sl in enumerate(self.slices)]

    def rename_models(self, mapping: dict[str, str]) -> None:
        """Replace model references found in `mapping` (names of earlier documents, pipeline
        names) by what they stand for, wherever the recipe names a model."""
        def renamed(ref: str | None) -> str | None:  # `document+adapter` too
            if ref is None:
                return None
            model, plus, adapter = ref.partition("+")
            return mapping[model] + plus + adapter if model in mapping else ref

        for source in (self.models or []) + [s for sl in self.slices or [] for s in sl.sources]:
            source.model = renamed(source.model)
        self.base_model = renamed(self.base_model)
        for sl in self.slices or []:
            sl.base_model = renamed(sl.base_model)
        if self.tokenizer_source is not None:
            name = self.tokenizer_source.removeprefix("model:")
            self.tokenizer_source = mapping.get(name, self.tokenizer_source)
        for token in self.tokens.values():
            token.model = renamed(token.model)
        for module in self.modules.values():
            module.rename_models(mapping)

    def model_refs(self) -> list[str]:
        """Every model the recipe reads, first-seen order, base included."""
        if self.modules:
            return list(dict.fromkeys(ref for module in self.modules.values() for ref in module.model_refs()))
        refs = [s.model for s in self.models] if self.models else [s.model for sl in self.slices for s in sl.sources]
        refs += [self.base_model] if self.base_model else []
        refs += [sl.base_model for sl in self.slices or [] if sl.base_model]
        return list(dict.fromkeys(refs))


def load_recipes(path: str | Path) -> list[Recipe]:
    """Load a (possibly multi-document) recipe file. Later documents may name earlier ones as models."""
    path = Path(path)
    docs = load_file(path)
    if not docs:
        raise RecipeError("the file holds no recipe", str(path))
    recipes = []
    for i, doc in enumerate(docs):
        where = str(path) if len(docs) == 1 else f"{path} (document {i + 1})"
        recipes.append(parse_recipe(doc, where))
    return order_documents(recipes, str(path)) if len(recipes) > 1 else recipes


def order_documents(recipes: list[Recipe], source: str) -> list[Recipe]:
    """Dependency order for a multi-document recipe; the final output (the unnamed document, else
    the last one) comes last. Documents refer to each other by `name` wherever a model goes."""
    names = [r.name for r in recipes if r.name]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"document names must be unique, repeated: {', '.join(dupes)}", source, "name")
    unnamed = [r for r in recipes if not r.name]
    if len(unnamed) > 1:
        raise RecipeError("only one document (the final output) may be unnamed", unnamed[1].source, "name")
    final = unnamed[0] if unnamed else recipes[-1]
    by_name = {r.name: r for r in recipes if r.name}
    ordered: list[Recipe] = []
    visiting: list[str] = []

    def visit(r: Recipe) -> None:
        if r in ordered:
            return
        if r.name in visiting:
            cycle = " -> ".join(visiting[visiting.index(r.name):] + [r.name])
            raise RecipeError(f"documents refer to each other in a cycle: {cycle}", source, "name")
        visiting.append(r.name)
        for ref in r.model_refs():
            if ref.partition("+")[0] in by_name:  # a document, perhaps with a LoRA adapter
                visit(by_name[ref.partition("+")[0]])
        visiting.pop()
        ordered.append(r)

    for r in recipes:
        if r is not final:
            visit(r)
    visit(final)
    return ordered


def parse_recipe(doc: Any, source: str) -> Recipe:
    if not isinstance(doc, dict):
        raise RecipeError(f"a recipe is a mapping, got {type(doc).__name__}", source)
    _check_keys(doc, source, "")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(f"unknown key{_suggest(key, TOP_KEYS)}", source, key)
    method_name = doc.get("merge_method")
    if not isinstance(method_name, str):
        raise RecipeError("required, the name of a merge method", source, "merge_method")
    if method_name not in METHODS:
        raise RecipeError(f"unknown merge method '{method_name}'{_suggest(method_name, METHODS)}; "
                          f"known: {', '.join(sorted(METHODS))}", source, "merge_method")
    method = METHODS[method_name]
    given = [k for k in ("models", "slices", "modules") if doc.get(k) is not None]
    if len(given) != 1:
        raise RecipeError("give exactly one of 'models', 'slices' or 'modules'", source, "models")
    recipe = Recipe(
        merge_method=method_name, method=method, source=source,
        base_model=_model_ref(doc.get("base_model"), source, "base_model", optional=True),
        parameters=_params(doc.get("parameters"), source, "parameters"),
        dtype=_dtype(doc.get("dtype"), source, "dtype"),
        out_dtype=_dtype(doc.get("out_dtype"), source, "out_dtype"),
        chat_template=_str(doc.get("chat_template"), source, "chat_template"),
        name=_name(doc.get("name"), source),
    )
    if given == ["models"]:
        recipe.models = _models(doc["models"], source)
    elif given == ["slices"]:
        recipe.slices = _slices(doc["slices"], source)
    else:
        recipe.modules = _modules(doc["modules"], recipe)
    _tokenizer(recipe, doc)
    for module in recipe.modules.values() or [recipe]:
        _check_contract(module)
    return recipe


def _modules(value: Any, recipe: Recipe) -> dict[str, Recipe]:
    """`modules: {NAME: {models | slices, parameters}}`: per module of the architecture (plan.py
    finds which tensors each holds), a recipe of its own with the top level's method, base model
    and settings, its parameters between its slices' and the top level's."""
    source = recipe.source
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) and k for k in value):
        raise RecipeError("a mapping of module name -> {models or slices, parameters}", source, "modules")
    out = {}
    for name, body in value.items():
        key = f"modules.{name}"
        if not isinstance(body, dict):
            raise RecipeError("a mapping with 'models' or 'slices' (and optionally 'parameters')", source, key)
        extra = set(body) - {"models", "slices", "parameters"}
        if extra:
            bad = sorted(extra)[0]
            raise RecipeError(f"unknown key{_suggest(bad, ['models', 'slices', 'parameters'])}", source, f"{key}.{bad}")
        if (body.get("models") is None) == (body.get("slices") is None):
            raise RecipeError("give exactly one of 'models' or 'slices'", source, key)
        module = Recipe(merge_method=recipe.merge_method, method=recipe.method, source=f"{source} (module '{name}')",
                        base_model=recipe.base_model, parameters=recipe.parameters, dtype=recipe.dtype,
                        out_dtype=recipe.out_dtype, chat_template=recipe.chat_template, module=name,
                        module_parameters=_params(body.get("parameters"), source, f"{key}.parameters"))
        if body.get("models") is not None:
            module.models = _models(body["models"], module.source)
        else:
            module.slices = _slices(body["slices"], module.source)
        out[name] = module
    return out


def _check_contract(recipe: Recipe) -> None:
    """Method-level rules: base model, number of inputs, parameter names, types and ranges."""
    method, source = recipe.method, recipe.source
    if method.base == "required" and not recipe.base_model and not any(sl.base_model for sl in recipe.slices or []):
        raise RecipeError(f"{method.name} needs a base_model", source, "base_model")
    for where, group, base in recipe.groups():
        if method.base != "input" and base and all(s.model != base for s in group):
            raise RecipeError(f"base_model '{base}' must be one of this slice's sources", source, where)
        others = [s for s in group if s.model != base] if method.base != "input" else group
        n = len(others)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}" if method.max_models is None
                    else f"{method.min_models} to {method.max_models}")
            extra = " besides the base_model" if method.base != "input" and base else ""
            listed = ", ".join(s.model for s in others)
            raise RecipeError(f"{method.name} takes {want} model(s){extra}, got {n}: {listed}", source, where)
    if recipe.slices:
        for i, sl in enumerate(recipe.slices):
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
            if len(lengths) > 1:
                ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sl.sources)
                raise RecipeError(f"layer ranges in one slice must have equal length: {ranges}",
                                  source, f"slices[{i}].sources")
    scopes = [("parameters", recipe.parameters, True),
              (f"modules.{recipe.module}.parameters", recipe.module_parameters, True)]
    scopes += [(f"slices[{i}].parameters", sl.parameters, True) for i, sl in enumerate(recipe.slices or [])]
    sources = [s for _, group, _ in recipe.groups() for s in group]
    scopes += [(f"{s.model}.parameters", s.parameters, False) for s in sources]
    for where, params, top in scopes:
        for key, value in params.items():
            p = method.param(key, per_model=True) or (method.param(key, per_model=False) if top else None)
            if p is None:
                known = [q.name for q in method.model_params] + ([q.name for q in method.params] if top else [])
                raise RecipeError(f"{method.name} has no {'per-model ' if not top else ''}parameter '{key}'"
                                  f"{_suggest(key, known)}; it takes: {', '.join(known) or 'none'}",
                                  source, f"{where}.{key}")
            for v in values_in(value):
                try:
                    v = p.coerce(v)
                except (TypeError, ValueError) as exc:
                    raise RecipeError(str(exc), source, f"{where}.{key}") from None
                problem = p.check(v) if p.check else None
                if problem:
                    raise RecipeError(f"{key} {problem}", source, f"{where}.{key}")
    given = {**recipe.parameters, **recipe.module_parameters}
    for p in method.params:
        if p.default is REQUIRED and p.name not in given and not any(
                p.name in sl.parameters for sl in recipe.slices or []):
            raise RecipeError(f"{method.name} needs parameter '{p.name}'", source, f"parameters.{p.name}")
    for p in method.model_params:
        if p.default is not REQUIRED or p.name in given:
            continue
        for s in sources:
            if s.model == recipe.base_model and method.base != "unused":
                continue
            if p.name not in s.parameters and not any(p.name in sl.parameters for sl in recipe.slices or []):
                raise RecipeError(f"{method.name} needs parameter '{p.name}' for model '{s.model}'",
                                  source, f"{s.model}.parameters.{p.name}")


def _tokenizer(recipe: Recipe, doc: dict) -> None:
    """`tokenizer_source: X` or mergekit's long form `tokenizer: {source: X, pad_to_multiple_of: N}`."""
    source, key = recipe.source, "tokenizer_source"
    value = _str(doc.get("tokenizer_source"), source, key)
    block = doc.get("tokenizer")
    if block is not None:
        if value is not None:
            raise RecipeError("give 'tokenizer_source' or 'tokenizer', not both", source, "tokenizer")
        if not isinstance(block, dict):
            raise RecipeError("a mapping with 'source' (and optionally 'pad_to_multiple_of')", source, "tokenizer")
        extra = set(block) - {"source", "pad_to_multiple_of", "tokens"}
        if extra:
            bad = sorted(extra)[0]
            raise RecipeError(f"unknown key{_suggest(bad, ['source', 'pad_to_multiple_of', 'tokens'])}", source,
                              f"tokenizer.{bad}")
        key = "tokenizer.source"
        value = _str(block.get("source", "union"), source, key)  # mergekit's default source is union
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise RecipeError(f"expected a positive integer, got {pad!r}", source, "tokenizer.pad_to_multiple_of")
        recipe.pad_to_multiple_of = pad
        recipe.tokens = _tokens(block.get("tokens"), recipe)
    if value not in (None, "base", "union") and value.removeprefix("model:") not in recipe.model_refs():
        raise RecipeError(f"'{value}' is neither 'base', 'union' nor one of the recipe's models", source, key)
    recipe.tokenizer_source = value


def _tokens(value: Any, recipe: Recipe) -> dict[str, TokenSource]:
    """`tokenizer.tokens`: token -> {source: MODEL | {kind: zero} | {kind: model_token, model, token |
    token_id}, force}. Tokens the output vocabulary lacks are added to it."""
    source = recipe.source
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(t, str) and t for t in value):
        raise RecipeError("a mapping of token text -> {source: ..., force: ...}", source, "tokenizer.tokens")
    out = {}
    for token, spec in value.items():
        key = f"tokenizer.tokens.{token}"
        if not isinstance(spec, dict) or set(spec) - {"source", "force"}:
            bad = sorted(set(spec) - {"source", "force"})[0] if isinstance(spec, dict) else None
            raise RecipeError("a mapping with 'source' and optionally 'force'", source, f"{key}.{bad}" if bad else key)
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"true or false, got {force!r}", source, f"{key}.force")
        out[token] = _token_source(spec.get("source"), source, f"{key}.source", recipe)
        out[token].force = force
    return out


def _token_source(spec: Any, source: str, key: str, recipe: Recipe) -> TokenSource:
    if isinstance(spec, dict) and "kind" in spec:
        kind = spec["kind"]
        if kind == "zero" and set(spec) == {"kind"}:
            return TokenSource("zero")
        if kind != "model_token":
            raise RecipeError(f"kind is 'zero' or 'model_token', got {kind!r}", source, f"{key}.kind")
        extra = set(spec) - {"kind", "model", "token", "token_id"}
        if extra:
            raise RecipeError("unknown key", source, f"{key}.{sorted(extra)[0]}")
        token, token_id = spec.get("token"), spec.get("token_id")
        if (token is None) == (token_id is None):
            raise RecipeError("give exactly one of 'token' or 'token_id'", source, key)
        if token is not None and not isinstance(token, str):
            raise RecipeError(f"a token's text, got {token!r}", source, f"{key}.token")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
            raise RecipeError(f"a token id (an integer >= 0), got {token_id!r}", source, f"{key}.token_id")
        model = _model_ref(spec.get("model"), source, f"{key}.model")
        found = TokenSource("model_token", model, token, token_id)
    else:
        found = TokenSource("model", _model_ref(spec, source, key))
    if found.model not in recipe.model_refs():
        raise RecipeError(f"'{found.model}' is not one of the recipe's models; a token's rows come from a model "
                          "the recipe merges", source, key)
    return found


def _models(value: Any, source: str) -> list[Source]:
    if not isinstance(value, list) or not value:
        raise RecipeError("a non-empty list of models", source, "models")
    return [_source(item, source, f"models[{i}]", need_range=False) for i, item in enumerate(value)]


def _slices(value: Any, source: str) -> list[Slice]:
    if not isinstance(value, list) or not value:
        raise RecipeError("a non-empty list of slices", source, "slices")
    out = []
    for i, item in enumerate(value):
        key = f"slices[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
            raise RecipeError("each slice needs a non-empty 'sources' list", source, key)
        extra = set(item) - set(SLICE_KEYS)
        if extra:
            bad = sorted(extra)[0]
            raise RecipeError(f"unknown key{_suggest(bad, SLICE_KEYS)}", source, f"{key}.{bad}")
        out.append(Slice(
            sources=[_source(s, source, f"{key}.sources[{j}]", need_range=True) for j, s in enumerate(item["sources"])],
            parameters=_params(item.get("parameters"), source, f"{key}.parameters"),
            base_model=_model_ref(item.get("base_model"), source, f"{key}.base_model", optional=True),
        ))
    return out


def _source(item: Any, source: str, key: str, need_range: bool) -> Source:
    if isinstance(item, str):
        item = {"model": item}
    if not isinstance(item, dict):
        raise RecipeError("each entry is a mapping with 'model'", source, key)
    extra = set(item) - set(SOURCE_KEYS)
    if extra:
        bad = sorted(extra)[0]
        raise RecipeError(f"unknown key{_suggest(bad, SOURCE_KEYS)}", source, f"{key}.{bad}")
    layer_range = item.get("layer_range")
    if need_range:
        if (not isinstance(layer_range, list) or len(layer_range) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
                or not 0 <= layer_range[0] < layer_range[1]):
            raise RecipeError("needs [start, end] with 0 <= start < end (end exclusive)", source, f"{key}.layer_range")
        layer_range = tuple(layer_range)
    elif layer_range is not None:
        raise RecipeError("layer_range belongs in 'slices' sources", source, f"{key}.layer_range")
    return Source(_model_ref(item.get("model"), source, f"{key}.model"),
                  _params(item.get("parameters"), source, f"{key}.parameters"), layer_range)


def _model_ref(value: Any, source: str, key: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}, lora: ...}
        value = "+".join(_long_path(value[part], source, f"{key}.{part}") for part in ("model", "lora")
                         if value.get(part) is not None)
    if not isinstance(value, str) or not value or "\0" in value:
        raise RecipeError("a model path or hub id (string)", source, key)
    if "+" in value and not Path(value).exists() and (value.count("+") != 1 or not all(value.split("+"))):
        raise RecipeError(f"'{value}': a LoRA reference is MODEL+ADAPTER, one '+' between two non-empty parts",
                          source, key)
    return value


def _long_path(value: Any, source: str, key: str) -> str:
    """`{path: P, revision: R}` (or a plain string) as the short form P@R."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise RecipeError("a mapping with 'path' (and optionally 'revision')", source, key)
    revision = value.get("revision")
    return value["path"] + (f"@{revision}" if revision else "")


def _params(value: Any, source: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError("parameters are a mapping of name: value", source, key)
    for name, v in value.items():
        check_value(v, source, f"{key}.{name}")
    return dict(value)


def _check_keys(value: Any, source: str, key: str) -> None:
    """Every mapping key is a string: YAML also allows numbers, lists and null as keys."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(value, dict) and not isinstance(k, str):
            raise RecipeError(f"keys are names (strings), got {k!r}", source, key or None)
        _check_keys(v, source, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else k)


def _name(value: Any, source: str) -> str | None:
    """A document's name names its output directory: a plain name, never a path."""
    value = _str(value, source, "name")
    if value is not None and not NAME_RE.fullmatch(value):
        raise RecipeError(f"{value!r} is not a plain name (letters, digits, '.', '_', '-'; no path)",
                          source, "name")
    return value


def _dtype(value: Any, source: str, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecipeError(f"expected the name of a dtype, got {value!r}", source, key)
    name = DTYPE_ALIASES.get(value, value)
    if name not in DTYPES:
        raise RecipeError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}", source, key)
    return name


def _str(value: Any, source: str, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RecipeError(f"expected a string, got {value!r}", source, key)
    return value


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
