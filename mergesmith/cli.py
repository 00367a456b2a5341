"""The ``mergesmith`` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mergesmith import __version__

if TYPE_CHECKING:
    from mergesmith.plan import Plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergesmith",
        description="Merge fine-tuned checkpoints of one base model into a single model.",
    )
    p.add_argument("--version", action="version", version=f"mergesmith {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("merge", help="run a merge config and write the merged model")
    m.add_argument("config", help="YAML merge config (mergekit schema)")
    m.add_argument("out_dir", help="output directory (appears only when the merge is complete)")
    m.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    m.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    m.add_argument("--device", default="cpu", help="device for the arithmetic: cpu or cuda (default cpu)")
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
        default="error",
        help="a merged tensor with NaN/Inf or float16 overflow: stop (error, default) or write it and warn",
    )
    m.add_argument(
        "--eval",
        nargs="+",
        metavar="TASK",
        help="after merging, evaluate base, parents and merged model on these JSONL tasks and write "
        "eval_report.{md,json,png} beside the model",
    )
    m.add_argument("--batch-size", type=int, default=32, help="--eval: examples per forward pass")

    v = sub.add_parser("validate", help="check a config and its inputs from headers; print the plan")
    v.add_argument("config")
    v.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print the method, the models and the summary, not every tensor",
    )

    sub.add_parser("methods", help="list every merge method with its parameters")

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
    ev.add_argument("--limit", type=int, help="--lm-eval: at most this many examples per task")
    ev.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default 32)")
    ev.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ev.add_argument("--json", help="also write the scores to this JSON file")

    c = sub.add_parser(
        "compare", help="evaluate base, parents and merged models side by side; write a report"
    )
    c.add_argument("--tasks", nargs="+", required=True, help="JSONL files of {prompt, answer} objects")
    c.add_argument("--base", help="the base model")
    c.add_argument(
        "--parents", nargs="+", required=True, metavar="[NAME=]MODEL", help="the fine-tunes that were merged"
    )
    c.add_argument("--merged", nargs="+", required=True, metavar="[NAME=]MODEL", help="merged models")
    c.add_argument(
        "--owner",
        action="append",
        default=[],
        metavar="TASK=NAME",
        help="the parent that owns a task (default: the parent that scores best on it)",
    )
    c.add_argument("--out", default=".", help="directory for compare_report.{md,json,png} (default .)")
    c.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default 32)")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")

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
        help="trim to this density for the sign conflicts (default: the config's, else 0.2)",
    )
    dg.add_argument("--no-progress", action="store_true", help="no progress bar")
    dg.add_argument(
        "--sample",
        type=int,
        default=1 << 16,
        help="entries per tensor the figures are computed on, the same in every model; 0: every entry "
        "(default 65536; smaller tensors are used whole)",
    )

    t = sub.add_parser(
        "tune", help="search merge parameters marked {search: [low, high]} against the evaluation"
    )
    t.add_argument("config", help="merge config with some values written as {search: [low, high]}")
    t.add_argument("--tasks", nargs="+", required=True, help="JSONL files of {prompt, answer} objects")
    t.add_argument(
        "--trials", type=int, default=20, help="trials in the study, counting earlier runs (default 20)"
    )
    t.add_argument(
        "--out", default="tune-out", help="study.db, best.yml, best/, search.png (default tune-out)"
    )
    t.add_argument(
        "--sampler", choices=["tpe", "cmaes", "grid"], default="tpe", help="Optuna sampler (default tpe)"
    )
    t.add_argument(
        "--grid-steps", type=int, default=3, help="grid: values per searched parameter (default 3)"
    )
    t.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    t.add_argument(
        "--workers", type=int, default=1, help="trials run at once, each worker holding the parents"
    )
    t.add_argument(
        "--executor", choices=["local", "ray"], default="local", help="local processes or Ray actors"
    )
    t.add_argument("--study-name", help="name of the study in study.db (default: the config's file name)")
    t.add_argument(
        "--penalty", type=float, default=1.0, help="weight of accuracy lost below the base (default 1)"
    )
    t.add_argument(
        "--task-weight",
        action="append",
        default=[],
        metavar="TASK=W",
        help="weight of a task in the objective",
    )
    t.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default 64)")
    t.add_argument(
        "--stop-early",
        action="store_true",
        help="stop scoring a trial once it cannot beat the best trial even if every example left were "
        "right (recorded as pruned; the best trial is the same)",
    )
    t.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    t.add_argument(
        "--no-best", action="store_true", help="do not merge and evaluate the best config at the end"
    )

    lora = sub.add_parser("lora", help="LoRA adapter tools").add_subparsers(
        dest="lora_command", metavar="TOOL"
    )
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
    ex.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    lm = lora.add_parser("merge", help="merge LoRA adapters of one base into one adapter (weighted sum)")
    lm.add_argument("out_dir", help="output adapter directory")
    lm.add_argument("adapters", nargs="+", help="adapter directories or Hub ids")
    lm.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    lm.add_argument(
        "--rank", type=int, help="truncate each module to this rank (default: exact, summed ranks)"
    )
    lm.add_argument(
        "--method",
        default="linear",
        help="linear (exact weighted sum, default), knots_ties, or a task-vector method such as ties or "
        "dare_ties run in the adapters' shared SVD basis",
    )
    lm.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a merge-wide parameter of --method (repeatable), e.g. --param normalize=false",
    )
    lm.add_argument("--seed", type=int, default=0, help="seed for random methods (default 0)")
    lm.add_argument(
        "--densities", type=float, nargs="+", help="knots_ties: one density per adapter (default 1)"
    )
    lm.add_argument("--lambda", dest="lambda_", type=float, default=1.0, help="scale of the merged update")
    lm.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return p


def _key_values(items: Sequence[str], option: str = "--param") -> dict[str, object]:
    """``KEY=VALUE`` options, values read as YAML scalars (numbers, true/false, text)."""
    import math

    from mergesmith import _yaml
    from mergesmith.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        shown = _yaml.excerpt(item, 80)
        if not sep or not key.strip():
            raise ConfigError(f"{option} {shown}: write it as KEY=VALUE, e.g. {option} density=0.5")
        if len(value) > 1000:
            raise ConfigError(f"{option} {shown}: the value is {len(value):,} characters; give a short value")
        parsed = _yaml.load(value, where=f"{option} {_yaml.excerpt(key.strip())}")
        if isinstance(parsed, (dict, list)):
            raise ConfigError(f"{option} {shown}: expected one value (a number, true/false or text)")
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise ConfigError(f"{option} {shown}: expected a finite number")
        out[key.strip()] = parsed
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    # Large CPU tensors on transparent huge pages: fewer page faults when each job allocates
    # fresh full-size buffers. Read by torch when it loads, so it is set before the first import.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from mergesmith.errors import MergesmithError

    signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.command == "eval":
            from mergesmith.errors import ConfigError
            from mergesmith.evaluate import evaluate, evaluate_harness, load_task

            if not args.tasks and not args.lm_eval:
                raise ConfigError("eval: give JSONL task files with --tasks, or harness tasks with --lm-eval")
            tasks = [load_task(p) for p in args.tasks]
            scores = []
            if tasks:
                scores += evaluate(
                    args.model,
                    tasks,
                    batch_size=args.batch_size,
                    device=args.device,
                    progress=sys.stderr.isatty(),
                )
            if args.lm_eval:
                scores += evaluate_harness(
                    args.model, args.lm_eval, batch_size=args.batch_size, device=args.device, limit=args.limit
                )
            print(f"{'task':<20} {'examples':>8} {'accuracy':>8} {'loss':>8} {'ppl':>8}")
            for s in scores:
                print(f"{s.task:<20} {s.examples:>8} {s.accuracy:>8.3f} {s.loss:>8.4f} {s.perplexity:>8.3f}")
            if args.json:
                import json
                from dataclasses import asdict

                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump([asdict(s) for s in scores], f, indent=2)
            return 0
        if args.command == "compare":
            return _compare(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "diagnose":
            import time

            from mergesmith.diagnose import diagnose, write_diagnosis

            config = _diagnose_config(args)
            _settle()
            start = time.perf_counter()
            found = diagnose(
                config,
                density=args.density,
                sample=args.sample,
                progress=sys.stderr.isatty() and not args.no_progress,
            )
            print(found.summary())
            print(f"diagnosed {found.tensors} tensors per model in {time.perf_counter() - start:.2f} s")
            if args.out:
                print("written: " + ", ".join(str(p) for p in write_diagnosis(found, args.out)))
            return 0
        if args.command == "lora":
            from mergesmith.extract import extract_lora

            if args.lora_command == "merge":
                from mergesmith.lora_merge import merge_adapters

                merged = merge_adapters(
                    args.adapters,
                    args.out_dir,
                    weights=args.weights,
                    rank=args.rank,
                    method=args.method,
                    densities=args.densities,
                    lambda_=args.lambda_,
                    params=_key_values(args.param),
                    seed=args.seed,
                    force=args.force,
                )
                worst_merge = max(merged, key=lambda r: r.relative_error, default=None)
                print(
                    f"merged {len(args.adapters)} adapters ({len(merged)} modules) into {args.out_dir}"
                    + (
                        f"; worst relative error {worst_merge.relative_error:.3g} ({worst_merge.module})"
                        if worst_merge
                        else ""
                    )
                )
                return 0
            if args.lora_command != "extract":
                _parser().parse_args(["lora", "--help"])
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
                + (f"; worst relative error {worst.relative_error:.3g} ({worst.module})" if worst else "")
            )
            return 0
        if args.command == "methods":
            from mergesmith.docs import methods_text

            print(methods_text())
            return 0
        if args.command == "validate":
            from mergesmith.api import validate

            plan = validate(args.config)
            lines = plan.describe().splitlines()
            print("\n".join(lines[: len(plan.models) + 3]) if args.quiet else "\n".join(lines))
            print(f"ok: {args.config} is valid", file=sys.stderr)
            return 0
        if args.command == "merge":
            return _merge(args)
    except MergesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `mergesmith methods | head`): stop quietly

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


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


def _settle() -> None:
    """Exempt everything the imports created from garbage collection: a full collection otherwise
    walks those objects again each time it runs, pausing the work for tens of milliseconds."""
    import gc

    gc.collect()
    gc.freeze()


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM ends a merge like Ctrl-C: the partial output is removed on the way out."""
    raise KeyboardInterrupt


