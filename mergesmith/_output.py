"""The output directory: refused when unsafe, built beside its final place, swapped in when complete."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mergesmith._json import parse_json
from mergesmith._text import printable
from mergesmith.errors import OutputError

__all__ = [
    "atomic_write",
    "check_inside",
    "check_output",
    "identity",
    "os_error",
    "output_lock",
    "resumable",
    "staged_output",
    "stale_summary",
    "write_file",
    "write_marker",
    "written_here",
]

MANIFEST = ".mergesmith-progress.json"
"""The progress file of a staging directory (:mod:`mergesmith.shards`); removed before the output
is swapped in."""
PARTIAL = ".mergesmith-partial"
MARKER = ".mergesmith"
"""The file every output this tool writes holds; ``--force`` replaces only such a directory."""
completed: list[Path] = []
"""The outputs this process has put in place, for an interrupted command to say what it left."""
kept: list[tuple[Path, int, int]] = []
"""The staging directory an interrupt of the latest merge left in place (path, finished shards,
all shards), for ``--resume`` to continue from."""


def check_inside(out_dir: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is, holds or sits inside one of ``inputs``."""
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


def check_output(
    out_dir: Path, inputs: Sequence[Path], force: bool, *, replacer: str = "--force"
) -> tuple[int, int] | None:
    """Refuse an output that would overwrite or sit inside an input, or clobber a directory:
    without ``force`` only a missing or empty directory is written; with it, also one this tool
    wrote earlier (:func:`written_here`); ``replacer`` is what the messages say replaces it.
    Returns the :func:`identity` of what is there, for
    :func:`staged_output`'s ``seen``."""
    check_inside(out_dir, inputs)
    out = out_dir.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a directory")
    if not out.is_dir():
        return None
    try:
        held = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise os_error(out_dir, exc, "cannot list the output directory") from None
    if not held:
        return identity(out)
    if not force:
        raise OutputError(
            f"output directory {out_dir} exists and is not empty; pass --force (force=True) to replace "
            "it once the new merge is complete, or choose another directory"
        )
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise OutputError(
            f"{replacer}: output directory {out_dir} is the current directory or holds it; replacing it "
            "would delete what you are working in: choose a new output directory"
        )
    if not written_here(out):
        shown = ", ".join(printable(n) for n in held[:5]) + (
            f" and {len(held) - 5} more" if len(held) > 5 else ""
        )
        raise OutputError(
            f"{replacer}: output directory {out_dir} was not written by mergesmith (no {MARKER} file or "
            f"mergesmith model card) and replacing it would delete {len(held)} entries ({shown}); "
            f"{replacer} replaces only an empty directory or an earlier mergesmith output: move those files "
            "away yourself or choose another directory"
        )
    return identity(out)


def written_here(directory: Path) -> bool:
    """Whether ``directory`` is an output of this tool: it holds the :data:`MARKER` file, or (an
    output from before the marker) a README.md whose front matter carries the ``mergesmith`` tag."""
    try:
        marker = directory / MARKER
        if marker.is_file() and not marker.is_symlink() and marker.stat().st_size < 1 << 16:
            data = parse_json(marker.read_bytes(), str(marker), error=OutputError)
            if isinstance(data, dict) and data.get("written_by") == "mergesmith":
                return True
        readme = directory / "README.md"
        if readme.is_file() and not readme.is_symlink():
            with open(readme, encoding="utf-8", errors="replace") as f:
                head = f.read(4096)
            if head.startswith("---\n"):
                front = head[4:].split("\n---", 1)[0]
                return "- mergesmith" in front.splitlines()
    except (OSError, OutputError):
        return False
    return False


