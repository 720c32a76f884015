"""YAML for configs and sequences, with limits: a file a user hands over cannot exhaust memory or the stack, and
what it means is what it looks like.

PyYAML's `safe_load` builds no objects from tags, but it follows aliases (a "billion laughs" file of 1 KB expands
to gigabytes once validated or dumped), composes nested collections recursively (5,000 levels: RecursionError),
keeps the last of duplicate keys silently, and reads YAML 1.1 booleans (`mode: off` becomes False). Here:

* the text is at most `MAX_YAML_BYTES`;
* nesting is checked on the event stream (iterative) before anything is composed: at most `MAX_DEPTH` levels;
* the composed tree, counted with every alias expanded (memoised, so counting is linear), has at most
  `MAX_NODES` nodes;
* a mapping with a duplicate key is an error naming the key and line;
* only true/false (any case) are booleans, as in YAML 1.2: `off`, `no`, `on`, `yes` stay text.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from acquire_refocus.errors import ConfigError

MAX_YAML_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _bool_12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() == "true"


_Loader.add_constructor("tag:yaml.org,2002:bool", _bool_12)


def _check_depth(text: str, source: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                where = f" (line {event.start_mark.line + 1})" if event.start_mark is not None else ""
                raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep{where}")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


_IN_PROGRESS = -1


class _RecursiveAliasError(Exception):
    """An alias inside the collection it names (&a [*a]): a structure without end."""


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes of the tree under `node` with every alias expanded; an alias is the same Node object again, so each
    distinct node is counted once and its expanded size reused (depth is bounded by `_check_depth`)."""
    known = memo.get(id(node))
    if known == _IN_PROGRESS:
        raise _RecursiveAliasError
    if known is not None:
        return known
    memo[id(node)] = _IN_PROGRESS
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_nodes(item, memo) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def load_yaml(text: str, source: str) -> Any:
    """The data of a YAML (or JSON) text within the limits above; ConfigError naming `source` otherwise."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {size:,} bytes; a config or sequence file is at most {MAX_YAML_BYTES:,}")
    try:
        _check_depth(text, source)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            try:
                nodes = _expanded_nodes(node, {})
            except _RecursiveAliasError:
                raise ConfigError(
                    f"{source}: an alias (*name) inside the value it names; such a value never ends"
                ) from None
            if nodes > MAX_NODES:
                raise ConfigError(
                    f"{source}: {nodes:,} values once its aliases (*name) are expanded; at most "
                    f"{MAX_NODES:,} are accepted"
                )
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
