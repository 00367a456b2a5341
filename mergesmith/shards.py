"""Shards as units of work: merging a set of them, recording each one finished, resuming a run.

Every way of running a merge (one process, ``--workers N`` local processes, ``--executor ray``)
merges the plan's shards with :func:`run_shards`; the other processes first rebuild the plan from
a :class:`ShardTask` (:func:`plan_of`), which carries the config text rather than tensors or open
files. The process that owns the staging directory records each finished shard (name, size,
sha256, warnings) in the progress file (``_output.MANIFEST``) together with the plan's :func:`fingerprint`, so that
``--resume`` can keep the shards of a run that was killed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith import _memory, _output, card
from mergesmith._output import MANIFEST
from mergesmith._safetensors import ShardWriter
from mergesmith.errors import MergesmithError, OutputError
from mergesmith.plan import Plan

__all__ = [
    "Progress",
    "ShardDone",
    "ShardTask",
    "check_probe",
    "differs",
    "file_sha256",
    "fingerprint",
    "plan_of",
    "run_shards",
    "run_task",
    "task_for",
]


_ASPECTS = {
    "version": "the mergesmith version differs",
    "config": "the config text differs",
    "seed": "the seed differs",
    "device": "the device differs",
    "inputs": "an input weight file differs (size or content)",
    "shards": "the shard layout differs (--max-shard-size or the tensors)",
    "jobs": "the planned tensors (names, shapes, dtypes, methods, parameters or inputs) differ",
}


# -- fingerprint ------------------------------------------------------------------------------------


def _canon(value: Any) -> Any:
    """``value`` as plain JSON data that is the same in every process that plans the same merge."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ["tensor", str(value.dtype), list(value.shape), hashlib.sha256(data).hexdigest()]
    if isinstance(value, torch.dtype):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canon(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    shown = repr(value)
    return type(value).__name__ if " at 0x" in shown else shown


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(_canon(value), sort_keys=True).encode()).hexdigest()


def fingerprint(plan: Plan, device: str | torch.device = "cpu") -> dict[str, str]:
    """What decides the bytes of every shard, one digest per aspect (see :func:`differs`): the
    mergesmith version, config text, seed, device type, each input weight file (its quick digest:
    size and first and last MiB, or the Hub's sha256), the shard layout and every job."""
    from mergesmith import __version__

    inputs = [
        [str(ref), [[p.name, card.file_digest(p)] for p in model.weight_files]]
        for ref, model in zip(plan.refs, plan.models)
    ]
    jobs = [
        [
            j.name,
            j.shape,
            j.out_dtype,
            j.method,
            j.base,
            j.inputs,
            j.params,
            j.model_params,
            j.layer,
            j.t,
            j.rows,
        ]
        for j in plan.jobs
    ]
    return {
        "version": __version__,
        "config": _digest(plan.config.text),
        "seed": str(plan.config.seed),
        "device": torch.device(device).type,
        "inputs": _digest(inputs),
        "shards": _digest([plan.shards, plan.shard_names()]),
        "jobs": _digest(jobs),
    }


def differs(found: Mapping[str, Any], expected: Mapping[str, str]) -> str | None:
    """Why fingerprint ``found`` is not ``expected`` (the first aspect that differs), else None."""
    for key, why in _ASPECTS.items():
        if found.get(key) != expected.get(key):
            if key == "version":
                return f"{why} ({found.get(key)} then, {expected.get(key)} now)"
            return why
    return None


