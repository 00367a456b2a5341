"""``mergesmith merge``: run a merge config and write the merged model."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from mergesmith import defaults
from mergesmith._mergekit_flags import add_mergekit_flags, apply_mergekit_flags
from mergesmith.commands._common import (
    Command,
    Subparsers,
    eval_options,
    force_option,
    print_report,
    say,
    scale_options,
    settle,
    threads_option,
)

if TYPE_CHECKING:
    from mergesmith.plan import Plan

__all__ = ["add_parser", "interrupted", "run"]


def add_parser(sub: Subparsers) -> None:
    m = sub.add_parser("merge", help="run a merge config and write the merged model")
    m.add_argument("config", help="YAML merge config (mergekit schema)")
    m.add_argument("out_dir", help="output directory (appears only when the merge is complete)")
    force_option(m)
    m.add_argument(
        "--max-shard-size", help=f"largest output shard (default {defaults.size_text(defaults.SHARD_SIZE)})"
    )
    m.add_argument("--device", help=f"device for the arithmetic: cpu or cuda (default {defaults.DEVICE})")
    m.add_argument(
        "--seed", type=int, default=None, help="seed for random methods (default: config's seed or 0)"
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument(
        "--full-digests",
        action="store_true",
        help="record the sha256 of every local input file in the model card (reads the inputs twice)",
    )
    m.add_argument("--dry-run", action="store_true", help="validate and print the plan, write nothing")
    m.add_argument(
        "--no-diagnose",
        action="store_true",
        help="skip the short diagnosis (task-vector sizes, conflicts, vocabulary, cost) printed before merging",
    )
    m.add_argument(
        "--on-nonfinite",
        choices=["error", "warn"],
        default=defaults.ON_NONFINITE,
        help="a merged tensor with NaN/Inf or float16 overflow: stop (error) or write it and warn "
        f"(default {defaults.ON_NONFINITE})",
    )
    m.add_argument(
        "--eval",
        nargs="+",
        metavar="TASK",
        help="after merging, evaluate base, parents and merged model on these JSONL tasks and write "
        "eval_report.{md,json,png} beside the model",
    )
    scale_options(m)
    eval_options(m, defaults.BATCH_SIZE)
    threads_option(m)
    add_mergekit_flags(m)


def run(args: argparse.Namespace) -> int:
    import time

    from mergesmith.api import merge, validate
    from mergesmith.plan import parse_size

    if args.dry_run:
        from mergesmith._text import printable

        print(printable(validate(args.config, max_shard_size=parse_size(args.max_shard_size)).describe()))
        return 0
    tasks = []
    if args.eval:  # a bad task file is found before the merge, not after it
        from mergesmith.evaluate import load_task

        tasks = [load_task(t) for t in args.eval]
    settle()
    start = time.perf_counter()
    plan = merge(
        args.config,
        args.out_dir,
        force=args.force,
        max_shard_size=parse_size(args.max_shard_size),
        device=args.device,
        seed=args.seed,
        progress=False if args.no_progress else None,
        full_digests=args.full_digests,
        on_nonfinite=args.on_nonfinite,
        before=None if args.no_diagnose else _print_diagnosis,
        threads=args.threads,
        copy_tokenizer=args.copy_tokenizer is not False,
        write_model_card=args.write_model_card is not False,
        resume=args.resume,
        workers=args.workers,
        executor=args.executor,
        ray_address=args.ray_address,
        tune_memory=True,
    )
    took = time.perf_counter() - start
    print(
        f"merged {len(plan.jobs)} tensors with {plan.method.name} into {args.out_dir} "
        f"({plan.write_bytes / 1e6:.1f} MB, {len(plan.shards)} shard(s)) in {took:.1f} s"
    )
    if args.eval:
        from mergesmith.config import load_config
        from mergesmith.report import compare, labels, write_report

        config = load_config(args.config)
        base = str(config.base_model) if config.base_model else None
        refs = [str(r) for r in config.referenced_models() if str(r) != base]
        parents = dict(zip(labels(refs), refs))
        report = compare(
            tasks,
            parents,
            {"merged": (args.out_dir, list(parents))},
            base=base,
            batch_size=args.batch_size,
            device=args.device,
            progress=sys.stderr.isatty(),
            add_special_tokens=args.add_special_tokens,
            say=say,
            methods={"merged": config.method},
        )
        print_report(report, write_report(report, args.out_dir))
    return 0


def _print_diagnosis(plan: Plan) -> None:
    from mergesmith import _memory
    from mergesmith._text import printable
    from mergesmith.diagnose import quick_summary

    _memory.tune()  # as the merge that follows runs
    summary = quick_summary(plan)
    if summary is not None:
        print(
            "before merging (`mergesmith diagnose` reads every tensor; --no-diagnose skips this):\n"
            + printable(summary),
            file=sys.stderr,
        )


def interrupted(args: argparse.Namespace) -> str:
    if args.eval:
        return f"the merged model in {args.out_dir} is complete; the evaluation report was not written, or only in part"
    return f"the output in {args.out_dir} is complete"


COMMAND = Command("merge", add_parser, run, prepare=apply_mergekit_flags, interrupted=interrupted)
