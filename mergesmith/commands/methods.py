"""``mergesmith methods``: list every merge method with its parameters."""

from __future__ import annotations

import argparse

from mergesmith.commands._common import Command, Subparsers

__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    sub.add_parser("methods", help="list every merge method with its parameters")


def run(args: argparse.Namespace) -> int:
    from mergesmith.docs import methods_text

    print(methods_text())
    return 0


COMMAND = Command("methods", add_parser, run)
