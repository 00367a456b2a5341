"""``mergesmith eval``: exact-match accuracy and answer loss of a model on JSONL tasks."""

from __future__ import annotations

import argparse
import sys

from mergesmith import defaults
from mergesmith.commands._common import Command, Subparsers, at_least_1, eval_options, say, threads_option

__all__ = ["add_parser", "interrupted", "run"]


def add_parser(sub: Subparsers) -> None:
    ev = sub.add_parser("eval", help="exact-match accuracy and answer loss of a model on JSONL tasks")
    ev.add_argument("model", help="model directory or Hub id")
    ev.add_argument("--tasks", nargs="+", default=[], help="JSONL files of {prompt, answer} objects")
    ev.add_argument(
        "--lm-eval",
        nargs="+",
        default=[],
        metavar="TASK",
        help="lm-evaluation-harness task names (needs pip install 'mergesmith[lm-eval]')",
    )
    ev.add_argument("--limit", type=at_least_1, help="--lm-eval: at most this many examples per task")
    eval_options(ev, defaults.BATCH_SIZE)
    threads_option(ev)
    ev.add_argument("--device", default=defaults.DEVICE, help=f"cpu or cuda (default {defaults.DEVICE})")
    ev.add_argument("--json", help="also write the scores to this JSON file")


def run(args: argparse.Namespace) -> int:
    from mergesmith._text import printable
    from mergesmith.errors import ConfigError
    from mergesmith.evaluate import evaluate, evaluate_harness, load_task

    if not args.tasks and not args.lm_eval:
        raise ConfigError("eval: give JSONL task files with --tasks, or harness tasks with --lm-eval")
    tasks = [load_task(p) for p in args.tasks]
    scores = []
    if tasks:
        say(f"model 1/1: {args.model}")
        scores += evaluate(
            args.model,
            tasks,
            batch_size=args.batch_size,
            device=args.device,
            progress=sys.stderr.isatty(),
            add_special_tokens=args.add_special_tokens,
            say=say,
        )
    if args.lm_eval:
        scores += evaluate_harness(
            args.model, args.lm_eval, batch_size=args.batch_size, device=args.device, limit=args.limit
        )
    print(f"{'task':<20} {'examples':>8} {'accuracy':>8} {'loss':>8} {'ppl':>8}")
    for s in scores:
        print(
            f"{printable(s.task):<20} {s.examples:>8} {s.accuracy:>8.3f} {s.loss:>8.4f} {s.perplexity:>8.3f}"
        )
    if args.json:
        import json
        from dataclasses import asdict
        from pathlib import Path

        from mergesmith._output import atomic_write

        atomic_write(Path(args.json), json.dumps([asdict(s) for s in scores], indent=2) + "\n")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    return f"no scores were written to {args.json}" if args.json else "nothing was written"


COMMAND = Command("eval", add_parser, run, interrupted=interrupted)
