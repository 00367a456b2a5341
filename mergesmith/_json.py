"""JSON read from a model's files: bounded in size and depth, every failure a MergesmithError."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mergesmith.errors import CheckpointError, MergesmithError

__all__ = ["parse_json", "read_json"]

# config.json, index and adapter files nest a handful of levels; nothing real comes near this.
MAX_DEPTH = 64
MAX_BYTES = 64 << 20


def parse_json(
    data: str | bytes,
    where: str,
    *,
    error: type[MergesmithError] = CheckpointError,
    max_depth: int | None = MAX_DEPTH,
    fix: str = "repair or re-download the file",
    unique_keys: bool = False,
) -> Any:
    """``data`` parsed as JSON. Malformed text, text that is not UTF-8, integers too long to
    convert and nesting deeper than ``max_depth`` (None: not checked beyond what the parser
    survives) raise ``error`` naming ``where``, what is wrong and ``fix``; so does a key given
    twice in one object when ``unique_keys`` is set (else the last one wins, as in ``json``)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start}); {fix}") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except _DuplicateKey as exc:
        raise error(
            f"{where}: the key {exc.key!r} is given twice, so one of its values would be lost; {fix}"
        ) from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read; {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({_short(exc)}); {fix}") from None
    except ValueError:  # an integer longer than Python converts (4300 digits)
        raise error(f"{where}: holds an integer with thousands of digits; {fix}") from None
    if max_depth is not None and _depth_exceeds(value, max_depth):
        raise error(f"{where}: JSON nested more than {max_depth} levels deep; {fix}")
    return value


def read_json(
    path: Path,
    *,
    error: type[MergesmithError] = CheckpointError,
    max_depth: int | None = MAX_DEPTH,
    max_bytes: int = MAX_BYTES,
    fix: str = "repair or re-download the file",
    unique_keys: bool = False,
) -> Any:
    """The JSON file at ``path``, refused (as ``error``) when it is not a regular file, when
    larger than ``max_bytes`` or when :func:`parse_json` refuses it."""
    from mergesmith._files import open_regular

    with open_regular(path, error) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(f"{path}: {size:,} bytes, more than the {max_bytes:,} this file may have; {fix}")
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {max_bytes:,} bytes this file may have; {fix}")
    return parse_json(data, str(path), error=error, max_depth=max_depth, fix=fix, unique_keys=unique_keys)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[Any] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
