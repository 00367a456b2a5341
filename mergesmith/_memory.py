"""Keep the C allocator from making every job pay page faults, without letting it hoard memory.

Each job allocates a few full-size float32 buffers and frees them at its end. By default glibc
serves large blocks with fresh ``mmap`` pages and hands them back on ``free``, so every job pays
a page fault (and the kernel's zeroing) per page it touches, which costs more than the merge
arithmetic. :func:`tune` lets freed blocks be reused from the heap instead, and
:func:`release` returns the heap's free memory to the operating system once more than
``HELD_LIMIT`` bytes of it are held, so reuse never grows the resident size by more than that.
Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

__all__ = ["HELD_LIMIT", "available", "held", "release", "tune"]

HELD_LIMIT = 512 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return lib


_LIBC = _libc()
_tuned = False


def tune() -> None:
    """Serve large blocks from the heap (reused across jobs) and stop automatic trimming."""
    global _tuned
    if _LIBC is None or _tuned:
        return
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    _LIBC.mallopt(_M_ARENA_MAX, 1)
    _tuned = True


def held() -> int:
    """Bytes the allocator holds free (ready for reuse, still resident); 0 where unknown."""
    return int(_LIBC.mallinfo2().fordblks) if _LIBC is not None else 0


def release(limit: int = HELD_LIMIT) -> None:
    """Return free heap memory to the operating system when more than ``limit`` bytes are held."""
    if _LIBC is not None and held() > limit:
        _LIBC.malloc_trim(0)


def available() -> int | None:
    """Bytes of memory the system can still hand out (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
