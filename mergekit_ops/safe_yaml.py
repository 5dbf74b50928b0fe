"""YAML from strangers, parsed in bounded time and memory.

PyYAML's safe loader runs no code, but it shares an aliased node instead of copying it, so a
few lines of nested aliases (a "billion laughs") stand for billions of values: anything that walks
the result expands them, hangs, and runs out of memory. Deep nesting exhausts Python's stack in
the composer. Both are refused here, while the text is composed and before anything walks it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

MAX_DEPTH = 100  # levels of nesting: a recipe needs a handful
MAX_NODES = 100_000  # values after alias expansion, every use of an alias counted


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader with a bound on nesting depth while composing."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_file(path: str | Path, source: str | None = None) -> list[Any]:
    """Every non-empty document of a YAML file; RecipeError naming `source` (default: the path)."""
    source = source or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read: {exc.strerror or exc}", source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"not UTF-8 text: byte {exc.start} (line {line}) is {data[exc.start]:#04x}",
                          source) from None
    return load_all(text, source)


def load_all(text: str, source: str) -> list[Any]:
    """Every non-empty document of a YAML text, checked for depth and alias expansion first."""
    docs = []
    try:
        loader = _BoundedLoader(text)
    except yaml.YAMLError as exc:  # the reader checks the characters up front
        raise RecipeError(f"invalid YAML: {exc}", source) from None
    try:
        while loader.check_node():
            node = loader.get_node()
            _expanded_size(node, {}, source)
            doc = loader.construct_document(node)
            if doc is not None:
                docs.append(doc)
    except yaml.YAMLError as exc:
        raise RecipeError(f"invalid YAML: {exc}", source) from None
    finally:
        loader.dispose()
    return docs


def _expanded_size(root: yaml.Node, sizes: dict[int, int], source: str) -> int:
    """How many values the node stands for once aliases are copied (each distinct node is sized
    once, so this is linear in the text); refuses cycles and more than MAX_NODES. Depth-first
    without recursion: a node met again while it is being sized is its own ancestor."""
    busy = object()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            kids = _children(node)
            sizes[id(node)] = 1 + sum(sizes[id(k)] for k in kids)
            if sizes[id(node)] > MAX_NODES:
                raise RecipeError(f"invalid YAML: aliases expand to more than {MAX_NODES:,} values "
                                  f"(line {node.start_mark.line + 1})", source)
            continue
        state = sizes.get(id(node))
        if state is busy:
            raise RecipeError(f"invalid YAML: an alias refers to itself (line {node.start_mark.line + 1})", source)
        if state is not None:
            continue
        sizes[id(node)] = busy
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
