"""Executors: each holds trial runners and turns values into a trial's scores, in this process,
in a pool of local processes, or on Ray actors. The study asks and tells; executors only score."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mergesmith import defaults
from mergesmith.errors import ConfigError
from mergesmith.tune.objective import Objective
from mergesmith.tune.runner import TrialRunner, TrialScores

if TYPE_CHECKING:
    from mergesmith.plan import Plan

__all__ = ["Executor", "InProcess", "LocalPool", "RayActors", "RunnerArgs"]


class Executor(Protocol):
    """Scores a trial's values, the result coming as a future; ``beat`` as for TrialRunner.trial."""

    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunnerArgs:
    """What every executor builds its TrialRunners from (picklable, for worker processes and Ray)."""

    doc: dict[str, Any]
    task_files: list[str]
    device: str
    objective: Objective
    batch_size: int = defaults.TUNE_BATCH_SIZE
    threads: int | None = None  # threads of all runners together (default: the idle cores)
    add_special_tokens: bool = True
    tune_memory: bool = False  # tune each runner's C allocator (mergesmith._memory.tune)

    def kwargs(self, workers: int = 1) -> dict[str, Any]:
        """TrialRunner's arguments, with the threads shared evenly among ``workers`` runners."""
        from mergesmith._threads import positive_threads

        threads = max(1, positive_threads(self.threads) // workers)
        return {**asdict(self), "objective": self.objective, "threads": threads}


_WORKER: TrialRunner | None = None


def _init_worker(kwargs: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = TrialRunner(**kwargs)


def _run_in_worker(values: Mapping[str, float], beat: float | None) -> TrialScores:
    assert _WORKER is not None
    return _WORKER.trial(values, beat)


class InProcess:
    """One runner in this process, on the study's plan where one is given. The runner sets torch's
    threads; :meth:`close` sets them back."""

    def __init__(self, args: RunnerArgs, plan: Plan | None = None) -> None:
        import torch

        self.threads = torch.get_num_threads()
        try:
            self.runner = TrialRunner(**args.kwargs(), plan=plan)
        except BaseException:
            self.close()
            raise

    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]:
        fut: Future[TrialScores] = Future()
        fut.set_result(self.runner.trial(values, beat))
        return fut

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.threads)


class LocalPool:
    """``workers`` local processes, each holding a runner."""

    def __init__(self, args: RunnerArgs, workers: int) -> None:
        import multiprocessing

        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(args.kwargs(workers),),
        )

    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]:
        return self.pool.submit(_run_in_worker, dict(values), beat)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayActors:
    """One Ray actor per worker, each holding a TrialRunner; values go to the least busy actor."""

    def __init__(self, args: RunnerArgs, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'mergesmith[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        actor: Any = ray.remote(num_cpus=1)(TrialRunner)
        self.actors: list[Any] = [actor.remote(**args.kwargs(workers)) for _ in range(workers)]
        self.busy = [0] * workers
        self.lock = threading.Lock()

    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]:
        with self.lock:  # the counts are lowered from Ray's callback thread
            i = self.busy.index(min(self.busy))
            self.busy[i] += 1
        fut: Future[TrialScores] = self.actors[i].trial.remote(dict(values), beat).future()

        def done(_: Future[TrialScores]) -> None:
            with self.lock:
                self.busy[i] -= 1

        fut.add_done_callback(done)
        return fut

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()