def write_file(path: Path, text: str) -> None:
    """Write a UTF-8 text file of an output; a failure is an OutputError naming it and the errno."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise os_error(path, exc) from None


def write_marker(directory: Path, kind: str) -> None:
    """Write the :data:`MARKER` file saying this tool wrote ``directory`` and what it holds."""
    from mergesmith._version import __version__

    text = json.dumps({"written_by": "mergesmith", "version": __version__, "kind": kind}) + "\n"
    path = directory / MARKER
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise os_error(path, exc) from None


def os_error(path: Path | str, exc: OSError, doing: str = "cannot write") -> OutputError:
    """An OutputError naming the path, the errno and, for the common ones, the fix."""
    code = errno.errorcode.get(exc.errno or 0, "?")
    hint = {
        "ENOSPC": ": the disk is full; free space or choose an output on another disk",
        "EDQUOT": ": the disk quota is exceeded; free space or choose an output on another disk",
        "EACCES": ": permission denied; choose a directory you can write to",
        "EROFS": ": the file system is read-only; choose another output directory",
        "ENOENT": ": a directory on the way does not exist; create it or choose another path",
        "ENOTDIR": ": part of the path is a file, not a directory; choose another path",
        "EISDIR": ": a directory is in the way; choose another path",
    }.get(code, ": check the path and the disk, then run again")
    return OutputError(f"{path}: {doing}: {os.strerror(exc.errno or 0)} (errno {exc.errno} {code}){hint}")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file beside it renamed over it: the file is whole or, on
    any failure, as it was."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise os_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` for the whole merge: a second merge into the same
    directory is refused instead of interleaving with the first. The lock is a file beside the
    output, locked with flock, so it is released when the process ends however it ends. The file is
    removed when the lock is let go; a process that locked a file already removed (it opened it
    before the removal) sees that the path names another file now and tries again."""
    out = out_dir.resolve()
    path = out.parent / f".{out.name}.mergesmith-lock"
    while True:
        try:
            f = open(path, "a+")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise os_error(path, exc, "cannot create the output lock") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip()  # empty while the holder has locked but not yet written its pid
            f.close()
            holder = f" (pid {printable(pid[:20])})" if pid else ""
            raise OutputError(
                f"{out_dir}: another merge{holder} is writing this output directory; wait for it "
                f"to finish or choose another directory (lock file {path})"
            ) from None
        except BaseException:
            f.close()
            raise
        if _same_file(f.fileno(), path):
            break
        f.close()  # the holder removed this file after we opened it: lock the one there now
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: see above
    finally:
        f.close()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def identity(out_dir: Path) -> tuple[int, int] | None:
    """Which directory is at ``out_dir`` now (device and inode), None when there is none."""
    try:
        st = os.stat(out_dir)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


_NOW = object()


