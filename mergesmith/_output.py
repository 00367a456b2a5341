"""The output directory: refused when unsafe, built beside its final place, renamed in when complete."""

from __future__ import annotations

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


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``out_dir``; on success it replaces ``out_dir``.

    On any failure the staging directory is removed and ``out_dir`` is left as it was.
    """
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(parent, out_dir.name)
    stage = parent / f".{out_dir.name}{PARTIAL}-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    try:
        stage.mkdir()
    except OSError as exc:
        raise OutputError(f"{stage}: cannot create: {exc.strerror} (errno {exc.errno})") from None
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
        raise OutputError(f"{out}: cannot move the finished merge into place: {exc.strerror}") from None
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
