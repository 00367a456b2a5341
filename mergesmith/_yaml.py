"""Safe YAML loading that remembers the line of every mapping key and list item."""

from __future__ import annotations

from typing import Any

import yaml


class LinedDict(dict[str, Any]):
    """A dict that knows the 1-based line of each of its keys in the YAML source."""

    lines: dict[str, int]
    line: int


class LinedList(list[Any]):
    """A list that knows the 1-based line of each of its items in the YAML source."""

    lines: list[int]
    line: int


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LinedDict:
    loader.flatten_mapping(node)
    out = LinedDict()
    out.lines = {}
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LinedList:
    out = LinedList(loader.construct_object(child, deep=True) for child in node.value)
    out.lines = [child.start_mark.line + 1 for child in node.value]
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load(text: str) -> Any:
    """Parse YAML with safe constructors only; mappings and lists carry line numbers."""
    return yaml.load(text, Loader=_Loader)


def line_of(container: Any, key: str | int) -> int | None:
    """The line of ``key`` (a dict key or list index) in ``container``, when known."""
    if isinstance(container, LinedDict) and isinstance(key, str):
        return container.lines.get(key)
    if isinstance(container, LinedList) and isinstance(key, int) and 0 <= key < len(container):
        return container.lines[key]
    return None
