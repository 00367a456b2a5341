"""``mergesmith compare``: evaluate base, parents and merged models side by side; write a report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mergesmith import defaults
from mergesmith.commands._common import (
    Command,
    Subparsers,
    eval_options,
    paths,
    print_report,
    say,
    threads_option,
)

__all__ = ["add_parser", "interrupted", "run"]


def add_parser(sub: Subparsers) -> None:
    c = sub.add_parser(
        "compare", help="evaluate base, parents and merged models side by side; write a report"
    )
    c.add_argument("--tasks", nargs="+", required=True, help="JSONL files of {prompt, answer} objects")
    c.add_argument("--base", help="the base model")
    c.add_argument(
        "--parents", nargs="+", required=True, metavar="[NAME=]MODEL", help="the fine-tunes that were merged"
    )
    c.add_argument("--merged", nargs="+", required=True, metavar="[NAME=]MODEL", help="merged models")
    c.add_argument(
        "--owner",
        action="append",
        default=[],
        metavar="TASK=NAME",
        help="the parent that owns a task (default: the parent that scores best on it)",
    )
    c.add_argument("--out", default=".", help="directory for compare_report.{md,json,png} (default .)")
    eval_options(c, defaults.BATCH_SIZE)
    threads_option(c)
    c.add_argument("--device", default=defaults.DEVICE, help=f"cpu or cuda (default {defaults.DEVICE})")


def run(args: argparse.Namespace) -> int:
    from mergesmith.evaluate import load_task
    from mergesmith.report import compare, labels, write_report

    _report_outside_inputs(args.out, [*args.parents, *args.merged, *([args.base] if args.base else [])])
    tasks = [load_task(t) for t in args.tasks]
    parents = dict(zip(labels(args.parents), paths(args.parents)))
    merged = {label: (path, list(parents)) for label, path in zip(labels(args.merged), paths(args.merged))}
    owners = dict(zip(labels(args.owner), paths(args.owner)))
    report = compare(
        tasks,
        parents,
        merged,
        base=args.base,
        owners=owners,
        batch_size=args.batch_size,
        device=args.device,
        progress=sys.stderr.isatty(),
        add_special_tokens=args.add_special_tokens,
        say=say,
    )
    print_report(report, write_report(report, args.out, stem="compare_report"))
    return 0


def _report_outside_inputs(out: str, models: Sequence[str | None]) -> None:
    """Reports are never written into an input model's directory (a ``base+adapter`` names two)."""
    from pathlib import Path

    from mergesmith.errors import OutputError

    target = Path(out).resolve()
    for spec in paths([m for m in models if m]):
        for part in dict.fromkeys([spec, *spec.split("+")]):
            src = Path(part)
            if part and src.is_dir() and (target == src.resolve() or src.resolve() in target.parents):
                raise OutputError(
                    f"--out {out} is inside input model {part}; the report would be written into the "
                    "model's directory: choose a directory outside every input model"
                )


def interrupted(args: argparse.Namespace) -> str:
    return f"the report files in {args.out} may be missing or from an earlier run"


COMMAND = Command("compare", add_parser, run, interrupted=interrupted)
