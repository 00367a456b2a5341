"""``mergesmith diagnose``: lineage, task-vector sizes and conflicts of a merge config's models."""

from __future__ import annotations

import argparse
import sys

from mergesmith import defaults
from mergesmith.commands._common import Command, Subparsers, settle

__all__ = ["add_parser", "interrupted", "run"]


def add_parser(sub: Subparsers) -> None:
    dg = sub.add_parser(
        "diagnose", help="lineage, task-vector sizes and conflicts of a merge config's models"
    )
    dg.add_argument(
        "config",
        nargs="?",
        help="merge config with a base_model; or, with --base, the models to compare with the base",
    )
    dg.add_argument("models", nargs="*", help=argparse.SUPPRESS)
    dg.add_argument(
        "--base", help="compare MODEL... with this base instead of reading a config: diagnose --base B M1 M2"
    )
    dg.add_argument(
        "--out", help="also write diagnosis.json, diagnosis.html and its plots into this directory"
    )
    dg.add_argument(
        "--density",
        type=float,
        help=f"trim to this density for the sign conflicts (default: the config's, else {defaults.DENSITY})",
    )
    dg.add_argument("--no-progress", action="store_true", help="no progress bar")
    dg.add_argument(
        "--sample",
        type=int,
        default=defaults.SAMPLE,
        help="entries per tensor the figures are computed on, the same in every model; 0: every entry "
        f"(default {defaults.SAMPLE}; smaller tensors are used whole)",
    )


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from mergesmith import _memory
    from mergesmith._output import check_inside
    from mergesmith._text import printable
    from mergesmith.api import validate
    from mergesmith.diagnose import diagnose, write_diagnosis

    plan = validate(_diagnose_config(args))  # type: ignore[arg-type]
    inputs = [d for m in plan.models for d in m.dirs]
    if args.out:
        check_inside(Path(args.out), inputs)
    _memory.tune()
    settle()
    start = time.perf_counter()
    found = diagnose(
        plan,
        density=args.density,
        sample=args.sample,
        progress=sys.stderr.isatty() and not args.no_progress,
    )
    print(printable(found.summary()))
    print(f"diagnosed {found.tensors} tensors per model in {time.perf_counter() - start:.2f} s")
    if args.out:
        print("written: " + ", ".join(str(p) for p in write_diagnosis(found, args.out, inputs)))
    return 0


def _diagnose_config(args: argparse.Namespace) -> object:
    """The config file to diagnose, or with ``--base B M1 M2 ...`` a task-arithmetic config of
    weight 1 per model (the figures do not depend on the method)."""
    from mergesmith.errors import ConfigError

    if args.base is None:
        if args.config is None or args.models:
            raise ConfigError(
                "diagnose: give one merge config, or --base BASE MODEL... to compare models with a base"
            )
        return args.config
    models = ([args.config] if args.config is not None else []) + list(args.models)
    if not models:
        raise ConfigError("diagnose --base BASE: name the models to compare with it, e.g. --base B M1 M2")
    return {
        "merge_method": "task_arithmetic",
        "base_model": args.base,
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
    }


def interrupted(args: argparse.Namespace) -> str:
    if not args.out:
        return "nothing was written"
    return (
        f"{args.out} may hold only some of diagnosis.json, diagnosis.html and the plots; each file "
        "there is whole: run diagnose again for the rest"
    )


COMMAND = Command("diagnose", add_parser, run, interrupted=interrupted)
