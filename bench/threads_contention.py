"""torch's threads on a machine that is already busy: every core against the default policy.

    python bench/threads_contention.py [--competitors N] [--settle S] [--repeats R]

Times a fixed workload shaped like an evaluation's forward pass (a batch of activations through a
stack of matmuls, a softmax over the vocabulary) alone with every core, then starts N CPU-bound
competing processes (default: one per core, a machine fully booked by other work), waits S seconds
(the policy counts running tasks, so it sees them at once; the load average would take a minute),
and times it again with torch set to every core, then to the thread count the default policy picks
(mergesmith._threads.default_threads), alternating, R times each. Prints the medians side by side,
their ratios (every core over the policy, and each under load over alone), the load average and the
policy's choice. The competitors are stopped at the end, however the run ends.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mergesmith import _threads  # noqa: E402


def _spin(stop: object) -> None:
    """Burn one core until ``stop`` (a multiprocessing Event) is set."""
    x = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        for _ in range(100_000):
            x = (x * 1_103_515_245 + 12_345) & 0xFFFFFFFF


def _workload(threads: int, layers: list[torch.Tensor], head: torch.Tensor, batch: torch.Tensor) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(4):
            h = batch
            for w in layers:
                h = torch.nn.functional.gelu(h @ w)
            torch.softmax(h @ head, dim=-1)
    return time.perf_counter() - start


def main() -> int:
    cores = _threads.cores()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--competitors", type=int, default=cores, help=f"busy processes (default {cores})")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before measuring (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per setting (default 5)")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(512, 512, generator=gen) / 512**0.5 for _ in range(6)]
    head = torch.randn(512, 8192, generator=gen) / 512**0.5
    batch = torch.randn(256, 512, generator=gen)
    _workload(1, layers, head, batch)  # warm up
    alone = [_workload(cores, layers, head, batch) for _ in range(args.repeats)]  # before any competitor

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    busy = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.competitors)]
    for p in busy:
        p.start()
    try:
        time.sleep(args.settle)
        load = os.getloadavg()[0]
        policy = _threads.default_threads()
        every, chosen = [], []
        for _ in range(args.repeats):
            every.append(_workload(cores, layers, head, batch))
            chosen.append(_workload(policy, layers, head, batch))
    finally:
        stop.set()
        for p in busy:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    a, b, c = statistics.median(every), statistics.median(chosen), statistics.median(alone)
    print(f"{cores} cores, {args.competitors} competing processes, 1-minute load average {load:.2f}")
    print(f"{'threads':>24} {'median s':>10} {'min s':>8}")
    print(f"{f'alone, every core ({cores})':>24} {c:>10.3f} {min(alone):>8.3f}")
    print(f"{f'every core ({cores})':>24} {a:>10.3f} {min(every):>8.3f}")
    print(f"{f'default policy ({policy})':>24} {b:>10.3f} {min(chosen):>8.3f}")
    print(f"every core / default policy: {a / b:.2f}x")
    print(f"under load / alone: every core {a / c:.2f}x, default policy {b / c:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