@contextmanager
def staged_output(
    out_dir: Path,
    inputs: Sequence[Path] = (),
    *,
    force: bool = False,
    kind: str = "merge",
    seen: object = _NOW,
    resume: bool = False,
) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``out_dir``; on success it replaces ``out_dir``.

    On any failure the staging directory is removed and ``out_dir`` is left as it was, except that
    an interrupt (Ctrl-C, or SIGTERM/SIGHUP through the command line) leaves a staging directory
    whose progress file records finished shards, for ``--resume`` (listed in :data:`kept`). The whole
    time, ``out_dir`` is locked against other merges (:func:`output_lock`); under the lock the
    output is checked (:func:`check_output`) first and again just before it is swapped in. A
    non-empty directory at ``out_dir`` other than the one ``seen`` there when the caller first
    checked it (:func:`identity`; by default, when the lock is taken) is never replaced: it
    appeared while this merge ran. The staging directory gets the :data:`MARKER` file (``kind``
    says what it holds).

    With ``resume``, the newest staging directory a dead run into the same output left with a
    progress file (:mod:`mergesmith.shards`) is taken over instead of a fresh one: the caller
    decides what in it to keep. Other stale staging directories are removed, each one that held
    finished shards named on stderr.
    """
    parent = out_dir.resolve().parent
    kept.clear()  # what an interrupt of this merge leaves
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(parent, exc, "cannot create the output's parent directory") from None
    with output_lock(out_dir):
        if _recover(parent, out_dir.resolve().name) or seen is _NOW:
            seen = identity(out_dir)
        adopted = _clean_stale(parent, out_dir.resolve().name, resume)
        _check_again(out_dir, inputs, force, seen)
        yield from _staged(out_dir, parent, inputs, force, kind, seen, adopted)


def _check_again(out_dir: Path, inputs: Sequence[Path], force: bool, seen: object) -> None:
    check_output(out_dir, inputs, force)
    now = identity(out_dir)
    if now is not None and now != seen and any(out_dir.iterdir()):
        raise OutputError(
            f"output directory {out_dir} appeared or was replaced while this merge ran (another merge "
            "or program wrote it); it was left as it is: run the merge again (with --force to replace "
            "it) or choose another directory"
        )


def _staged(
    out_dir: Path,
    parent: Path,
    inputs: Sequence[Path],
    force: bool,
    kind: str,
    seen: object,
    adopted: Path | None = None,
) -> Iterator[Path]:
    stage = parent / f".{out_dir.resolve().name}{PARTIAL}-{os.getpid()}"
    if stage.exists() and stage != adopted:
        shutil.rmtree(stage)
    try:
        if adopted is None:
            stage.mkdir()
        elif adopted != stage:
            adopted.rename(stage)
    except OSError as exc:
        if adopted is not None:
            shutil.rmtree(adopted, ignore_errors=True)
        raise os_error(stage, exc, "cannot create") from None
    try:
        yield stage
        write_marker(stage, kind)
        _check_again(out_dir, inputs, force, seen)
        _replace(stage, out_dir.resolve(), out_dir, force, seen)
    except BaseException as exc:
        summary = stale_summary(stage) if isinstance(exc, KeyboardInterrupt) else None
        if summary is not None and summary[0]:
            kept.append((stage, *summary))  # interrupted with finished shards: --resume takes them up
        else:
            shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace(stage: Path, out: Path, shown: Path, force: bool, seen: object) -> None:
    """Put ``stage`` at ``out``. An existing ``out`` is swapped with it in one step where the
    system can (renameat2 RENAME_EXCHANGE); else it is first moved aside under a name the next
    run recognises and puts back (:func:`_recover`) should this process die between the renames."""
    if not out.exists():
        try:
            stage.rename(out)  # also replaces a directory made empty meanwhile, never a full one
        except OSError as exc:
            raise os_error(shown, exc, "cannot move the finished merge into place") from None
        completed.append(out)
        return
    if _exchange(stage, out):
        # ``stage`` now holds the previous output: check it is still what was allowed to go
        if any(stage.iterdir()) and (identity(stage) != seen or not (force and written_here(stage))):
            _exchange(stage, out)
            raise OutputError(
                f"output directory {shown} changed while the merge ran and is no longer an empty "
                "directory or an earlier mergesmith output; it was left as it is: choose another directory"
            )
        completed.append(out)
        shutil.rmtree(stage, ignore_errors=True)
        return
    old = out.parent / f".{out.name}{PARTIAL}-old-{os.getpid()}"
    try:
        out.rename(old)
    except OSError as exc:
        raise os_error(shown, exc, "cannot move the previous output aside") from None
    _between_renames()
    try:
        stage.rename(out)
    except OSError as exc:
        old.rename(out)
        raise os_error(shown, exc, "cannot move the finished merge into place") from None
    completed.append(out)
    shutil.rmtree(old, ignore_errors=True)


def _between_renames() -> None:
    """Called between the two renames of the fallback replacement (a place for tests to stop)."""


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where it is not
    available (another system, an old C library or kernel, a file system without it)."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise os_error(b, OSError(code, os.strerror(code)), "cannot swap in the finished merge")


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _recover(parent: Path, name: str) -> bool:
    """Put back a previous output that a run which died between the two renames of
    :func:`_replace` left aside, when nothing took its place; True if one was put back."""
    out = parent / name
    found = False
    for p in sorted(parent.glob(f".{glob.escape(name)}{PARTIAL}-old-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)) and not out.exists() and not out.is_symlink():
            try:
                p.rename(out)
            except OSError as exc:
                raise os_error(p, exc, f"cannot put the previous output back at {out}") from None
            print(
                f"note: put back {out}, the previous output an interrupted run had moved aside to {p.name}",
                file=sys.stderr,
            )
            found = True
    return found


def _clean_stale(parent: Path, name: str, resume: bool = False) -> Path | None:
    """Remove staging directories of earlier runs into the same output whose process is gone; with
    ``resume``, keep and return the newest one holding a progress file (None when there is none).
    A removed one that held finished shards is named on stderr."""
    stale = _stale(parent, name)
    adopted = None
    if resume:
        with_progress = [p for p in stale if (p / MANIFEST).is_file()]
        if with_progress:
            adopted = max(with_progress, key=lambda p: ((p / MANIFEST).stat().st_mtime_ns, p.name))
        else:
            print(
                f"resume: no interrupted merge into {name} was found; merging from the start", file=sys.stderr
            )
    for p in stale:
        if p == adopted:
            continue
        summary = stale_summary(p)
        if summary is not None and summary[0] and not resume:
            print(
                f"note: removed {p.name}, an interrupted merge into {name} with {summary[0]} of "
                f"{summary[1]} shards done; --resume would have kept them",
                file=sys.stderr,
            )
        shutil.rmtree(p, ignore_errors=True)
    return adopted


def _stale(parent: Path, name: str) -> list[Path]:
    """The staging directories of earlier runs into output ``name`` whose process is gone."""
    found = []
    for p in parent.glob(f".{glob.escape(name)}{PARTIAL}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            found.append(p)
    return found


def resumable(out_dir: Path) -> bool:
    """Whether a dead run into ``out_dir`` left a staging directory with a progress file, which
    ``--resume`` would take over."""
    out = out_dir.resolve()
    return any((p / MANIFEST).is_file() for p in _stale(out.parent, out.name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_summary(stage: Path) -> tuple[int, int] | None:
    """(finished shards, all shards) of a staging directory's progress file, None without one."""
    try:
        data = json.loads((stage / MANIFEST).read_text(encoding="utf-8"))
        return len(data["done"]), int(data["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
