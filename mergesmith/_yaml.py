"""Safe, bounded YAML loading that remembers the line of every mapping key and list item.

A config is refused with a :class:`~mergesmith.errors.ConfigError` naming the file, the line and
a fix before it can cost much time or memory: a file over :data:`MAX_BYTES`, text that is not
UTF-8, a key given twice in one mapping, nesting deeper than :data:`MAX_DEPTH`, aliases that
expand to more than :data:`MAX_NODES` values or :data:`MAX_CHARS` characters, and integers of
more than :data:`MAX_DIGITS` digits.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mergesmith._text import printable
from mergesmith.errors import ConfigError

__all__ = [
    "LinedDict",
    "LinedList",
    "excerpt",
    "line_of",
    "load",
    "load_all",
    "load_file",
    "read_file",
    "read_text",
    "shown",
]

MAX_BYTES = 1 << 20  # a merge or tune config is a few kilobytes
MAX_DEPTH = 64
MAX_NODES = 100_000  # values after aliases are expanded
MAX_CHARS = 1 << 20  # characters of scalar text after aliases are expanded
MAX_DIGITS = 100
EXCERPT = 40

_MERGE_TAG = "tag:yaml.org,2002:merge"


class LinedDict(dict[str, Any]):
    """A dict that knows the 1-based line of each of its keys in the YAML source."""

    lines: dict[str, int]
    line: int


class LinedList(list[Any]):
    """A list that knows the 1-based line of each of its items in the YAML source."""

    lines: list[int]
    line: int


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """``text`` quoted, escaped for the terminal and cut to ``limit`` characters."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return f"'{printable(cut)}'"


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as a short Python literal for a message: long text and lists cut, control
    characters escaped, never the whole of a large value."""
    if isinstance(value, str):
        text = repr(value[:limit]) + ("..." if len(value) > limit else "")
    elif isinstance(value, list):
        items = [shown(v, 20) if not isinstance(v, (dict, list)) else "[...]" for v in value[:4]]
        text = "[" + ", ".join(items + (["..."] if len(value) > 4 else [])) + "]"
    elif isinstance(value, dict):
        text = "{...}" if value else "{}"
    else:
        text = repr(value)
        text = text if len(text) <= limit else text[:limit] + "..."
    return printable(text)


class _Refused(Exception):
    """Raised inside the constructors; :func:`load` turns it into a ConfigError naming the file."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Constructing:
    """The constructors shared by the pure-Python and the libyaml loaders."""

    def construct_lined_mapping(self, node: yaml.MappingNode) -> LinedDict:
        loader: Any = self
        explicit = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
        loader.flatten_mapping(node)
        merged = len(node.value) - explicit  # flatten_mapping puts merged entries first
        out = LinedDict()
        out.lines = {}
        out.line = node.start_mark.line + 1
        given: set[str] = set()
        for i, (key_node, value_node) in enumerate(node.value):
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            line = key_node.start_mark.line + 1
            if i >= merged:
                if key in given:
                    raise _Refused(
                        line,
                        f"key {excerpt(key)} is given twice in one mapping, on line {out.lines[key]} "
                        f"and line {line}; keep one of them",
                    )
                given.add(key)
            out[key] = loader.construct_object(value_node, deep=True)
            out.lines[key] = line
        return out

    def construct_lined_sequence(self, node: yaml.SequenceNode) -> LinedList:
        loader: Any = self
        out = LinedList(loader.construct_object(child, deep=True) for child in node.value)
        out.lines = [child.start_mark.line + 1 for child in node.value]
        out.line = node.start_mark.line + 1
        return out

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(c.isdigit() for c in str(node.value))
        line = node.start_mark.line + 1
        too_long = (
            f"the integer {excerpt(str(node.value))} has more than {MAX_DIGITS} digits; "
            "write a number of ordinary size"
        )
        if digits > MAX_DIGITS:
            raise _Refused(line, too_long)
        try:
            value: int = yaml.SafeLoader.construct_yaml_int(self, node)  # type: ignore[arg-type]
        except ValueError:
            raise _Refused(line, f"cannot read {excerpt(str(node.value))} as an integer") from None
        if abs(value) >= 10**MAX_DIGITS:
            raise _Refused(line, too_long)
        return value

    def construct_checked_timestamp(self, node: yaml.ScalarNode) -> datetime.date:
        try:
            value: datetime.date = yaml.SafeLoader.construct_yaml_timestamp(self, node)  # type: ignore[arg-type]
        except (ValueError, OverflowError):
            raise _Refused(
                node.start_mark.line + 1,
                f"{excerpt(str(node.value))} looks like a date but is not one; quote it to make it text",
            ) from None
        return value