def _merge(args: argparse.Namespace) -> int:
    import time

    from mergesmith.api import merge, validate
    from mergesmith.plan import parse_size

    if args.dry_run:
        print(validate(args.config, max_shard_size=parse_size(args.max_shard_size)).describe())
        return 0
    _settle()
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
    )
    took = time.perf_counter() - start
    print(
        f"merged {len(plan.jobs)} tensors with {plan.method.name} into {args.out_dir} "
        f"({plan.write_bytes / 1e6:.1f} MB, {len(plan.shards)} shard(s)) in {took:.1f} s"
    )
    if args.eval:
        from mergesmith.config import load_config
        from mergesmith.evaluate import load_task
        from mergesmith.report import compare, labels, write_report

        config = load_config(args.config)
        tasks = [load_task(t) for t in args.eval]
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
        )
        _print_report(report, write_report(report, args.out_dir))
    return 0


def _print_diagnosis(plan: Plan) -> None:
    from mergesmith.diagnose import quick_summary

    summary = quick_summary(plan)
    if summary is not None:
        print(
            "before merging (`mergesmith diagnose` reads every tensor; --no-diagnose skips this):\n"
            + summary,
            file=sys.stderr,
        )


def _paths(models: Sequence[str]) -> list[str]:
    return [m.partition("=")[2] if "=" in m else m for m in models]