# -- merging shards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardDone:
    """A shard written, closed and fsynced in the staging directory."""

    index: int
    name: str
    size: int
    sha256: str
    warnings: tuple[str, ...] = ()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def run_shards(
    plan: Plan,
    stage: Path,
    shard_ids: Sequence[int],
    done: Callable[[ShardDone], None],
    *,
    device: torch.device,
    thresholds: Mapping[int, float] | None = None,
    on_nonfinite: str = "error",
    tensor_done: Callable[[int], None] | None = None,
) -> None:
    """Merge the shards ``shard_ids`` of ``plan`` into their files in ``stage``, in that order.

    ``done`` is called with each shard once it is closed and its file hashed (on a helper thread,
    in shard order); ``tensor_done`` with each tensor's output bytes as it is written. With
    ``on_nonfinite="warn"`` a shard's warnings travel in its :class:`ShardDone`; else the first
    non-finite tensor raises a MethodError.
    """
    from mergesmith.execute import InputStream, merge_job

    names = plan.shard_names()
    jobs = [plan.jobs[i] for s in shard_ids for i in plan.shards[s]]
    hashed: list[Future[None]] = []

    def finish(s: int, warnings: list[str]) -> None:
        path = stage / names[s]
        try:
            record = ShardDone(s, names[s], path.stat().st_size, file_sha256(path), tuple(warnings))
        except OSError as exc:
            raise _output.os_error(path, exc, "cannot read the finished shard") from None
        done(record)

    with (
        InputStream(plan, jobs, device) as stream,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergesmith-hash") as hasher,
    ):
        inputs = iter(stream)
        for s in shard_ids:
            members = plan.shards[s]
            warnings: list[str] | None = [] if on_nonfinite == "warn" else None
            # written under a name of its own, renamed when complete: a shard file is always whole,
            # and a process of a killed run still writing cannot touch the resumed run's files
            part = stage / f".{names[s]}.partial-{os.getpid()}"
            writer = ShardWriter(
                part, {plan.jobs[i].name: (plan.jobs[i].out_dtype, plan.jobs[i].shape) for i in members}
            )
            with writer.aborting():
                for _ in members:
                    job, tensors = next(inputs)
                    result = merge_job(plan, job, tensors, device, thresholds, warnings)
                    del tensors
                    writer.write(job.name, result)
                    del result
                    _memory.release()
                    if tensor_done is not None:
                        tensor_done(job.nbytes)
            writer.close()
            try:
                os.replace(part, stage / names[s])
            except OSError as exc:
                part.unlink(missing_ok=True)
                raise _output.os_error(
                    stage / names[s], exc, "cannot put the finished shard in place"
                ) from None
            hashed.append(hasher.submit(finish, s, warnings or []))
            for fut in [f for f in hashed if f.done()]:
                fut.result()  # a failure to record a shard stops the merge
        for fut in hashed:
            fut.result()


# -- the progress file ------------------------------------------------------------------------------


class Progress:
    """The progress file (``_output.MANIFEST``) of a staging directory: the plan's fingerprint, the whole-model
    thresholds and every finished shard, rewritten atomically as each one is recorded."""

    def __init__(self, stage: Path, fp: Mapping[str, str], total: int) -> None:
        self.path = stage / MANIFEST
        self.fingerprint = dict(fp)
        self.total = total
        self.thresholds: dict[int, float] | None = None
        self.done: dict[int, ShardDone] = {}
        self._lock = threading.Lock()

    @classmethod
    def start(cls, plan: Plan, stage: Path, fp: Mapping[str, str]) -> Progress:
        """The progress of a merge into ``stage``: a fresh one, or, where ``stage`` is the adopted
        stage of a killed run (it holds a manifest), that run's progress if its fingerprint is
        ``fp``: its shards whose files still match are kept and everything else in ``stage`` is
        removed. Says on stderr what was kept or why the merge starts over."""
        progress = cls(stage, fp, len(plan.shards))
        if progress.path.is_file():
            progress._adopt(plan, stage)
        return progress

    def _adopt(self, plan: Plan, stage: Path) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            found = data["fingerprint"]
            entries = data["done"]
            thresholds = data["thresholds"]
            if not isinstance(found, dict) or not isinstance(entries, dict):
                raise TypeError("not a progress file")
        except (OSError, ValueError, KeyError, TypeError):
            data, found, entries, thresholds = None, None, {}, None
        why = "its progress file is unreadable" if data is None else differs(found, self.fingerprint)
        kept: dict[int, ShardDone] = {}
        redo = 0
        if why is None:
            names = plan.shard_names()
            try:
                for name, e in entries.items():
                    if name not in names:
                        continue
                    s = names.index(name)
                    path = stage / name
                    if (
                        path.is_file()
                        and path.stat().st_size == e["size"]
                        and file_sha256(path) == e["sha256"]
                    ):
                        kept[s] = ShardDone(s, name, e["size"], e["sha256"], tuple(map(str, e["warnings"])))
                    else:
                        redo += 1
                if thresholds is not None:
                    self.thresholds = {int(k): float(v) for k, v in thresholds.items()}
            except (AttributeError, KeyError, TypeError, ValueError):
                kept, redo, self.thresholds = {}, 0, None
                why = "its progress file is unreadable"
        self.done = kept
        keep = {d.name for d in kept.values()}
        for p in stage.iterdir():
            if p.name not in keep:
                _remove(p)
        out = stage.name.split(_output.PARTIAL)[0][1:]
        if why is not None:
            what = "" if data is None or why.startswith("its") else " was of another plan"
            print(f"resume: the interrupted merge into {out}{what} ({why}); starting over", file=sys.stderr)
            return
        changed = f"; {redo} finished shard(s) changed on disk and are merged again" if redo else ""
        print(
            f"resume: kept {len(kept)} of {self.total} shards of the interrupted merge into {out}{changed}",
            file=sys.stderr,
        )

    def save(self) -> None:
        with self._lock:
            data = {
                "fingerprint": self.fingerprint,
                "shards": self.total,
                "thresholds": None
                if self.thresholds is None
                else {str(k): v for k, v in self.thresholds.items()},
                "done": {
                    d.name: {"size": d.size, "sha256": d.sha256, "warnings": list(d.warnings)}
                    for d in sorted(self.done.values(), key=lambda d: d.index)
                },
            }
            _output.atomic_write(self.path, json.dumps(data, indent=1) + "\n")

    def record(self, done: ShardDone) -> None:
        with self._lock:
            self.done[done.index] = done
        self.save()

    def todo(self) -> list[int]:
        return [s for s in range(self.total) if s not in self.done]

    def warnings(self) -> list[str]:
        """Every shard's warnings, in shard order (the order one process finds them in)."""
        return [w for s in sorted(self.done) for w in self.done[s].warnings]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- tasks for other processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    """What another process (a local worker, a Ray task) needs to merge some shards: the config
    text and the options that shape the plan, never tensors or open files."""

    config_text: str
    config_source: str
    seed: int
    max_shard_size: int
    fingerprint: Mapping[str, str]
    stage: str
    shard_ids: tuple[int, ...]
    device: str = "cpu"
    thresholds: Mapping[int, float] | None = None
    on_nonfinite: str = "error"
    threads: int = 1
    cwd: str = "."
    probe: tuple[str, str] | None = None  # (file name in the stage, its content)
    tune_memory: bool = False  # tune the worker's C allocator (mergesmith._memory.tune)


