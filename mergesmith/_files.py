"""Opening a model's files: regular files only, and noticing when one changes under a reader."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from mergesmith.errors import CheckpointError, MergesmithError

__all__ = ["check_unchanged", "open_regular", "stamp_of"]

# (device, inode, size, modification time in ns): what a file was when it was first read
Stamp = tuple[int, int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_regular(path: Path, error: type[MergesmithError] = CheckpointError) -> BinaryIO:
    """``path`` opened for reading, unbuffered, refused unless it is a regular file: a FIFO or a
    device would block the reader or never end. Opened without blocking, so a FIFO with no writer
    is refused instead of waiting for one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file"
            )
            raise error(f"{path}: is {kind}, not a regular file; replace it with the file itself")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=0)


def check_unchanged(path: Path, before: Stamp, now: os.stat_result) -> None:
    """Raise when the file read as ``before`` is now another file, or was rewritten or resized."""
    after = stamp_of(now)
    if after == before:
        return
    if after[:2] != before[:2]:
        what = "was replaced by another file"
    elif after[2] != before[2]:
        what = f"changed size from {before[2]:,} to {after[2]:,} bytes"
    else:
        what = "was rewritten (its modification time changed)"
    raise CheckpointError(
        f"{path}: {what} during the merge, after its header was read; the tensors read from it "
        "would not match: rerun the merge once nothing writes to the input models"
    )
