"""The output directory: refused when unsafe, built beside its final place, renamed in when complete."""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mergesmith.errors import OutputError

PARTIAL = ".mergesmith-partial"


def check_output(out_dir: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output that would overwrite or sit inside an input, or clobber a directory."""
    out = out_dir.resolve()
    for inp in inputs:
        src = inp.resolve()
        if out == src or src in out.parents:
            raise OutputError(
                f"output directory {out_dir} is inside input model {inp}; writing there could "
                "overwrite the input: choose a directory outside every input model"
            )
        if out in src.parents:
            raise OutputError(
                f"input model {inp} is inside output directory {out_dir}; replacing the output would "
                "delete the input: choose another output directory"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(
            f"output directory {out_dir} exists and is not empty; pass --force (force=True) to replace "
            "it once the new merge is complete, or choose another directory"
        )


def os_error(path: Path | str, exc: OSError, doing: str = "cannot write") -> OutputError:
    """An OutputError naming the path, the errno and, for the common ones, the fix."""
    code = errno.errorcode.get(exc.errno or 0, "?")
    hint = {
        "ENOSPC": ": the disk is full; free space or choose an output on another disk",
        "EDQUOT": ": the disk quota is exceeded; free space or choose an output on another disk",
        "EACCES": ": permission denied; choose a directory you can write to",
        "EROFS": ": the file system is read-only; choose another output directory",
    }.get(code, "")
    return OutputError(f"{path}: {doing}: {os.strerror(exc.errno or 0)} (errno {exc.errno} {code}){hint}")


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` for the whole merge: a second merge into the same
    directory is refused instead of interleaving with the first. The lock is a file beside the
    output, locked with flock, so it is released when the process ends however it ends."""
    out = out_dir.resolve()
    path = out.parent / f".{out.name}.mergesmith-lock"
    try:
        f = open(path, "a+")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise os_error(path, exc, "cannot create the output lock") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputError(
                f"{out_dir}: another merge (pid {holder}) is writing this output directory; wait for it "
                f"to finish or choose another directory (lock file {path})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        f.close()


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``out_dir``; on success it replaces ``out_dir``.

    On any failure the staging directory is removed and ``out_dir`` is left as it was. The whole
    time, ``out_dir`` is locked against other merges (:func:`output_lock`).
    """
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(parent, exc, "cannot create the output's parent directory") from None
    with output_lock(out_dir):
        yield from _staged(out_dir, parent)


def _staged(out_dir: Path, parent: Path) -> Iterator[Path]:
    _clean_stale(parent, out_dir.name)
    stage = parent / f".{out_dir.name}{PARTIAL}-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    try:
        stage.mkdir()
    except OSError as exc:
        raise os_error(stage, exc, "cannot create") from None
    try:
        yield stage
        _replace(stage, out_dir.resolve())
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace(stage: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}{PARTIAL}-old-{os.getpid()}"
        out.rename(old)
    try:
        stage.rename(out)
    except OSError as exc:
        if old is not None:
            old.rename(out)
        raise os_error(out, exc, "cannot move the finished merge into place") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _clean_stale(parent: Path, name: str) -> None:
    """Remove staging directories of earlier runs into the same output whose process is gone."""
    for p in parent.glob(f".{glob.escape(name)}{PARTIAL}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
