"""The ``mergesmith`` command line: parse, dispatch to the command table
(:data:`mergesmith.commands.COMMANDS`), and turn errors and signals into messages and exit codes.

The process-wide settings a command runs with are made here and in the commands' handlers, never
by the API: transparent huge pages for torch's large tensors, torch's thread count, the C
allocator (``mergesmith._memory.tune``) and ``gc.freeze``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from mergesmith._version import __version__
from mergesmith.commands import COMMANDS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergesmith",
        description="Merge fine-tuned checkpoints of one base model into a single model.",
    )
    p.add_argument("--version", action="version", version=f"mergesmith {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _config_warnings():
        return _main(args)


@contextlib.contextmanager
def _config_warnings() -> Iterator[None]:
    """A config setting that has no effect is shown on stderr as ``warning: ...``, once a run
    however often the config is read (tune reads it for every trial)."""
    import warnings

    from mergesmith._text import printable
    from mergesmith.config import ConfigWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        shown = warnings.showwarning
        seen: set[str] = set()

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, ConfigWarning):
                if str(message) not in seen:
                    seen.add(str(message))
                    print(f"warning: {printable(str(message))}", file=sys.stderr)
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = show
        yield


def _main(args: argparse.Namespace) -> int:
    if args.command is None:
        _parser().print_help()
        return 2
    command = COMMANDS[args.command]
    # Large CPU tensors on transparent huge pages: fewer page faults when each job allocates
    # fresh full-size buffers. Read by torch when it loads, so it is set before the first import.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from mergesmith._text import printable
    from mergesmith.errors import MergesmithError

    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGHUP, _terminated)
    previous = _previous_output(args)
    try:
        if command.prepare is not None:
            command.prepare(args)
        if hasattr(args, "threads"):
            import torch

            from mergesmith._threads import positive_threads

            torch.set_num_threads(positive_threads(args.threads))
        return command.run(args)
    except MergesmithError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted: {_interrupted(args, previous)}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except BrokenPipeError:
        # the reader went away (e.g. `mergesmith methods | head`): stop quietly

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class _Signalled(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP end a command like Ctrl-C: the partial output is removed on the way out
    and the exit status is 128 + the signal's number. Further ones are ignored while that happens."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise _Signalled(signum)


def _previous_output(args: argparse.Namespace) -> bool:
    """Whether the output directory of a merge or LoRA command holds something already."""
    out = getattr(args, "out_dir", None)
    if out is None or not os.path.isdir(out):
        return False
    try:
        with os.scandir(out) as entries:
            return any(entries)
    except OSError:
        return False


def _interrupted(args: argparse.Namespace, previous: bool) -> str:
    """What an interrupted command leaves behind, said accurately: an output directory not yet
    complete is absent; otherwise the command says what it may have left."""
    from mergesmith import _output

    out = getattr(args, "out_dir", None)
    if out is not None:
        done = any(os.path.realpath(p) == os.path.realpath(out) for p in _output.completed)
        if not done:
            left = "no output was written"
            if previous:
                left += f"; the previous contents of {out} were left untouched"
            for stage, finished, shards in _output.kept:
                left += (
                    f"; {finished} of {shards} finished shards were kept in {stage}: run the same command "
                    "with --resume to continue from them (without it, the next run removes them)"
                )
            return left
    said = COMMANDS[args.command].interrupted
    if said is not None:
        return said(args)
    return f"the output in {out} is complete" if out is not None else "nothing was written"


if __name__ == "__main__":
    raise SystemExit(main())
