"""The allocator tuning keeps freed job memory for reuse, up to a limit, then returns it."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mergesmith import _memory

pytestmark = pytest.mark.skipif(
    _memory._LIBC is None or not sys.platform.startswith("linux"), reason="glibc on Linux only"
)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_freed_memory_is_held_for_reuse_then_released_over_the_limit() -> None:
    _memory.tune()
    size = 96 << 20
    x = torch.ones(size, dtype=torch.uint8)
    del x
    held = _memory.held()
    assert held >= size  # kept by the allocator, not unmapped
    before = rss()
    _memory.release(limit=held + 1)  # under the limit: kept
    assert rss() > before - (size // 2)
    _memory.release(limit=size // 2)  # over it: returned to the operating system
    assert rss() < before - (size // 2)
