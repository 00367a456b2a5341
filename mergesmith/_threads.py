"""How many threads torch computes with.

torch starts one intra-op thread per core. On a machine whose cores are already busy, those
threads wait on each other at every parallel operation and the work runs slower than on fewer
threads. The default is therefore the cores left idle by the load of the last minute:
``max(1, min(cores, cores - round(load average)))``, one thread where the machine is
oversubscribed. ``--threads N`` (or ``threads=N``) sets it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["cores", "default_threads", "positive_threads", "using_threads"]


def cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The cores left idle by the one-minute load average; all of them where it is unknown."""
    n = cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return n
    return max(1, min(n, n - round(load)))


def positive_threads(threads: int | None) -> int:
    """``threads`` when given (at least 1), else :func:`default_threads`."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        from mergesmith.errors import ConfigError

        raise ConfigError(f"threads must be a whole number of at least 1, not {threads!r}")
    return threads


@contextmanager
def using_threads(threads: int | None = None) -> Iterator[int]:
    """torch's intra-op threads set to ``threads`` (default: :func:`default_threads`) inside the
    block, and set back after it."""
    n = positive_threads(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
