"""The study: Optuna asks for values, an executor scores them, and the best config is written,
merged and evaluated against its parents."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith import defaults
from mergesmith._output import atomic_write
from mergesmith._text import printable
from mergesmith.errors import ConfigError
from mergesmith.tune.executors import Executor, InProcess, LocalPool, RayActors, RunnerArgs
from mergesmith.tune.objective import Objective
from mergesmith.tune.plot import plot
from mergesmith.tune.runner import TrialScores
from mergesmith.tune.space import (
    SAMPLERS,
    Dimension,
    _shown,
    check_options,
    midpoint,
    search_space,
    substitute,
    substitute_lined,
    trial_config,
)

if TYPE_CHECKING:
    from mergesmith.plan import Plan

__all__ = ["EXECUTORS", "TuneResult", "check_range_ends", "tune"]

EXECUTORS = ("local", "ray")


@dataclass
class TuneResult:
    best_values: dict[str, float]
    best_objective: float
    default_objective: float | None
    trials: int
    seconds_per_trial: float
    out_dir: Path
    files: list[Path]
    stopped_early: int = 0  # trials whose scoring stopped once they could not beat the best


def _sampler(name: str, space: Sequence[Dimension], seed: int, grid_steps: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "grid":  # the grid's points are enqueued (see _grid); this only backs them up
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")


def _grid(space: Sequence[Dimension], steps: int, seed: int) -> list[dict[str, float]]:
    """Every point of the grid, in an order shuffled by ``seed``. Enqueued in the study rather than
    drawn by Optuna's GridSampler, whose end-of-grid stop only works inside ``optimize``."""
    import itertools
    import random

    points = [
        dict(zip([d.name for d in space], p)) for p in itertools.product(*(d.grid(steps) for d in space))
    ]
    random.Random(seed).shuffle(points)
    return points


def _recover(study: Any) -> int:
    """Trials left RUNNING by a process that died are failed and their values asked again."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params)
    return len(stale)


def _reference_scores(
    doc: Mapping[str, Any],
    tasks: Sequence[str],
    batch_size: int,
    device: str,
    add_special_tokens: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Scores of the base and each parent on every task (``TaskScore`` fields), evaluated once per
    study: the objective normalizes by them and the best merge's report reuses them."""
    from mergesmith.evaluate import evaluate, load_task

    space = search_space(doc)
    cfg = trial_config(doc, space, midpoint(space))
    loaded = [load_task(t) for t in tasks]
    base = str(cfg.base_model) if cfg.base_model else None
    parents = [str(r) for r in cfg.referenced_models() if str(r) != base]

    models = [*([base] if base else []), *parents]

    def scores(model: str) -> dict[str, dict[str, Any]]:
        if say is not None:
            say(f"model {models.index(model) + 1}/{len(models)}: {model}")
        got = evaluate(
            model,
            loaded,
            batch_size=batch_size,
            device=device,
            add_special_tokens=add_special_tokens,
            say=say,
        )
        return {s.task: asdict(s) for s in got}

    return {"base": scores(base) if base else None, "parents": {p: scores(p) for p in parents}}


