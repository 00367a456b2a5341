"""``mergesmith validate``: check a config and its inputs from headers; print the plan."""

from __future__ import annotations

import argparse
import sys

from mergesmith.commands._common import Command, Subparsers

__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    v = sub.add_parser("validate", help="check a config and its inputs from headers; print the plan")
    v.add_argument("config")
    v.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print the method, the models and the summary, not every tensor",
    )


def run(args: argparse.Namespace) -> int:
    from mergesmith._text import printable
    from mergesmith.api import validate

    plan = validate(args.config)
    lines = plan.describe().splitlines()
    print(printable("\n".join(lines[: len(plan.models) + 3]) if args.quiet else "\n".join(lines)))
    print(f"ok: {args.config} is valid", file=sys.stderr)
    return 0


COMMAND = Command("validate", add_parser, run)
