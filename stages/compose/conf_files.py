"""What a conf/ file may hold, checked before Hydra reads it and after it composes.

Hydra's YAML loader has no bound on aliases or nesting, and where a file holds the wrong kind of
value its errors name neither the file nor the key (or end in a traceback); OmegaConf resolves
`${a}${a}...` chains of interpolations as eagerly as YAML expands aliases. So every file is read
with mergekit_ops' bounded loader and typed key by key against the schema first, and the
composed config's interpolations are sized before anything resolves them.
"""
from __future__ import annotations

import datetime
import functools
import re
from dataclasses import is_dataclass
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mergekit_ops import load_yaml_file

from ..common.errors import ConfigError
from .schema import Config, EvalSuite, Export, MergeRecipe, ModelSource, PublishTarget, Search

GROUPS = {"models": "models", "merges": "merges", "eval": "suites", "publish": "publish",  # conf dir -> key
          "searches": "searches", "exports": "exports"}
MAX_DEPTH = 32  # levels of nesting in a conf file: a recipe needs a handful; OmegaConf's recursion ends near 90
MAX_RESOLVED = 1_000_000  # values and characters of the composed config with its interpolations resolved
PLAIN = (str, int, float, bool, type(None), datetime.date)  # what a conf value may be (Hydra reads dates as text)
INTERPOLATION = re.compile(r"\$\{(\.*)([\w/-]*(?:\.[\w/-]+)*)\}")  # ${a.b.0.c}, or relative: ${.c}, ${..b}
DEFAULT_RE = re.compile(r"((override|optional) )?/?[\w.-][\w/.-]*(@[\w.-]+)?")  # group@package, as Hydra reads it
SCHEMAS = {"models": ModelSource, "merges": MergeRecipe, "eval": EvalSuite, "publish": PublishTarget,
           "searches": Search, "exports": Export}  # by conf dir


def check_files(conf_dir: Path) -> None:
    """Every YAML file under conf/ (a defaults list may pull in any of them), typed by its schema
    where it has one."""
    for f in sorted(conf_dir.rglob("*.yaml")):
        _check_file(f, Config if f == conf_dir / "config.yaml" else
                   SCHEMAS.get(f.parent.name) if f.parent.parent == conf_dir else None)


def _check_file(path: Path, schema: type | None) -> None:
    """Read a conf file safely before Hydra does: Hydra's loader has no bound on aliases or depth,
    and a file that is not UTF-8 or not one mapping ends in a traceback inside it."""
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"{path}: not a regular file")
    docs = load_yaml_file(path)
    if len(docs) > 1:
        raise ConfigError(f"{path}: one YAML document per file, found {len(docs)}")
    if docs and not isinstance(docs[0], dict):
        raise ConfigError(f"{path}: a mapping of keys to values, got {type(docs[0]).__name__}")
    doc = docs[0] if docs else {}
    _check_plain(doc, path, "", 1)
    _check_defaults(doc.get("defaults", []), path, primary=schema is Config)
    for key, value in doc.items() if schema else ():
        _check_schema(schema, key, value, path)


def _check_defaults(defaults, path: Path, primary: bool) -> None:
    """A defaults list in the forms Hydra parses (Hydra refuses others with a bare ValueError or
    AssertionError that names no file); the primary config's starts with the schema that types all."""
    def entry(v) -> bool:
        return isinstance(v, str) and bool(DEFAULT_RE.fullmatch(v)) and not v.startswith("_self_@")

    if primary and (not isinstance(defaults, list) or defaults[:1] != ["mergeforge_schema"]):
        raise ConfigError(f"{path}: key 'defaults': a list that starts with mergeforge_schema (the schema "
                          "that types every file of conf/)")
    for item in defaults if isinstance(defaults, list) else [None]:
        if isinstance(item, dict) and len(item) == 1:
            (group, choice), = item.items()
            if entry(group) and (choice is None or entry(choice) or isinstance(choice, list)
                                 and all(map(entry, choice))):
                continue
        elif entry(item):
            continue
        raise ConfigError(f"{path}: key 'defaults': config names, or one-key mappings of a group to a "
                          f"name, a list of names or null; got {item!r}")


def _check_schema(schema: type, key: str, value, path: Path) -> None:
    """Type one top-level key of a file by the schema: Hydra types the whole file at once, and
    where a mapping is expected and something else found, its error names neither file nor key."""
    if key in ("defaults", "hydra"):  # Hydra's own
        return
    try:
        OmegaConf.merge(_typed(schema), {key: value})
    except OmegaConfBaseException as exc:
        msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
        raise ConfigError(f"{path}: key '{getattr(exc, 'full_key', None) or key}': {msg}") from None
    _check_items(get_type_hints(schema)[key], value, path, key)


@functools.cache
def _typed(schema: type) -> DictConfig:
    """The schema as a config, made once per run (a merge copies it, never changes it)."""
    return OmegaConf.structured(schema)


