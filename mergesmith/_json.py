"""JSON read from a model's files: bounded in size and depth, every failure a MergesmithError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergesmith.errors import CheckpointError, MergesmithError

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
) -> Any:
    """``data`` parsed as JSON. Malformed text, text that is not UTF-8, integers too long to
    convert and nesting deeper than ``max_depth`` (None: not checked beyond what the parser
    survives) raise ``error`` naming ``where``, what is wrong and ``fix``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start}); {fix}") from None
    try:
        value = json.loads(text)
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
) -> Any:
    """The JSON file at ``path``, refused (as ``error``) when larger than ``max_bytes`` or when
    :func:`parse_json` refuses it."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size:,} bytes, more than the {max_bytes:,} this file may have; {fix}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    return parse_json(data, str(path), error=error, max_depth=max_depth, fix=fix)


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
