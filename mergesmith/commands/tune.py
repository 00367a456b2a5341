"""``mergesmith tune``: search merge parameters marked {search: [low, high]} against the evaluation."""

from __future__ import annotations

import argparse

from mergesmith import defaults
from mergesmith.commands._common import Command, Subparsers, eval_options, key_values, say, threads_option

__all__ = ["add_parser", "interrupted", "run"]


def add_parser(sub: Subparsers) -> None:
    t = sub.add_parser(
        "tune", help="search merge parameters marked {search: [low, high]} against the evaluation"
    )
    t.add_argument("config", help="merge config with some values written as {search: [low, high]}")
    t.add_argument("--tasks", nargs="+", required=True, help="JSONL files of {prompt, answer} objects")
    t.add_argument(
        "--trials",
        type=int,
        default=defaults.TRIALS,
        help=f"trials in the study, counting earlier runs (default {defaults.TRIALS})",
    )
    t.add_argument(
        "--out", default="tune-out", help="study.db, best.yml, best/, search.png (default tune-out)"
    )
    t.add_argument(
        "--sampler",
        choices=["tpe", "cmaes", "grid"],
        default=defaults.SAMPLER,
        help=f"Optuna sampler (default {defaults.SAMPLER})",
    )
    t.add_argument(
        "--grid-steps",
        type=int,
        default=defaults.GRID_STEPS,
        help=f"grid: values per searched parameter (default {defaults.GRID_STEPS})",
    )
    t.add_argument("--seed", type=int, default=defaults.SEED, help=f"sampler seed (default {defaults.SEED})")
    t.add_argument(
        "--workers",
        type=int,
        default=defaults.WORKERS,
        help="trials run at once, each worker holding the parents",
    )
    t.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=defaults.EXECUTOR,
        help="local processes or Ray actors",
    )
    t.add_argument("--study-name", help="name of the study in study.db (default: the config's file name)")
    t.add_argument(
        "--penalty",
        type=float,
        default=defaults.PENALTY,
        help=f"weight of accuracy lost below the base (default {defaults.PENALTY:g})",
    )
    t.add_argument(
        "--task-weight",
        action="append",
        default=[],
        metavar="TASK=W",
        help="weight of a task in the objective",
    )
    eval_options(t, defaults.TUNE_BATCH_SIZE)
    threads_option(t)
    t.add_argument(
        "--stop-early",
        action="store_true",
        help="stop scoring a trial once it cannot beat the best trial even if every example left were "
        "right (recorded as pruned; the best trial is the same)",
    )
    t.add_argument("--device", default=defaults.DEVICE, help=f"cpu or cuda (default {defaults.DEVICE})")
    t.add_argument(
        "--no-best", action="store_true", help="do not merge and evaluate the best config at the end"
    )


def run(args: argparse.Namespace) -> int:
    from mergesmith import _yaml
    from mergesmith._text import printable
    from mergesmith.errors import ConfigError
    from mergesmith.tune import tune

    weights: dict[str, float] = {}
    for task, weight in key_values(args.task_weight, "--task-weight").items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            shown = f"{task}={weight}"
            raise ConfigError(
                f"--task-weight {_yaml.excerpt(shown, 80)}: expected a number, e.g. --task-weight TASK=2"
            )
        weights[task] = float(weight)
    result = tune(
        args.config,
        args.tasks,
        args.out,
        trials=args.trials,
        sampler=args.sampler,
        seed=args.seed,
        grid_steps=args.grid_steps,
        workers=args.workers,
        executor=args.executor,
        study_name=args.study_name,
        penalty=args.penalty,
        task_weights=weights,
        device=args.device,
        batch_size=args.batch_size,
        write_best=not args.no_best,
        stop_early=args.stop_early,
        progress=say,
        threads=args.threads,
        add_special_tokens=args.add_special_tokens,
        tune_memory=True,
    )
    start = f"{result.default_objective:.4f}" if result.default_objective is not None else "n/a"
    stopped = f" ({result.stopped_early} stopped early)" if result.stopped_early else ""
    print(
        f"best objective {result.best_objective:.4f} (starting values: {start}) after {result.trials} trials"
        f"{stopped}, {result.seconds_per_trial:.2f} s per trial: "
        + printable(", ".join(f"{k}={v:.4g}" for k, v in result.best_values.items()))
    )
    print("written: " + ", ".join(str(p) for p in result.files))
    return 0


def interrupted(args: argparse.Namespace) -> str:
    return (
        f"{args.out} is partial: study.db keeps the finished trials (run the same command again to "
        "go on); best.yml, the summary, the plots and best/ may be missing or from an earlier run"
    )


COMMAND = Command("tune", add_parser, run, interrupted=interrupted)