def _check_items(hint, value, path: Path, key: str) -> None:
    """OmegaConf types the items of a Dict[str, float] or a List[str] only where they are scalars:
    a mapping or a list there slips through, so look for one."""
    if get_origin(hint) is Union:  # Optional[X]
        hint = next(a for a in get_args(hint) if a is not type(None))
    if is_dataclass(hint) and isinstance(value, dict):
        hints = get_type_hints(hint)
        for k, v in value.items():
            _check_items(hints.get(k), v, path, f"{key}.{k}")
    elif get_origin(hint) in (list, dict) and isinstance(value, (list, dict)):
        item = get_args(hint)[-1]
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            sub = f"{key}.{k}" if isinstance(value, dict) else f"{key}[{k}]"
            if item in PLAIN and isinstance(v, (dict, list)):
                raise ConfigError(f"{path}: key '{sub}': a {item.__name__}, got {type(v).__name__}")
            _check_items(item, v, path, sub)


def _check_plain(value, path: Path, key: str, depth: int) -> None:
    """Every key a name and every value one Hydra can hold, nested at most MAX_DEPTH levels
    (safe_yaml's bound on aliases keeps this walk short)."""
    where = f"{path}: key '{key}'" if key else str(path)
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not (isinstance(k, str) and k.isprintable()):
                raise ConfigError(f"{where}: keys are names (printable text), got {type(k).__name__} {k!r}")
            _check_plain(v, path, f"{key}.{k}" if key else k, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, path, f"{key}[{i}]", depth + 1)
    elif not isinstance(value, PLAIN):
        raise ConfigError(f"{where}: text, a number, true/false, null, a list or a mapping; "
                          f"got {type(value).__name__}")


def check_interpolations(cfg: DictConfig, conf_dir: Path) -> None:
    """Refuse interpolations that blow up when OmegaConf resolves them: `${a}${a}...` over a chain
    of keys is the alias bomb again, and a long chain runs its recursion out. The resolved size and
    depth of each value is computed once, without resolving (as safe_yaml does for aliases);
    a value met again while its own parts are being sized is part of a cycle."""
    root = OmegaConf.to_container(cfg, resolve=False)
    busy, sizes = object(), {}  # path -> (size, depth)
    stack: list[tuple[tuple, tuple | None]] = [((), None)]
    while stack:
        path, parts = stack.pop()
        if parts is not None:  # its parts are sized
            refs, own = parts
            size, depth = own + sum(sizes[r][0] for r in refs), 1 + max((sizes[r][1] for r in refs), default=0)
            if size > MAX_RESOLVED:
                raise ConfigError(f"{where(path, conf_dir)}: resolves to more than {MAX_RESOLVED:,} values and "
                                  "characters (each use of an interpolation counted)")
            if len(path) + depth > 2 * MAX_DEPTH:  # a chain of interpolations counts as nesting
                raise ConfigError(f"{where(path, conf_dir)}: interpolations nest deeper than {2 * MAX_DEPTH} levels")
            sizes[path] = size, depth
        elif sizes.get(path) is busy:
            raise ConfigError(f"{where(path, conf_dir)}: interpolations refer to each other in a cycle")
        elif path not in sizes:
            sizes[path] = busy
            parts = _parts(root, path, conf_dir)
            stack.append((path, parts))
            stack.extend((r, None) for r in parts[0])


def _parts(root: dict, path: tuple, conf_dir: Path) -> tuple[list[tuple], int]:
    """What the value at `path` resolves to: (paths of the values it takes in, size of its own text)."""
    value = _lookup(root, path)
    if isinstance(value, dict):
        return [path + (k,) for k in value], 1
    if isinstance(value, list):
        return [path + (i,) for i in range(len(value))], 1
    if not isinstance(value, str) or "${" not in value:
        return [], max(1, len(str(value)))
    text = INTERPOLATION.sub("", value)
    if "${" in text:  # a resolver or a nested interpolation: its size cannot be known beforehand
        raise ConfigError(f"{where(path, conf_dir)}: interpolations name a value, like ${{merges.soup.seed}} "
                          f"(no resolvers, no nesting); got {value!r}")
    refs = [_target(root, path, dots, name, conf_dir) for dots, name in INTERPOLATION.findall(value)]
    return [r for r in refs if r is not None], max(1, len(text))


def _target(root: dict, path: tuple, dots: str, name: str, conf_dir: Path) -> tuple | None:
    """The path an interpolation at `path` refers to; None where there is no such value (OmegaConf
    says so when it resolves)."""
    if len(dots) > len(path):
        return None
    target = path[:len(path) - len(dots)] if dots else ()
    node = _lookup(root, target)
    for step in filter(None, name.split(".")):
        if isinstance(node, list) and step.isdigit() and int(step) < len(node):
            step = int(step)
        elif not (isinstance(node, dict) and step in node):
            if isinstance(node, str) and "${" in node:  # its size would depend on what that one resolves to
                raise ConfigError(f"{where(path, conf_dir)}: '{name}' reaches into another interpolation "
                                  f"({_dotted(target)}); refer to the value it names instead")
            return None
        node, target = node[step], target + (step,)
    return target


def _lookup(root, path: tuple):
    for step in path:
        root = root[step]
    return root


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def where(path: tuple | str, conf_dir: Path) -> str:
    """The file and key behind a key of the composed config: merges.soup.seed is key 'seed' of
    conf/merges/soup.yaml."""
    key = path if isinstance(path, str) else _dotted(path)
    parts = key.split(".")
    group = {k: d for d, k in GROUPS.items()}.get(parts[0])
    if len(parts) >= 2 and group:
        return f"{conf_dir / group / (parts[1] + '.yaml')}: key '{'.'.join(parts[2:]) or parts[1]}'"
    return f"{conf_dir / 'config.yaml'}" + (f": key '{key}'" if key else "")
