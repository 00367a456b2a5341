"""``mergesmith moe``: build a mixture of experts from fine-tunes of one base (mergekit-moe config)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mergesmith import defaults
from mergesmith.commands._common import Command, Subparsers, at_least_1, force_option, say, threads_option

if TYPE_CHECKING:
    from mergesmith.moe.build import MoEPlan

__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    mo = sub.add_parser(
        "moe", help="build a mixture of experts from fine-tunes of one base (mergekit-moe config)"
    )
    mo.add_argument("config", help="YAML mergekit-moe config: base_model, experts, gate_mode, ...")
    mo.add_argument("out_dir", help="output directory (appears only when the model is complete)")
    force_option(mo)
    mo.add_argument(
        "--device",
        default=defaults.DEVICE,
        help=f"device for the gate prompts: cpu or cuda (default {defaults.DEVICE})",
    )
    mo.add_argument(
        "--seed",
        type=int,
        default=defaults.SEED,
        help=f"seed of the random gates and the experts' noise (default {defaults.SEED})",
    )
    mo.add_argument(
        "--max-shard-size",
        default=defaults.SHARD_SIZE,
        help=f"largest output shard (default {defaults.size_text(defaults.SHARD_SIZE)})",
    )
    mo.add_argument("--dry-run", action="store_true", help="check the config and its models, write nothing")
    mo.add_argument(
        "--report",
        nargs="+",
        metavar="TASK",
        help="after building, route these JSONL tasks through the model and write "
        "routing_report.{md,json} beside it: per layer, the share of tokens sent to each expert",
    )
    mo.add_argument(
        "--batch-size",
        type=at_least_1,
        default=defaults.BATCH_SIZE,
        help="--report: examples per forward pass",
    )
    threads_option(mo)


def run(args: argparse.Namespace) -> int:
    import time

    from mergesmith._text import printable
    from mergesmith.moe.build import moe, plan_moe

    if args.dry_run:
        print(_describe(plan_moe(args.config, seed=args.seed)))
        return 0
    tasks = []
    if args.report:  # a bad task file is found before the build, not after it
        from mergesmith.evaluate import load_task

        tasks = [load_task(t) for t in args.report]
    start = time.perf_counter()
    plan = moe(
        args.config,
        args.out_dir,
        force=args.force,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        max_shard_size=args.max_shard_size,
        say=say,
    )
    size = sum(t.nbytes for t in plan.tensors) / 1e6
    print(
        f"built a {plan.layout.class_name} of {len(plan.experts)} experts "
        f"({plan.config.experts_per_token} per token, {plan.config.gate_mode} gates) into "
        f"{printable(str(args.out_dir))} ({len(plan.tensors)} tensors, {size:.1f} MB) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    if tasks:
        from pathlib import Path

        from mergesmith.moe.routing import routing, write_routing

        labels = [e.label for e in plan.config.experts]
        report = routing(args.out_dir, tasks, labels, batch_size=args.batch_size, device=args.device, say=say)
        print(printable(report.to_markdown()), end="")
        print(
            "routing report written to "
            + ", ".join(str(p) for p in write_routing(report, Path(args.out_dir)))
        )
    return 0


def _describe(plan: MoEPlan) -> str:
    from mergesmith._text import printable

    cfg = plan.config
    lines = [
        f"{plan.layout.class_name} from {cfg.base}: {len(cfg.experts)} experts, {cfg.experts_per_token} "
        f"per token, {cfg.gate_mode} gates, {plan.layers} layers, {str(plan.dtype).removeprefix('torch.')}"
    ]
    lines += [f"  expert {i}: {e.source}" for i, e in enumerate(cfg.experts)]
    lines += [f"  shared expert {i}: {e.source}" for i, e in enumerate(cfg.shared_experts)]
    lines.append(f"  {len(plan.tensors)} tensors")
    return printable("\n".join(lines))


COMMAND = Command("moe", add_parser, run)
