"""``mergesmith moe``: build a mixture of experts from fine-tunes of one base (mergekit-moe config)."""

from __future__ import annotations

import argparse

from mergesmith import defaults
from mergesmith.commands._common import Command, Subparsers, at_least_1, force_option, say, threads_option


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
    from mergesmith.moe.cli import run_cli

    return run_cli(args, say)


COMMAND = Command("moe", add_parser, run)
