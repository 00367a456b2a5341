"""The ``mergesmith`` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mergesmith._mergekit_flags import add_mergekit_flags, apply_mergekit_flags
from mergesmith._version import __version__

if TYPE_CHECKING:
    from mergesmith.plan import Plan


def _at_least_1(text: str) -> int:
    """A whole number of at least 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _eval_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """--batch-size, --threads and --add-special-tokens, as every evaluating command has them."""
    p.add_argument(
        "--batch-size",
        type=_at_least_1,
        default=batch_size,
        help=f"examples per forward pass (default {batch_size})",
    )
    p.add_argument(
        "--add-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tokenize prompts with the special tokens the tokenizer adds, such as BOS (default: yes)",
    )


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_at_least_1,
        help="torch threads (default: the cores the 1-minute load average leaves idle, at least 1)",
    )


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
    m.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory written earlier by mergesmith",
    )
    m.add_argument("--max-shard-size", help="largest output shard (default 5GB)")
    m.add_argument("--device", help="device for the arithmetic: cpu or cuda (default cpu)")
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
    m.add_argument(
        "--resume",
        action="store_true",
        help="take over what a killed merge into OUT_DIR left and keep its finished shards (same plan only)",
    )
    m.add_argument(
        "--workers",
        type=_at_least_1,
        default=1,
        help="merge the shards in N processes, each with --threads/N torch threads (default 1)",
    )
    m.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local processes (default) or Ray tasks, one per shard (pip install 'mergesmith[ray]')",
    )
    m.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="--executor ray: the cluster to join (default: $RAY_ADDRESS, else start a local one)",
    )
    _eval_options(m, 32)
    _threads_option(m)
    add_mergekit_flags(m)

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
    ev.add_argument("--limit", type=_at_least_1, help="--lm-eval: at most this many examples per task")
    _eval_options(ev, 32)
    _threads_option(ev)
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
    _eval_options(c, 32)
    _threads_option(c)
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
    _eval_options(t, 64)
    _threads_option(t)
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
    mu.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    mu.add_argument("--device", default="cpu", help="device for the arithmetic: cpu or cuda (default cpu)")
    mu.add_argument("--no-progress", action="store_true", help="no progress bar")
    _threads_option(mu)

    mo = sub.add_parser(
        "moe", help="build a mixture of experts from fine-tunes of one base (mergekit-moe config)"
    )
    mo.add_argument("config", help="YAML mergekit-moe config: base_model, experts, gate_mode, ...")
    mo.add_argument("out_dir", help="output directory (appears only when the model is complete)")
    mo.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory written earlier by mergesmith",
    )
    mo.add_argument("--device", default="cpu", help="device for the gate prompts: cpu or cuda (default cpu)")
    mo.add_argument(
        "--seed", type=int, default=0, help="seed of the random gates and the experts' noise (default 0)"
    )
    mo.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    mo.add_argument("--dry-run", action="store_true", help="check the config and its models, write nothing")
    mo.add_argument(
        "--report",
        nargs="+",
        metavar="TASK",
        help="after building, route these JSONL tasks through the model and write "
        "routing_report.{md,json} beside it: per layer, the share of tokens sent to each expert",
    )
    mo.add_argument("--batch-size", type=_at_least_1, default=32, help="--report: examples per forward pass")
    _threads_option(mo)

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
    ex.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory written earlier by mergesmith",
    )
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
    lm.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory written earlier by mergesmith",
    )
    lm.add_argument(
        "--on-nonfinite",
        choices=["error", "warn"],
        default="error",
        help="a factor with NaN/Inf or overflowing float32: stop (error, default) or write it and warn",
    )
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
    with _config_warnings():
        return _main(args)


@contextlib.contextmanager
def _config_warnings() -> Iterator[None]:
    """A config setting that has no effect is shown on stderr as ``warning: ...``, once a run
    however often the config is read (tune reads it for every trial)."""
    import warnings

    from mergesmith._text import printable
    from mergesmith.config import ConfigWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        shown = warnings.showwarning
        seen: set[str] = set()

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, ConfigWarning):
                if str(message) not in seen:
                    seen.add(str(message))
                    print(f"warning: {printable(str(message))}", file=sys.stderr)
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = show
        yield


