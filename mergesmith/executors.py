"""Merging a plan's shards in other processes: local worker processes, or Ray tasks on a cluster.

Each worker gets a :class:`mergesmith.shards.ShardTask` (the config text and the options, never
tensors), rebuilds the plan, checks its fingerprint, writes its shard files into the shared
staging directory and reports each finished shard back; the process that owns the staging
directory records them (:class:`mergesmith.shards.Progress`) and writes the side files afterwards.
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergesmith import errors
from mergesmith.errors import ConfigError, MergesmithError
from mergesmith.shards import Progress, ShardDone, ShardTask, plan_of, run_task

__all__ = ["run_local", "run_ray"]


def _error(name: str, message: str) -> MergesmithError:
    """A worker's error raised again here, as its own class where it is one of mergesmith's."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MergesmithError)):
        cls = MergesmithError
    return cls(message)


def _failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, MergesmithError):
        return type(exc).__name__, str(exc)
    return "MergesmithError", f"{type(exc).__name__}: {exc}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- local processes --------------------------------------------------------------------------------


def _worker(task: ShardTask, k: int, results: Any, parent: int) -> None:
    """A worker process: merge ``task``'s shards, putting each on ``results`` as it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers on Ctrl-C
    _die_with_parent(parent)
    try:
        run_task(task, lambda done: results.put(("done", k, done)))
    except Exception as exc:  # reported to the parent, which raises it
        results.put(("error", k, _failure(exc)))
        results.close()
        results.join_thread()
        raise SystemExit(1) from None


def _die_with_parent(parent: int) -> None:
    """Have Linux kill this process when its parent dies (a merge killed with SIGKILL): a worker
    left running would go on writing into a staging directory a resumed run may take over."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that took effect
        os._exit(1)


def run_local(task: ShardTask, todo: Sequence[int], progress: Progress, workers: int) -> None:
    """Merge the shards ``todo`` in ``workers`` spawned processes, shards dealt out in turn."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    n = max(1, min(workers, len(todo)))
    results = ctx.Queue()
    procs = []
    try:
        with _sigint_ignored():  # inherited: a Ctrl-C while a worker starts up is the parent's alone
            for k in range(n):
                part = replace(task, shard_ids=tuple(todo[k::n]))
                proc = ctx.Process(
                    target=_worker,
                    args=(part, k + 1, results, os.getpid()),
                    name=f"mergesmith-worker-{k + 1}",
                )
                proc.start()
                procs.append(proc)
        left = len(todo)
        while left:
            try:
                kind, k, payload = results.get(timeout=0.5)
            except queue.Empty:
                if all(p.exitcode in (None, 0) for p in procs) and any(p.exitcode is None for p in procs):
                    continue
                try:  # a worker that failed said why before it exited
                    kind, k, payload = results.get(timeout=2)
                except queue.Empty:
                    raise _lost(procs, left) from None
            if kind == "error":
                raise _error(*payload)
            progress.record(payload)
            left -= 1
            _say(f"shard {len(progress.done)}/{progress.total} done by worker {k}: {payload.name}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        results.close()


def _lost(procs: Sequence[Any], left: int) -> MergesmithError:
    """The error for workers that ended without saying why, ``left`` shards unfinished."""
    for k, proc in enumerate(procs, 1):
        if proc.exitcode not in (None, 0):
            how = f"signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit status {proc.exitcode}"
            return MergesmithError(
                f"worker {k} ended ({how}) with {left} shard(s) left to merge: it was killed, perhaps for "
                "lack of memory; run again with fewer --workers (and --resume to keep the finished shards)"
            )
    return MergesmithError(f"the workers ended with {left} shard(s) left to merge")


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


# -- Ray --------------------------------------------------------------------------------------------


@contextmanager
def _ray(address: str | None) -> Iterator[Any]:
    """Ray, joined to the cluster at ``address`` (else a local one started here) unless this
    process has joined one already; left again afterwards when this call joined it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'mergesmith[ray]'") from None
    started = not ray.is_initialized()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if started:
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a Ray cluster"
            raise ConfigError(f"--executor ray: cannot start or join {where}: {exc}") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address of the form [ray://]HOST:PORT must accept a connection within ``timeout``
    seconds: Ray itself retries an unreachable one for minutes before it gives up."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and other forms Ray resolves itself
    host = host.strip("[]") or "127.0.0.1"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"--executor ray: nothing answers at the Ray cluster address {address} ({why} within "
            f"{timeout:g} s); start the cluster (`ray start --head` prints its address) or give the "
            "address of its head node with --ray-address or RAY_ADDRESS"
        ) from None


def _ray_thresholds(task: ShardTask) -> tuple[str, Any]:
    import torch

    from mergesmith.execute import whole_model_thresholds

    try:
        return "ok", whole_model_thresholds(plan_of(task), torch.device(task.device))
    except Exception as exc:  # returned to the driver, which raises it
        return "error", _failure(exc)


def _ray_shards(task: ShardTask) -> tuple[str, Any]:
    found: list[ShardDone] = []
    try:
        run_task(task, found.append)
    except Exception as exc:  # returned to the driver, which raises it
        return "error", _failure(exc)
    return "ok", (f"{socket.gethostname()}:{os.getpid()}", found)


def _get(ray: Any, ref: Any) -> tuple[str, Any]:
    """A task's result; a task Ray itself lost (its node or worker died) is a MergesmithError."""
    from ray.exceptions import RayError

    try:
        result: tuple[str, Any] = ray.get(ref)
    except RayError as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise MergesmithError(f"a Ray task failed: {first}") from None
    return result


def run_ray(task: ShardTask, todo: Sequence[int], progress: Progress, address: str | None) -> None:
    """Merge the shards ``todo`` as Ray tasks, one per shard, each taking ``task.threads`` CPUs.

    The whole-model thresholds, where the method needs them and ``progress`` has none yet, are
    found by one more task first: this process reads no tensor. The staging directory must be on
    storage every node sees: each task first checks a probe file this process wrote there.
    """
    stage = Path(task.stage)
    probe = f".mergesmith-probe-{secrets.token_hex(4)}"
    token = secrets.token_hex(16)
    (stage / probe).write_text(token, encoding="utf-8")
    task = replace(task, probe=(probe, token))
    with _ray(address) as ray:
        try:
            options: dict[str, Any] = {"num_cpus": task.threads, "max_retries": 0}
            if progress.thresholds is None:
                status, value = _get(ray, ray.remote(**options)(_ray_thresholds).remote(task))
                if status == "error":
                    raise _error(*value)
                progress.thresholds = value
                progress.save()
            if progress.thresholds is not None:
                task = replace(task, thresholds=progress.thresholds)
            remote = ray.remote(**options)(_ray_shards)
            pending = [remote.remote(replace(task, shard_ids=(s,))) for s in todo]
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    status, value = _get(ray, ready[0])
                    if status == "error":
                        raise _error(*value)
                    where, found = value
                    for done in found:
                        progress.record(done)
                        _say(f"shard {len(progress.done)}/{progress.total} done on {where}: {done.name}")
            finally:
                for ref in pending:
                    with suppress(Exception):  # a task that has ended cannot be cancelled
                        ray.cancel(ref, force=True)
        finally:
            (stage / probe).unlink(missing_ok=True)