def tune(
    config: str | Path,
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    trials: int = defaults.TRIALS,
    sampler: str = defaults.SAMPLER,
    seed: int = defaults.SEED,
    grid_steps: int = defaults.GRID_STEPS,
    workers: int = defaults.WORKERS,
    executor: str = defaults.EXECUTOR,
    study_name: str | None = None,
    penalty: float = defaults.PENALTY,
    task_weights: Mapping[str, float] | None = None,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.TUNE_BATCH_SIZE,
    write_best: bool = True,
    stop_early: bool = False,
    progress: Callable[[str], None] | None = print,
    threads: int | None = None,
    add_special_tokens: bool = True,
    tune_memory: bool = False,
) -> TuneResult:
    """Run (or resume) a study of ``trials`` trials in ``out_dir/study.db``; see the module doc.

    ``tune_memory=True`` tunes the C allocator of the processes that merge the trials
    (``mergesmith._memory.tune``), as ``mergesmith tune`` does; off by default."""
    import optuna

    from mergesmith import _yaml
    from mergesmith.config import load_config
    from mergesmith.plan import build_plan

    say = progress or (lambda _: None)
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if workers < 1 or trials < 1:
        raise ConfigError("--workers and --trials must be at least 1")
    most = max(8, 4 * (os.cpu_count() or 1))
    if executor == "local" and workers > most:
        raise ConfigError(
            f"--workers {workers}: far more local worker processes than this machine's "
            f"{os.cpu_count() or 1} CPUs, each holding a model; use at most --workers {most} (about one a "
            "CPU is best), or --executor ray to spread them over machines"
        )
    path = Path(config)
    lined = _yaml.load_file(path, what="tune config")
    if not isinstance(lined, Mapping):
        raise ConfigError(f"{path}: a tune config is a mapping like a merge config")
    try:
        doc = json.loads(json.dumps(lined))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{printable(str(path))}: holds a value that is not plain data ({_shown(str(exc))}); use only "
            "mappings, lists, text, numbers and booleans (quote dates)"
        ) from None
    space = search_space(lined, source=printable(str(path)))
    check_options(
        space,
        tasks,
        sampler=sampler,
        seed=seed,
        grid_steps=grid_steps,
        penalty=penalty,
        task_weights=task_weights or {},
        batch_size=batch_size,
    )
    # every check, no weights; the errors name the tune config's lines
    plan = build_plan(load_config(substitute_lined(lined, space, midpoint(space)), name=str(path)))
    check_range_ends(plan, lined, space, str(path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name or path.stem,
        storage=f"sqlite:///{out / 'study.db'}",
        load_if_exists=True,
        direction="maximize",
        sampler=_sampler(sampler, space, seed, grid_steps),
    )
    if not study.trials:  # the first trial is the middle of every range, the values one would start from
        study.enqueue_trial(midpoint(space))
        if sampler == "grid":
            for point in _grid(space, grid_steps, seed):
                if point != midpoint(space):
                    study.enqueue_trial(point)
    if sampler == "grid":  # the starting values and the grid, each once
        trials = min(trials, len(study.trials))
    if "reference" not in study.user_attrs:
        say("evaluating the base and the parents once")
        reference = _reference_scores(doc, tasks, batch_size, device, add_special_tokens, progress)
        study.set_user_attr("reference", reference)
        study.set_user_attr("space", [d.name for d in space])
    ref = study.user_attrs["reference"]
    names = [Path(t).stem for t in tasks]
    objective = Objective(
        {t: max(p[t]["accuracy"] for p in ref["parents"].values()) for t in names},
        {t: s["accuracy"] for t, s in ref["base"].items()} if ref["base"] else None,
        dict(task_weights or {}),
        penalty,
    )
    recovered = _recover(study)
    if recovered:
        say(f"resuming: {recovered} trial(s) interrupted earlier are asked again")
    done = len(_finished(study))
    remaining = max(0, trials - done)
    say(
        f"study {study.study_name}: {done} trial(s) done, {remaining} to run with {workers} worker(s) ({executor})"
    )
    distributions: dict[str, optuna.distributions.BaseDistribution] = {
        d.name: optuna.distributions.FloatDistribution(d.low, d.high, log=d.log) for d in space
    }
    runner: Executor
    args = RunnerArgs(
        doc, list(tasks), device, objective, batch_size, threads, add_special_tokens, tune_memory
    )
    if executor == "ray":
        runner = RayActors(args, workers)
    elif workers > 1:
        runner = LocalPool(args, workers)
    else:
        runner = InProcess(args, plan)
    best_value = float(study.best_value) if _complete(study) else None
    start = time.perf_counter()
    ran = 0
    try:
        in_flight: dict[Future[TrialScores], Any] = {}
        asked = 0
        while asked < remaining or in_flight:
            while asked < remaining and len(in_flight) < workers:
                trial = study.ask(distributions)
                beat = best_value if stop_early else None
                in_flight[runner.submit(trial.params, beat)] = (trial, beat)
                asked += 1
            finished = _first_done(in_flight)
            trial, beat = in_flight.pop(finished)
            result = finished.result()
            value = objective(result.accuracy)
            trial.set_user_attr("examples_scored", result.scored)
            values = " ".join(f"{k}={v:.3g}" for k, v in trial.params.items())
            ran += 1
            if result.stopped:
                trial.report(value, 0)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                say(
                    f"trial {ran}/{remaining} (#{trial.number}): stopped after {result.scored} examples, "
                    f"at most {value:.4f} (best {beat:.4f}) {values}"
                )
                continue
            for task, acc in result.accuracy.items():
                trial.set_user_attr(f"accuracy.{task}", acc)
            study.tell(trial, value)
            best_value = value if best_value is None else max(best_value, value)
            say(f"trial {ran}/{remaining} (#{trial.number}): objective {value:.4f} {values}")
    finally:
        runner.close()
    seconds = (time.perf_counter() - start) / max(1, ran)
    best = study.best_trial
    start_values = midpoint(space)
    default = next((float(t.value) for t in _complete(study) if t.params == start_values), None)
    files = [_write_yaml(out / "best.yml", substitute(doc, space, best.params), path)]
    if plot(study, out / "search.png"):
        files.append(out / "search.png")
    count = len(_finished(study))
    stopped = count - len(_complete(study))
    best_value = float(best.value) if best.value is not None else math.nan
    summary = {
        "best": {"values": best.params, "objective": best_value, "trial": best.number},
        "default": {"objective": default},
        "trials": count,
        "stopped_early": stopped,
        "seconds_per_trial": seconds,
        "objective": "mean normalized accuracy - penalty x accuracy lost below the base",
        "penalty": penalty,
    }
    atomic_write(out / "tune_summary.json", json.dumps(summary, indent=2) + "\n")
    files.append(out / "tune_summary.json")
    if write_best:
        say(f"merging and evaluating the best values into {out / 'best'}")
        files += _write_best(out, files[0], tasks, ref, batch_size, device, add_special_tokens)
    return TuneResult(dict(best.params), best_value, default, count, seconds, out, files, stopped)


def check_range_ends(plan: Plan, lined: Any, space: Sequence[Dimension], name: str) -> None:
    """Each searched value must be a valid parameter value at both ends of its range (the others
    at their starting values): a range the method refuses part of is a config error before any
    trial, naming the tune config's lines, not a failed trial later."""
    start = midpoint(space)
    problems: list[str] = []
    for dim in space:
        for end in dict.fromkeys((dim.low, dim.high)):
            try:
                config = trial_config(lined, space, {**start, dim.name: end}, name)
                plan.with_parameters(config)
            except ConfigError as exc:
                problems += [
                    f"{p} (the search range [{dim.low:g}, {dim.high:g}] of {dim.name} reaches {end:g}; keep it "
                    "within the values the parameter takes)"
                    for p in exc.problems
                ]
    if problems:
        raise ConfigError(problems, name)


def _complete(study: Any) -> list[Any]:
    import optuna

    return list(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))