def _main(args: argparse.Namespace) -> int:
    if args.command is None:
        _parser().print_help()
        return 2
    # Large CPU tensors on transparent huge pages: fewer page faults when each job allocates
    # fresh full-size buffers. Read by torch when it loads, so it is set before the first import.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from mergesmith._text import printable
    from mergesmith.errors import MergesmithError

    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGHUP, _terminated)
    previous = _previous_output(args)
    try:
        if args.command == "merge":
            apply_mergekit_flags(args)
        if hasattr(args, "threads"):
            import torch

            from mergesmith._threads import positive_threads

            torch.set_num_threads(positive_threads(args.threads))
        if args.command == "eval":
            from mergesmith.errors import ConfigError
            from mergesmith.evaluate import evaluate, evaluate_harness, load_task

            if not args.tasks and not args.lm_eval:
                raise ConfigError("eval: give JSONL task files with --tasks, or harness tasks with --lm-eval")
            tasks = [load_task(p) for p in args.tasks]
            scores = []
            if tasks:
                _say(f"model 1/1: {args.model}")
                scores += evaluate(
                    args.model,
                    tasks,
                    batch_size=args.batch_size,
                    device=args.device,
                    progress=sys.stderr.isatty(),
                    add_special_tokens=args.add_special_tokens,
                    say=_say,
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
        if args.command == "compare":
            return _compare(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "diagnose":
            import time
            from pathlib import Path

            from mergesmith._output import check_inside
            from mergesmith.api import validate
            from mergesmith.diagnose import diagnose, write_diagnosis

            plan = validate(_diagnose_config(args))  # type: ignore[arg-type]
            inputs = [d for m in plan.models for d in m.dirs]
            if args.out:
                check_inside(Path(args.out), inputs)
            _settle()
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
                    on_nonfinite=args.on_nonfinite,
                )
                worst_merge = max(merged, key=lambda r: r.relative_error, default=None)
                print(
                    f"merged {len(args.adapters)} adapters ({len(merged)} modules) into {args.out_dir}"
                    + (
                        f"; worst relative error {worst_merge.relative_error:.3g} ({printable(worst_merge.module)})"
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
                + (
                    f"; worst relative error {worst.relative_error:.3g} ({printable(worst.module)})"
                    if worst
                    else ""
                )
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
            print(printable("\n".join(lines[: len(plan.models) + 3]) if args.quiet else "\n".join(lines)))
            print(f"ok: {args.config} is valid", file=sys.stderr)
            return 0
        if args.command == "merge":
            return _merge(args)
        if args.command == "multi":
            from mergesmith.multi import run_cli

            return run_cli(args, _say)
        if args.command == "moe":
            from mergesmith.moe.cli import run_cli as run_moe

            return run_moe(args, _say)
    except MergesmithError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted: {_interrupted(args, previous)}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
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


def _say(line: str) -> None:
    """A progress line on stderr, text from files made printable."""
    from mergesmith._text import printable

    print(printable(line), file=sys.stderr, flush=True)


class _Signalled(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP end a command like Ctrl-C: the partial output is removed on the way out
    and the exit status is 128 + the signal's number. Further ones are ignored while that happens."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise _Signalled(signum)


def _previous_output(args: argparse.Namespace) -> bool:
    """Whether the output directory of a merge or LoRA command holds something already."""
    out = getattr(args, "out_dir", None)
    if out is None or not os.path.isdir(out):
        return False
    try:
        with os.scandir(out) as entries:
            return any(entries)
    except OSError:
        return False


def _interrupted(args: argparse.Namespace, previous: bool) -> str:
    """What an interrupted command leaves behind, said accurately."""
    from mergesmith import _output

    out = getattr(args, "out_dir", None)
    if out is not None:
        done = any(os.path.realpath(p) == os.path.realpath(out) for p in _output.completed)
        if not done:
            kept = f"; the previous contents of {out} were left untouched" if previous else ""
            return "no output was written" + kept
        if args.command == "merge" and args.eval:
            return f"the merged model in {out} is complete; the evaluation report was not written, or only in part"
        return f"the output in {out} is complete"
    if args.command == "eval":
        return f"no scores were written to {args.json}" if args.json else "nothing was written"
    if args.command == "diagnose":
        if not args.out:
            return "nothing was written"
        return (
            f"{args.out} may hold only some of diagnosis.json, diagnosis.html and the plots; each file "
            "there is whole: run diagnose again for the rest"
        )
    if args.command == "tune":
        return (
            f"{args.out} is partial: study.db keeps the finished trials (run the same command again to "
            "go on); best.yml, the summary, the plots and best/ may be missing or from an earlier run"
        )
    if args.command == "compare":
        return f"the report files in {args.out} may be missing or from an earlier run"
    if args.command == "multi":
        from mergesmith.multi import interrupted

        return interrupted()
    return "nothing was written"


def _merge(args: argparse.Namespace) -> int:
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
        threads=args.threads,
        copy_tokenizer=args.copy_tokenizer is not False,
        write_model_card=args.write_model_card is not False,
        resume=args.resume,
        workers=args.workers,
        executor=args.executor,
        ray_address=args.ray_address,
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
            say=_say,
            methods={"merged": config.method},
        )
        _print_report(report, write_report(report, args.out_dir))
    return 0


def _print_diagnosis(plan: Plan) -> None:
    from mergesmith._text import printable
    from mergesmith.diagnose import quick_summary

    summary = quick_summary(plan)
    if summary is not None:
        print(
            "before merging (`mergesmith diagnose` reads every tensor; --no-diagnose skips this):\n"
            + printable(summary),
            file=sys.stderr,
        )


def _report_outside_inputs(out: str, models: Sequence[str | None]) -> None:
    """Reports are never written into an input model's directory (a ``base+adapter`` names two)."""
    from pathlib import Path

    from mergesmith.errors import OutputError

    target = Path(out).resolve()
    for spec in _paths([m for m in models if m]):
        for part in dict.fromkeys([spec, *spec.split("+")]):
            src = Path(part)
            if part and src.is_dir() and (target == src.resolve() or src.resolve() in target.parents):
                raise OutputError(
                    f"--out {out} is inside input model {part}; the report would be written into the "
                    "model's directory: choose a directory outside every input model"
                )


def _paths(models: Sequence[str]) -> list[str]:
    return [m.partition("=")[2] if "=" in m else m for m in models]


def _print_report(report: object, written: Sequence[object]) -> None:
    from mergesmith._text import printable
    from mergesmith.report import Report

    assert isinstance(report, Report)
    print(printable(report.to_markdown()), end="")
    print("report written to " + ", ".join(str(p) for p in written))


def _tune(args: argparse.Namespace) -> int:
    from mergesmith import _yaml
    from mergesmith._text import printable
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
        progress=_say,
        threads=args.threads,
        add_special_tokens=args.add_special_tokens,
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


def _compare(args: argparse.Namespace) -> int:
    from mergesmith.evaluate import load_task
    from mergesmith.report import compare, labels, write_report

    _report_outside_inputs(args.out, [*args.parents, *args.merged, *([args.base] if args.base else [])])
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
        add_special_tokens=args.add_special_tokens,
        say=_say,
    )
    _print_report(report, write_report(report, args.out, stem="compare_report"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
