"""Text that came from a file, made safe to print on a terminal."""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 and C1 control characters other than newline and tab, and the invisible format characters
# that reorder or hide text (bidirectional overrides, zero-width marks).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def printable(text: str) -> str:
    """``text`` with every control or reordering character written as a Python escape, so a
    tensor name or a key read from a file cannot move the cursor, recolour or rewrite the
    terminal it is printed on."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