class _Loader(_Constructing, yaml.SafeLoader):
    pass


_LOADERS: list[type[Any]] = [_Loader]
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(_Constructing, yaml.CSafeLoader):
        pass

    _LOADERS.insert(0, _CLoader)

for _cls in _LOADERS:
    _cls.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _cls.construct_lined_mapping)
    _cls.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _cls.construct_lined_sequence)
    _cls.add_constructor("tag:yaml.org,2002:int", _cls.construct_bounded_int)
    _cls.add_constructor("tag:yaml.org,2002:timestamp", _cls.construct_checked_timestamp)
_LOADER = _LOADERS[0]


def read_file(path: Path) -> str:
    """The text of the config file at ``path``: a ConfigError when there is none, else as
    :func:`read_text` reads it."""
    try:
        found = path.is_file()
    except OSError:  # a name the file system refuses (too long)
        found = False
    if not found:
        raise ConfigError(f"config file {excerpt(str(path), 200)} does not exist")
    return read_text(path)


def read_text(path: Path, *, what: str = "config") -> str:
    """The text of the YAML file at ``path``, refused when larger than :data:`MAX_BYTES` or
    not UTF-8."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(
                f"{printable(str(path))}: {size:,} bytes, more than the {MAX_BYTES:,} (1 MiB) a {what} "
                f"file may have; a {what} is a few kilobytes of YAML: check that this is the right file"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {printable(str(path))}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:  # grew while read
        raise ConfigError(
            f"{printable(str(path))}: more than the {MAX_BYTES:,} bytes (1 MiB) a {what} file may have"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 8]
        raise ConfigError(
            f"{printable(str(path))}: not UTF-8 text at byte {exc.start} ({bad!r}); save the {what} as UTF-8"
        ) from None


def load_file(path: Path, *, what: str = "config") -> Any:
    """:func:`read_text` then :func:`load`, errors naming ``path``."""
    return load(read_text(path, what=what), where=str(path))


def load(text: str, *, where: str = "<config>", several: str = "keep one document") -> Any:
    """Parse YAML with safe constructors only; mappings and lists carry line numbers.

    Every refusal is a :class:`ConfigError` naming ``where`` and the line; ``several`` is the fix
    given for text holding more than one YAML document."""
    place = printable(where)
    if len(text) > MAX_BYTES:
        raise ConfigError(
            f"{place}: {len(text):,} characters, more than the {MAX_BYTES:,} (1 MiB) a config may have"
        )
    with _refusals(place, several):
        _check_events(text)  # the composer recurses once per level: bound it first
        loader = _LOADER(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_size(node, text)
            return loader.construct_document(node)
        finally:
            loader.dispose()


def load_all(text: str, *, where: str = "<config>") -> list[Any]:
    """Every document of a YAML stream (documents separated by ``---``), each read as :func:`load`
    reads one: the same safe constructors, line numbers and bounds, the bounds on size, nesting and
    values applying to the whole text. An empty document is None."""
    place = printable(where)
    if len(text) > MAX_BYTES:
        raise ConfigError(
            f"{place}: {len(text):,} characters, more than the {MAX_BYTES:,} (1 MiB) a config may have"
        )
    docs: list[Any] = []
    with _refusals(place):
        _check_events(text)
        loader = _LOADER(text)
        try:
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    docs.append(None)
                    continue
                _check_size(node, text)
                docs.append(loader.construct_document(node))
        finally:
            loader.dispose()
    return docs


@contextmanager
def _refusals(place: str, several: str = "") -> Iterator[None]:
    """Turn what reading YAML can raise into a ConfigError naming ``place`` and the line;
    ``several`` as for :func:`load`."""
    try:
        yield
    except _Refused as exc:
        line = f":{exc.line}" if exc.line is not None else ""
        raise ConfigError(f"{place}{line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, yaml.composer.ComposerError) and "single document" in str(exc.context):
            raise ConfigError(
                f"{place}{line}: holds several YAML documents (separated by ---) where one is expected; {several}"
            ) from None
        if "nesting depth" in str(problem):  # libyaml's own bound, below the nesting check's reach
            raise ConfigError(
                f"{place}{line}: nested more than {MAX_DEPTH} levels deep; "
                "a config nests a handful of levels: flatten it"
            ) from None
        raise ConfigError(f"{place}{line}: not valid YAML: {printable(str(problem)[:200])}") from None
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise ConfigError(
            f"{place}: cannot read the YAML ({printable(type(exc).__name__)}: "
            f"{excerpt(str(exc), 100)}); simplify the value it names"
        ) from None


def _check_events(text: str) -> None:
    """Refuse nesting past :data:`MAX_DEPTH` and more than :data:`MAX_NODES` values as written,
    from the parser's events, before any node is built."""
    depth = values = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)):
            values += 1
            if values > MAX_NODES:
                raise _Refused(
                    event.start_mark.line + 1 if event.start_mark is not None else None,
                    f"the config holds more than {MAX_NODES:,} values; no config needs that: check "
                    "that this is the right file",
                )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise _Refused(
                    mark.line + 1 if mark is not None else None,
                    f"nested more than {MAX_DEPTH} levels deep (at {excerpt(_at(text, mark))}); "
                    "a config nests a handful of levels: flatten it",
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_size(root: yaml.Node, text: str) -> None:
    """Refuse a document whose aliases expand too far, without expanding them: each node's
    expanded size is counted once and reused wherever an alias repeats it."""
    done: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, characters, height)
    open_: set[int] = set()

    def refuse(node: yaml.Node, what: str) -> None:
        raise _Refused(
            node.start_mark.line + 1,
            f"{what} (at {excerpt(_at(text, node.start_mark))}); no config needs that: write the values out "
            "plainly, without aliases that repeat aliases",
        )

    def walk(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        key = id(node)
        known = done.get(key)
        if known is None:
            if key in open_:
                refuse(node, "an alias refers to the value that contains it")
            if depth > MAX_DEPTH:
                refuse(node, f"aliases nest the values more than {MAX_DEPTH} levels deep")
            open_.add(key)
            values, chars, height = 1, 0, 1
            if isinstance(node, yaml.ScalarNode):
                chars = len(node.value)
            else:
                children: list[yaml.Node] = (
                    [n for pair in node.value for n in pair]
                    if isinstance(node, yaml.MappingNode)
                    else list(node.value)
                )
                for child in children:
                    v, c, h = walk(child, depth + 1)
                    values, chars, height = values + v, chars + c, max(height, h + 1)
                    if values > MAX_NODES:
                        refuse(node, f"it expands to more than {MAX_NODES:,} values")
                    if chars > MAX_CHARS:
                        refuse(node, f"it expands to more than {MAX_CHARS:,} characters")
            open_.discard(key)
            known = done[key] = (values, chars, height)
        if depth + known[2] - 1 > MAX_DEPTH:
            refuse(node, f"aliases nest the values more than {MAX_DEPTH} levels deep")
        return known

    walk(root, 1)


def _at(text: str, mark: Any) -> str:
    """The source text from ``mark``, enough for an excerpt."""
    index = getattr(mark, "index", None)
    return text[index : index + EXCERPT + 1] if isinstance(index, int) else ""


def line_of(container: Any, key: str | int) -> int | None:
    """The line of ``key`` (a dict key or list index) in ``container``, when known."""
    if isinstance(container, LinedDict) and isinstance(key, str):
        return container.lines.get(key)
    if isinstance(container, LinedList) and isinstance(key, int) and 0 <= key < len(container):
        return container.lines[key]
    return None
