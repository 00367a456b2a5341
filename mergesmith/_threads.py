"""How many threads torch computes with.

torch starts one intra-op thread per core. On a machine whose cores are already busy, those
threads wait on each other at every parallel operation and the work runs slower than on fewer
threads. The default is therefore the cores left idle by other work: ``max(1, cores - busy)``, one
thread where the machine is oversubscribed, with ``busy`` the larger of the one-minute load average
(rounded) and the number of other tasks running right now (``procs_running`` in /proc/stat, the
median of a few samples: the load average takes a minute to see a process that just started).
``--threads N`` (or ``threads=N``) sets it.
``cores`` are those the process's affinity allows, no more than its cgroup's CPU quota; where
they are fewer than the machine's CPUs, ``busy`` is scaled by their share.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "CGROUP_V1",
    "CGROUP_V2",
    "cores",
    "default_threads",
    "others_running",
    "positive_threads",
    "quota_cores",
    "using_threads",
]


def cores() -> int:
    """The cores this process may run on: those its affinity allows, no more than its cgroup's
    CPU quota (a container started with ``--cpus 2`` on a large machine gets 2)."""
    try:
        n = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        n = max(1, os.cpu_count() or 1)
    quota = quota_cores()
    return min(n, quota) if quota is not None else n


# where the cgroup CPU quota is: cgroup v2's "QUOTA PERIOD" file, or v1's two files
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def quota_cores() -> int | None:
    """The CPUs the cgroup's quota allows, rounded up (at least 1); None without a quota."""
    try:
        if CGROUP_V2.is_file():
            quota, _, period = CGROUP_V2.read_text().strip().partition(" ")
            if quota == "max":
                return None
            q, per = int(quota), int(period or 100_000)
        elif CGROUP_V1[0].is_file():
            q, per = (int(f.read_text().strip()) for f in CGROUP_V1)
        else:
            return None
    except (OSError, ValueError):
        return None
    if q <= 0 or per <= 0:  # v1 writes -1 for no quota
        return None
    return max(1, math.ceil(q / per))


def default_threads() -> int:
    """The cores other work leaves idle (see the module's text); all of them where neither the
    load average nor the running tasks are known."""
    n = cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    busy = max(busy, others_running() or 0)
    # Both count the whole machine's tasks; on a process kept to some of its cores (a cpuset),
    # the share expected on those cores.
    machine = os.cpu_count() or n
    if machine > n:
        busy *= n / machine
    return max(1, min(n, n - round(busy)))


def others_running(samples: int = 5, gap: float = 0.005) -> int | None:
    """Tasks running or runnable now other than this one: the median over ``samples`` readings of
    /proc/stat's ``procs_running`` (which counts the reader), None where there is no such file."""
    seen = []
    for i in range(samples):
        try:
            with open("/proc/stat", "rb") as f:
                line = next((ln for ln in f if ln.startswith(b"procs_running ")), None)
        except OSError:
            return None
        if line is None:
            return None
        seen.append(int(line.split()[1]) - 1)
        if i + 1 < samples:
            time.sleep(gap)
    return sorted(seen)[len(seen) // 2]


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
