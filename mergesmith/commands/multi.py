"""``mergesmith multi``: run a multi-stage config (mergekit-multi): merges of earlier merges."""

from __future__ import annotations

import argparse

from mergesmith import defaults
from mergesmith.commands._common import Command, Subparsers, say, scale_options, threads_option

__all__ = ["add_parser", "interrupted", "run"]


def add_parser(sub: Subparsers) -> None:
    mu = sub.add_parser("multi", help="run a multi-stage config (mergekit-multi): merges of earlier merges")
    mu.add_argument("config", help="YAML merge configs, one document per stage, each with a name")
    mu.add_argument("stages_dir", nargs="?", metavar="OUT_DIR", help="the named stages go to OUT_DIR/<name>")
    mu.add_argument("-I", "--intermediate-dir", help="OUT_DIR, as mergekit-multi spells it")
    mu.add_argument("--out-path", help="where the unnamed stage, the final merge, is written")
    mu.add_argument(
        "--lazy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip stages finished by an earlier run with the same config (default: yes)",
    )
    mu.add_argument(
        "--dry-run", action="store_true", help="check every stage and print the order; merge nothing"
    )
    mu.add_argument(
        "--max-shard-size",
        default=defaults.SHARD_SIZE,
        help=f"largest output shard (default {defaults.size_text(defaults.SHARD_SIZE)})",
    )
    mu.add_argument(
        "--device",
        default=defaults.DEVICE,
        help=f"device for the arithmetic: cpu or cuda (default {defaults.DEVICE})",
    )
    mu.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale_options(mu, "stage")
    threads_option(mu)


def run(args: argparse.Namespace) -> int:
    from mergesmith._text import printable
    from mergesmith.multi import check, load_multi, multi, stages_dir
    from mergesmith.plan import parse_size

    out_dir = stages_dir(args.stages_dir, args.intermediate_dir)
    size = parse_size(args.max_shard_size)
    if args.dry_run:
        plan = load_multi(args.config, out_dir, out_path=args.out_path)
        skip = check(plan, lazy=args.lazy)
        print(plan.describe())
        for stage in plan.stages:
            if stage.name in skip:
                print(f"  {printable(stage.label)}: finished earlier; skipped")
        return 0
    merged = multi(
        args.config,
        out_dir,
        out_path=args.out_path,
        lazy=args.lazy,
        say=say,
        max_shard_size=size,
        device=args.device,
        progress=False if args.no_progress else None,
        threads=args.threads,
        resume=args.resume,
        workers=args.workers,
        executor=args.executor,
        ray_address=args.ray_address,
        tune_memory=True,
    )
    print(
        f"merged {len(merged)} stage(s) of {printable(args.config)}"
        + (f": {', '.join(printable(s.label) for s in merged)}" if merged else " (every stage was finished)")
    )
    return 0


def interrupted(args: argparse.Namespace) -> str:
    from mergesmith.multi import interrupted

    return interrupted()


COMMAND = Command("multi", add_parser, run, interrupted=interrupted)