def _finished(study: Any) -> list[Any]:
    """Trials scored to the end, and those stopped early (PRUNED) because they could not win."""
    import optuna

    states = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    return list(study.get_trials(deepcopy=False, states=states))


def _first_done(futures: Mapping[Future[TrialScores], Any]) -> Future[TrialScores]:
    from concurrent.futures import FIRST_COMPLETED, wait

    # the oldest finished first, so that the order of results is the order of asking when it can be
    for fut in futures:
        if fut.done():
            return fut
    wait(list(futures), return_when=FIRST_COMPLETED)
    return next(f for f in futures if f.done())


def _write_yaml(target: Path, doc: Mapping[str, Any], source: Path) -> Path:
    import yaml

    text = f"# best values found by mergesmith tune {source.name}\n" + yaml.safe_dump(
        dict(doc), sort_keys=False
    )
    atomic_write(target, text)
    return target


def _write_best(
    out: Path,
    best_yml: Path,
    tasks: Sequence[str],
    reference: Mapping[str, Any],
    batch_size: int,
    device: str,
    add_special_tokens: bool = True,
) -> list[Path]:
    """Merge the best config to ``out/best`` and write its merge report there; the base's and the
    parents' scores come from ``reference``, so only the merged model is evaluated."""
    import mergesmith
    from mergesmith.evaluate import TaskScore, evaluate, load_task
    from mergesmith.report import Entry, build_report, labels, write_report

    model = out / "best"
    mergesmith.merge(best_yml, model, force=True, progress=False)

    def entry(name: str, path: str, scores: Mapping[str, Mapping[str, Any]]) -> Entry:
        return Entry(name, path, {t: TaskScore(**s) for t, s in scores.items()})

    refs = list(reference["parents"])
    parents = [entry(n, r, reference["parents"][r]) for n, r in zip(labels(refs), refs)]
    base = reference["base"]
    got = evaluate(
        model,
        [load_task(t) for t in tasks],
        batch_size=batch_size,
        device=device,
        add_special_tokens=add_special_tokens,
    )
    method = mergesmith.load_config(best_yml).method
    best = Entry("best", str(model), {s.task: s for s in got}, tuple(p.name for p in parents), method)
    report = build_report(
        [Path(t).stem for t in tasks], parents, [best], base=entry("base", "base", base) if base else None
    )
    return [model, *write_report(report, model)]
