"""``mergesmith lora extract`` and ``mergesmith lora merge``: LoRA adapter tools."""

from __future__ import annotations

import argparse

from mergesmith import defaults
from mergesmith.commands._common import Command, Subparsers, force_option, key_values

__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser("lora", help="LoRA adapter tools")
    parser.set_defaults(lora_help=parser.print_help)
    lora = parser.add_subparsers(dest="lora_command", metavar="TOOL")
    ex = lora.add_parser("extract", help="extract a PEFT LoRA adapter from a fine-tuned model and its base")
    ex.add_argument("base", help="the base model (path or Hub id)")
    ex.add_argument("model", help="the fine-tuned model (path or Hub id)")
    ex.add_argument("out_dir", help="output adapter directory")
    size = ex.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every module")
    size.add_argument(
        "--energy",
        type=float,
        help="per module, the smallest rank keeping this fraction of the change's energy",
    )
    ex.add_argument(
        "--save-others",
        action="store_true",
        help="store embeddings, norms and other non-matrix tensors whole (modules_to_save) instead of skipping them",
    )
    force_option(ex)
    lm = lora.add_parser("merge", help="merge LoRA adapters of one base into one adapter (weighted sum)")
    lm.add_argument("out_dir", help="output adapter directory")
    lm.add_argument("adapters", nargs="+", help="adapter directories or Hub ids")
    lm.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    lm.add_argument(
        "--rank", type=int, help="truncate each module to this rank (default: exact, summed ranks)"
    )
    lm.add_argument(
        "--method",
        default=defaults.LORA_METHOD,
        help=f"linear (exact weighted sum), knots_ties, or a task-vector method such as ties or "
        f"dare_ties run in the adapters' shared SVD basis (default {defaults.LORA_METHOD})",
    )
    lm.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a merge-wide parameter of --method (repeatable), e.g. --param normalize=false",
    )
    lm.add_argument(
        "--seed", type=int, default=defaults.SEED, help=f"seed for random methods (default {defaults.SEED})"
    )
    lm.add_argument(
        "--densities", type=float, nargs="+", help="knots_ties: one density per adapter (default 1)"
    )
    lm.add_argument(
        "--lambda",
        dest="lambda_",
        type=float,
        default=defaults.LORA_LAMBDA,
        help="scale of the merged update",
    )
    force_option(lm)
    lm.add_argument(
        "--on-nonfinite",
        choices=["error", "warn"],
        default=defaults.ON_NONFINITE,
        help="a factor with NaN/Inf or overflowing float32: stop (error) or write it and warn "
        f"(default {defaults.ON_NONFINITE})",
    )


def run(args: argparse.Namespace) -> int:
    if args.lora_command == "merge":
        return _merge(args)
    if args.lora_command != "extract":
        args.lora_help()
        raise SystemExit(0)
    return _extract(args)


def _merge(args: argparse.Namespace) -> int:
    from mergesmith._text import printable
    from mergesmith.lora_merge import merge_adapters

    merged = merge_adapters(
        args.adapters,
        args.out_dir,
        weights=args.weights,
        rank=args.rank,
        method=args.method,
        densities=args.densities,
        lambda_=args.lambda_,
        params=key_values(args.param),
        seed=args.seed,
        force=args.force,
        on_nonfinite=args.on_nonfinite,
    )
    worst = max(merged, key=lambda r: r.relative_error, default=None)
    print(
        f"merged {len(args.adapters)} adapters ({len(merged)} modules) into {args.out_dir}"
        + (f"; worst relative error {worst.relative_error:.3g} ({printable(worst.module)})" if worst else "")
    )
    return 0


def _extract(args: argparse.Namespace) -> int:
    from mergesmith._text import printable
    from mergesmith.extract import extract_lora

    reports = extract_lora(
        args.base,
        args.model,
        args.out_dir,
        rank=args.rank,
        energy=args.energy,
        save_others=args.save_others,
        force=args.force,
    )
    worst = max(reports, key=lambda r: r.relative_error, default=None)
    print(
        f"extracted {len(reports)} modules into {args.out_dir}"
        + (f"; worst relative error {worst.relative_error:.3g} ({printable(worst.module)})" if worst else "")
    )
    return 0


COMMAND = Command("lora", add_parser, run)