def task_for(
    plan: Plan,
    stage: Path,
    fp: Mapping[str, str],
    *,
    device: torch.device,
    thresholds: Mapping[int, float] | None,
    on_nonfinite: str,
    threads: int,
    tune_memory: bool = False,
) -> ShardTask:
    """A task for ``plan``'s shards in ``stage`` with no shard ids yet (``dataclasses.replace``)."""
    return ShardTask(
        config_text=plan.config.text,
        config_source=plan.config.source,
        seed=plan.config.seed,
        max_shard_size=plan.shard_limit,
        fingerprint=dict(fp),
        stage=str(stage.resolve()),
        shard_ids=(),
        device=str(device),
        thresholds=dict(thresholds) if thresholds is not None else None,
        on_nonfinite=on_nonfinite,
        threads=threads,
        cwd=os.getcwd(),
        tune_memory=tune_memory,
    )


@contextmanager
def _in_directory(path: str) -> Iterator[None]:
    """Relative model paths of the config resolve as they did where the merge was started."""
    before = os.getcwd()
    moved = os.path.isdir(path) and path != before
    if moved:
        os.chdir(path)
    try:
        yield
    finally:
        if moved:
            os.chdir(before)


def plan_of(task: ShardTask) -> Plan:
    """Rebuild the plan a task's shards belong to, refused when its fingerprint is not the task's."""
    from dataclasses import replace

    from mergesmith.config import load_config
    from mergesmith.plan import build_plan

    with _in_directory(task.cwd):
        cfg = replace(load_config(task.config_text, name=task.config_source), seed=task.seed)
        plan = build_plan(cfg, max_shard_size=task.max_shard_size)
        why = differs(fingerprint(plan, task.device), task.fingerprint)
    if why is not None:
        raise MergesmithError(
            f"the plan rebuilt from the config in this process is not the one being merged ({why}); "
            "every worker needs the same mergesmith and torch versions and the same input files"
        )
    return plan


def check_probe(task: ShardTask) -> None:
    """Refuse to work on a staging directory this process does not see as the driver wrote it."""
    if task.probe is None:
        return
    name, token = task.probe
    path = Path(task.stage) / name
    try:
        seen = path.read_text(encoding="utf-8")
    except OSError:
        seen = None
    if seen != token:
        import socket

        raise OutputError(
            f"{task.stage}: the staging directory beside the output is not visible from node "
            f"{socket.gethostname()} (probe file {name} {'differs' if seen is not None else 'missing'}); "
            "with --executor ray the output's parent directory must be on storage every node sees "
            "(NFS or another shared file system, at the same path)"
        )


def run_task(task: ShardTask, done: Callable[[ShardDone], None]) -> None:
    """Merge a task's shards into its stage with ``task.threads`` torch threads."""
    from mergesmith._threads import using_threads

    check_probe(task)
    plan = plan_of(task)
    if task.tune_memory:
        _memory.tune()
    with using_threads(task.threads):
        run_shards(
            plan,
            Path(task.stage),
            task.shard_ids,
            done,
            device=torch.device(task.device),
            thresholds=task.thresholds,
            on_nonfinite=task.on_nonfinite,
        )