def _print_report(report: object, written: Sequence[object]) -> None:
    from mergesmith.report import Report

    assert isinstance(report, Report)
    print(report.to_markdown(), end="")
    print("report written to " + ", ".join(str(p) for p in written))


def _tune(args: argparse.Namespace) -> int:
    from mergesmith import _yaml
    from mergesmith.errors import ConfigError
    from mergesmith.tune import tune

    weights: dict[str, float] = {}
    for task, weight in _key_values(args.task_weight, "--task-weight").items():
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
    )
    start = f"{result.default_objective:.4f}" if result.default_objective is not None else "n/a"
    stopped = f" ({result.stopped_early} stopped early)" if result.stopped_early else ""
    print(
        f"best objective {result.best_objective:.4f} (starting values: {start}) after {result.trials} trials"
        f"{stopped}, {result.seconds_per_trial:.2f} s per trial: "
        + ", ".join(f"{k}={v:.4g}" for k, v in result.best_values.items())
    )
    print("written: " + ", ".join(str(p) for p in result.files))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mergesmith.evaluate import load_task
    from mergesmith.report import compare, labels, write_report

    tasks = [load_task(t) for t in args.tasks]
    parents = dict(zip(labels(args.parents), _paths(args.parents)))
    merged = {label: (path, list(parents)) for label, path in zip(labels(args.merged), _paths(args.merged))}
    owners = dict(zip(labels(args.owner), _paths(args.owner)))
    report = compare(
        tasks,
        parents,
        merged,
        base=args.base,
        owners=owners,
        batch_size=args.batch_size,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    _print_report(report, write_report(report, args.out, stem="compare_report"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
