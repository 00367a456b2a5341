"""What the commands share: the table's entry type, common options, and output helpers.

Nothing here imports torch: ``mergesmith --help`` builds every command's parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from mergesmith.report import Report

__all__ = [
    "Command",
    "at_least_1",
    "eval_options",
    "force_option",
    "key_values",
    "paths",
    "print_report",
    "say",
    "scale_options",
    "settle",
    "threads_option",
]

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_parser`` adds its parser to the subparsers, ``run`` runs it on the
    parsed arguments and returns the exit status. ``prepare`` turns the arguments into their final
    form before the process is set up for the command (threads); ``interrupted`` says what an
    interrupted run leaves behind once the output directory, if any, is known to be complete or
    absent from it."""

    name: str
    add_parser: Callable[[Subparsers], None]
    run: Callable[[argparse.Namespace], int]
    prepare: Callable[[argparse.Namespace], None] | None = None
    interrupted: Callable[[argparse.Namespace], str] | None = None


def at_least_1(text: str) -> int:
    """A whole number of at least 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def eval_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """--batch-size and --add-special-tokens, as every evaluating command has them."""
    p.add_argument(
        "--batch-size",
        type=at_least_1,
        default=batch_size,
        help=f"examples per forward pass (default {batch_size})",
    )
    p.add_argument(
        "--add-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tokenize prompts with the special tokens the tokenizer adds, such as BOS (default: yes)",
    )


def threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=at_least_1,
        help="torch threads (default: the cores other work leaves idle, by the 1-minute load average and the tasks running now; at least 1)",
    )


def scale_options(p: argparse.ArgumentParser, what: str = "merge") -> None:
    """--resume, --workers, --executor and --ray-address: how a merge is spread and restarted."""
    from mergesmith import defaults

    p.add_argument(
        "--resume",
        action="store_true",
        help=f"take over what a killed {what} into OUT_DIR left and keep its finished shards (same plan only)",
    )
    p.add_argument(
        "--workers",
        type=at_least_1,
        default=defaults.WORKERS,
        help=f"merge the shards in N processes, each with --threads/N torch threads (default {defaults.WORKERS})",
    )
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=defaults.EXECUTOR,
        help=f"local processes or Ray tasks, one per shard (pip install 'mergesmith[ray]') "
        f"(default {defaults.EXECUTOR})",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="--executor ray: the cluster to join (default: $RAY_ADDRESS, else start a local one)",
    )


def force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory written earlier by mergesmith",
    )


def key_values(items: Sequence[str], option: str = "--param") -> dict[str, object]:
    """``KEY=VALUE`` options, values read as YAML scalars (numbers, true/false, text)."""
    import math

    from mergesmith import _yaml
    from mergesmith.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        shown = _yaml.excerpt(item, 80)
        if not sep or not key.strip():
            raise ConfigError(f"{option} {shown}: write it as KEY=VALUE, e.g. {option} density=0.5")
        if len(value) > 1000:
            raise ConfigError(f"{option} {shown}: the value is {len(value):,} characters; give a short value")
        parsed = _yaml.load(value, where=f"{option} {_yaml.excerpt(key.strip())}")
        if isinstance(parsed, (dict, list)):
            raise ConfigError(f"{option} {shown}: expected one value (a number, true/false or text)")
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise ConfigError(f"{option} {shown}: expected a finite number")
        out[key.strip()] = parsed
    return out


def settle() -> None:
    """Exempt everything the imports created from garbage collection: a full collection otherwise
    walks those objects again each time it runs, pausing the work for tens of milliseconds."""
    import gc

    gc.collect()
    gc.freeze()


def say(line: str) -> None:
    """A progress line on stderr, text from files made printable."""
    from mergesmith._text import printable

    print(printable(line), file=sys.stderr, flush=True)


def paths(models: Sequence[str]) -> list[str]:
    """The paths of ``[NAME=]MODEL`` arguments."""
    return [m.partition("=")[2] if "=" in m else m for m in models]


def print_report(report: Report, written: Sequence[object]) -> None:
    from mergesmith._text import printable

    print(printable(report.to_markdown()), end="")
    print("report written to " + ", ".join(str(p) for p in written))
