"""``mergesmith moe``: the command line's handler."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mergesmith._text import printable

__all__ = ["run_cli"]


def run_cli(args: Any, say: Callable[[str], None]) -> int:
    """``args`` as the command line's parser leaves them."""
    from mergesmith.moe.build import moe, plan_moe

    if args.dry_run:
        plan = plan_moe(args.config, seed=args.seed)
        print(describe(plan))
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


def describe(plan: Any) -> str:
    cfg = plan.config
    lines = [
        f"{plan.layout.class_name} from {cfg.base}: {len(cfg.experts)} experts, {cfg.experts_per_token} "
        f"per token, {cfg.gate_mode} gates, {plan.layers} layers, {str(plan.dtype).removeprefix('torch.')}"
    ]
    lines += [f"  expert {i}: {e.source}" for i, e in enumerate(cfg.experts)]
    lines += [f"  shared expert {i}: {e.source}" for i, e in enumerate(cfg.shared_experts)]
    lines.append(f"  {len(plan.tensors)} tensors")
    return printable("\n".join(lines))
