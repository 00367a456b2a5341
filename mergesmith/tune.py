"""Search merge coefficients against the evaluation.

A tune config is a merge config in which some parameter values are search ranges::

    weight: {search: [0.1, 1.5]}            # a float in [0.1, 1.5]
    density: {search: [0.01, 1.0], log: true}
    weight: [{search: [0, 1]}, {search: [0, 1]}]   # a searchable gradient

Each trial substitutes values, merges in memory from parent tensors read once, loads the result
into a model held in memory and scores it on the tasks; nothing is written per trial. Trials are
proposed by an Optuna sampler (TPE, CMA-ES, or a grid) and recorded in an SQLite study, so a
study that is stopped resumes where it was. Trials run in this process, in ``workers`` local
processes, or on Ray actors; each worker holds the parents once. The best config is written as
YAML, merged to disk and evaluated against its parents (the merge report), and the search is
plotted.

The objective is the weighted mean normalized accuracy (accuracy over the best parent's on the
task) minus ``penalty`` times the total accuracy lost below the base model on any task.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesmith._output import atomic_write
from mergesmith._text import printable
from mergesmith.errors import ConfigError
from mergesmith.evaluate import Encoded, quiet_transformers

__all__ = ["Dimension", "Objective", "TrialRunner", "TuneResult", "search_space", "substitute", "tune"]

SAMPLERS = ("tpe", "cmaes", "grid")
EXECUTORS = ("local", "ray")
KEEP_UNKNOWN = 4 << 30  # bytes trials may keep between them where the free memory is unknown


@dataclass(frozen=True)
class Dimension:
    """One searched value: where it sits in the config document and its range."""

    name: str
    path: tuple[str | int, ...]
    low: float
    high: float
    log: bool = False
    default: float | None = None  # the value the first trial uses (default: the middle of the range)

    def grid(self, steps: int) -> list[float]:
        if steps < 2:
            return [(self.low + self.high) / 2]
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            inner = [math.exp(a + (b - a) * i / (steps - 1)) for i in range(1, steps - 1)]
        else:
            inner = [self.low + (self.high - self.low) * i / (steps - 1) for i in range(1, steps - 1)]
        return [self.low, *inner, self.high]  # the ends exactly, not rounded past the range


def _label(doc: Mapping[str, Any], path: tuple[str | int, ...]) -> str:
    """A readable name: ``add.weight`` for models[i].parameters.weight of model ``.../add``."""
    parts: list[str] = []
    i = 0
    while i < len(path):
        key = path[i]
        if key == "models" and i + 1 < len(path) and isinstance(path[i + 1], int):
            entry = doc["models"][path[i + 1]]
            model = entry.get("model") if isinstance(entry, Mapping) else entry
            parts.append(Path(str(model).split("+")[-1]).name or str(model))
            i += 2
            if i < len(path) and path[i] == "parameters":
                i += 1
            continue
        if key == "parameters" and i == 0:
            i += 1
            continue
        parts.append(f"[{key}]" if isinstance(key, int) else str(key))
        i += 1
    return ".".join(parts).replace(".[", "[")


def search_space(doc: Mapping[str, Any]) -> list[Dimension]:
    """Every ``{search: [low, high]}`` node of a config document, or a ConfigError naming each bad one."""
    found: list[Dimension] = []
    problems: list[str] = []

    def walk(node: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(node, Mapping):
            if "search" in node:
                where = ".".join(str(p) for p in path)
                extra = sorted(set(node) - {"search", "log", "default"})
                rng = node["search"]
                if extra:
                    problems.append(
                        f"{where}: unknown key(s) {extra} beside search (allowed: search, log, default)"
                    )
                elif (
                    not isinstance(rng, Sequence)
                    or isinstance(rng, str)
                    or len(rng) != 2
                    or not all(_finite(v) for v in rng)
                    or not rng[0] < rng[1]
                    or not math.isfinite(float(rng[1]) - float(rng[0]))
                ):
                    problems.append(
                        f"{where}: search must be [low, high] with low < high, both finite numbers, found "
                        f"{_shown(rng)}"
                    )
                elif not isinstance(node.get("log", False), bool):
                    problems.append(f"{where}: log must be true or false, found {_shown(node['log'])}")
                elif node.get("log", False) and rng[0] <= 0:
                    problems.append(f"{where}: a log search needs low > 0, found {rng[0]}")
                elif "default" in node and not (
                    _finite(node["default"]) and rng[0] <= node["default"] <= rng[1]
                ):
                    problems.append(
                        f"{where}: default must be a number in [{rng[0]}, {rng[1]}], found "
                        f"{_shown(node['default'])}"
                    )
                else:
                    low, high = float(rng[0]), float(rng[1])
                    start = float(node["default"]) if "default" in node else None
                    found.append(Dimension(_label(doc, path), path, low, high, bool(node.get("log")), start))
                return
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(doc, ())
    if problems:
        raise ConfigError(problems, "tune config")
    if not found:
        raise ConfigError("the config searches nothing: mark a value as {search: [low, high]}", "tune config")
    names = [d.name for d in found]
    if len(set(names)) != len(names):  # two models with the same last path part: fall back to paths
        found = [Dimension(".".join(str(p) for p in d.path), d.path, d.low, d.high, d.log) for d in found]
    return found


def _finite(value: Any) -> bool:
    """A number that is not a boolean, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past the float range
        return False


def _shown(value: Any) -> str:
    from mergesmith._text import printable

    if isinstance(value, list):
        items = [repr(v) if not isinstance(v, (dict, list)) else "..." for v in value[:4]]
        text = "[" + ", ".join(items + (["..."] if len(value) > 4 else [])) + "]"
    elif isinstance(value, dict):
        text = "{...}"
    else:
        text = repr(value)
    return printable(text if len(text) <= 60 else text[:60] + "...")


MAX_GRID = 100_000  # points a grid search may enqueue


def check_options(
    space: Sequence[Dimension],
    tasks: Sequence[str],
    *,
    sampler: str,
    seed: int,
    grid_steps: int,
    penalty: float,
    task_weights: Mapping[str, float],
    batch_size: int = 64,
) -> None:
    """Refuse search options that are out of range, with every problem named at once."""
    problems: list[str] = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"--batch-size must be a whole number >= 1, found {_shown(batch_size)}")
    if sampler not in SAMPLERS:
        problems.append(f"unknown sampler {_shown(sampler)}; use one of {', '.join(SAMPLERS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        problems.append(f"--seed must be a whole number in [0, 2**32), found {_shown(seed)}")
    if not _finite(penalty):
        problems.append(f"--penalty must be a finite number, found {_shown(penalty)}")
    if sampler == "grid":
        if isinstance(grid_steps, bool) or not isinstance(grid_steps, int) or grid_steps < 1:
            problems.append(f"--grid-steps must be a whole number >= 1, found {_shown(grid_steps)}")
        elif grid_steps ** len(space) > MAX_GRID:
            problems.append(
                f"--grid-steps {grid_steps} over {len(space)} searched values makes "
                f"{grid_steps}**{len(space)} grid points, more than {MAX_GRID:,}; use fewer steps or the "
                "tpe sampler"
            )
    names = [Path(t).stem for t in tasks]
    for task, weight in task_weights.items():
        if task not in names:
            problems.append(
                f"--task-weight {_shown(task)}: no such task; the tasks are {', '.join(map(_shown, names))}"
            )
        elif not _finite(weight):
            problems.append(f"--task-weight {_shown(task)} must be a finite number, found {_shown(weight)}")
    if problems:
        raise ConfigError(problems)


def substitute(
    doc: Mapping[str, Any], space: Sequence[Dimension], values: Mapping[str, float]
) -> dict[str, Any]:
    """A plain config document with each searched node replaced by its value."""
    out: Any = json.loads(json.dumps(doc))
    for dim in space:
        node = out
        for key in dim.path[:-1]:
            node = node[key]
        node[dim.path[-1]] = float(values[dim.name])
    return dict(out)


def midpoint(space: Sequence[Dimension]) -> dict[str, float]:
    """The starting values: each dimension's ``default``, else the middle of its range."""
    return {d.name: d.default if d.default is not None else d.grid(3)[1] for d in space}


@dataclass(frozen=True)
class Objective:
    """Weighted mean normalized accuracy, less ``penalty`` x the accuracy lost below the base."""

    owner_accuracy: Mapping[str, float]  # task -> the best parent's accuracy
    base_accuracy: Mapping[str, float] | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    penalty: float = 1.0

    @property
    def rises_with_accuracy(self) -> bool:
        """No task's accuracy lowers the objective by rising (weights and penalty not negative),
        which is what lets :meth:`bound` stop a trial early."""
        return self.penalty >= 0 and all(w >= 0 for w in self.weights.values())

    def bound(self, right: Mapping[str, int], seen: Mapping[str, int], total: Mapping[str, int]) -> float:
        """The objective if every example not scored yet were answered right: with
        :attr:`rises_with_accuracy`, no merge that got ``right`` of the ``seen`` examples scores more."""
        return self(optimistic(right, seen, total))

    def __call__(self, accuracy: Mapping[str, float]) -> float:
        tasks = [t for t in self.owner_accuracy if self.owner_accuracy[t] > 0]
        total = sum(self.weights.get(t, 1.0) for t in tasks)
        value = sum(self.weights.get(t, 1.0) * accuracy[t] / self.owner_accuracy[t] for t in tasks) / total
        if self.base_accuracy:
            value -= self.penalty * sum(
                max(0.0, self.base_accuracy[t] - accuracy[t]) for t in self.base_accuracy
            )
        return value


def optimistic(
    right: Mapping[str, int], seen: Mapping[str, int], total: Mapping[str, int]
) -> dict[str, float]:
    """Per task, the accuracy if every example not scored yet were answered right."""
    return {t: (right[t] + total[t] - seen[t]) / total[t] for t in total}


@dataclass(frozen=True)
class TrialScores:
    """What a trial measured. ``stopped``: scoring ended early because even with every example
    left answered right the objective would stay below the best trial's; ``accuracy`` is then
    that optimistic accuracy."""

    accuracy: dict[str, float]
    scored: int  # examples scored
    stopped: bool = False


class TrialRunner:
    """Holds the parents' tensors and one model in memory; merges and scores one set of values."""

    def __init__(
        self,
        doc: Mapping[str, Any],
        task_files: Sequence[str],
        *,
        device: str = "cpu",
        batch_size: int = 64,
        threads: int | None = None,
        objective: Objective | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        from mergesmith import _memory, _safetensors
        from mergesmith.config import load_config
        from mergesmith.evaluate import check_examples, load_task
        from mergesmith.plan import build_plan

        if threads:
            torch.set_num_threads(threads)
        _memory.tune()  # the allocator settings a merge runs with
        self.doc = dict(doc)
        self.space = search_space(doc)
        self.tasks = [load_task(t) for t in task_files]
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        self.objective = objective
        plan = build_plan(load_config(substitute(doc, self.space, midpoint(self.space))))
        # the parents' tensors: views of their safetensors files mapped copy-on-write where they
        # can be (the page cache holds them once for every worker), else read into memory
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        self.maps: dict[Path, Any] = {}
        for job in plan.jobs:
            for ref in job.all_inputs():
                key = (str(plan.refs[ref.model]), ref.name)
                if key not in self.cache:
                    source = plan.models[ref.model]
                    entry = source.entry(ref.name) if hasattr(source, "entry") else None
                    self.cache[key] = (
                        _safetensors.map_tensor(entry, self.maps)
                        if entry is not None
                        else source.get(ref.name)
                    )
        self.net, self.tokenizer = _model_from(plan)
        check_examples(self.tokenizer, self.tasks, add_special_tokens)
        self.encoded: Encoded = {}  # token ids of the prompts and answers
        # per output tensor and input model: what methods keep between trials (see MergeInputs.reuse),
        # at most a float32 copy of each input; kept only when that fits in half the free memory
        self.reuse: dict[str, list[dict[str, Any]]] = {}
        most = sum(
            4 * self.cache[(str(plan.refs[r.model]), r.name)].numel() for job in plan.jobs for r in job.inputs
        )
        free = _memory.available()
        self.keeps = most <= (free // 2 if free is not None else KEEP_UNKNOWN)

    def merged_state(self, values: Mapping[str, float]) -> dict[str, torch.Tensor]:
        from mergesmith.config import load_config
        from mergesmith.execute import merge_job, whole_model_thresholds
        from mergesmith.plan import build_plan

        plan = build_plan(load_config(substitute(self.doc, self.space, values)))
        thresholds = whole_model_thresholds(plan, self.device)
        state = {}
        for job in plan.jobs:
            tensors = [self.cache[(str(plan.refs[r.model]), r.name)].clone() for r in job.all_inputs()]
            reuse = self.reuse.setdefault(job.name, [{} for _ in job.inputs]) if self.keeps else None
            state[job.name] = merge_job(plan, job, tensors, self.device, thresholds, reuse=reuse)
        return state

    def run(self, values: Mapping[str, float]) -> dict[str, float]:
        """Per-task accuracy of the merge with ``values``."""
        return self.trial(values).accuracy

    def trial(self, values: Mapping[str, float], beat: float | None = None) -> TrialScores:
        """Merge with ``values`` and score the merge on every task, a batch of each task in turn.
        With ``beat`` (the best objective so far) scoring stops as soon as the runner's objective
        could no longer exceed it even if every example left were answered right."""
        from mergesmith.evaluate import judge_batch

        state = self.merged_state(values)
        with torch.no_grad():
            _missing, unexpected = self.net.load_state_dict(state, strict=False)
        # a parameter the merge does not give (tied ones are listed once, under the name it gives)
        unset = [name for name, _ in self.net.named_parameters() if name not in state]
        del state
        if unexpected or unset:
            raise ConfigError(
                f"the merge's tensors do not match the {type(self.net).__name__} built from its config: "
                f"not in the model {unexpected[:5]}, not merged {unset[:5]}"
            )
        total = {t.name: len(t.examples) for t in self.tasks}
        right = dict.fromkeys(total, 0)
        seen = dict.fromkeys(total, 0)
        judge = self.objective if self.objective is not None and self.objective.rises_with_accuracy else None
        rounds = max(math.ceil(n / self.batch_size) for n in total.values())
        with torch.no_grad():
            for r in range(rounds):
                for task in self.tasks:
                    batch = task.examples[r * self.batch_size : (r + 1) * self.batch_size]
                    if not batch:
                        continue
                    flags, _, _ = judge_batch(
                        self.net,
                        self.tokenizer,
                        batch,
                        str(self.device),
                        encoded=self.encoded,
                        add_special_tokens=self.add_special_tokens,
                    )
                    right[task.name] += sum(flags)
                    seen[task.name] += len(batch)
                    scored = sum(seen.values())
                    if (
                        judge is not None
                        and beat is not None
                        and scored < sum(total.values())  # some left to score
                        and judge.bound(right, seen, total) < beat
                    ):
                        return TrialScores(optimistic(right, seen, total), scored, True)
        return TrialScores({t: right[t] / total[t] for t in total}, sum(seen.values()))


def _without_initial_values() -> Any:
    """A context in which models are built without drawing initial values: every parameter comes
    from the merge, so they would be thrown away."""
    import importlib
    from contextlib import nullcontext

    for where in ("transformers.initialization", "transformers.modeling_utils"):  # 5.x, 4.x
        try:
            found = getattr(importlib.import_module(where), "no_init_weights", None)
        except ImportError:
            continue
        if found is not None:
            return found()
    return nullcontext()


def _model_from(plan: Any) -> tuple[Any, Any]:
    """An in-memory model of the merge's output architecture, and the output's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(plan.out_config)
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with _without_initial_values(), quiet_transformers():
        net: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    net.tie_weights()
    net = net.eval()
    source = plan.models[plan.tokenizer_model if plan.tokenizer_model is not None else plan.reference]
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source.dirs[0])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer


# -- executors: each holds runners and evaluates values, returning per-task accuracy ---------------


@dataclass(frozen=True)
class _RunnerArgs:
    """What every executor builds its TrialRunners from (picklable, for worker processes and Ray)."""

    doc: dict[str, Any]
    task_files: list[str]
    device: str
    objective: Objective
    batch_size: int = 64
    threads: int | None = None  # threads of all runners together (default: the idle cores)
    add_special_tokens: bool = True

    def kwargs(self, workers: int = 1) -> dict[str, Any]:
        """TrialRunner's arguments, with the threads shared evenly among ``workers`` runners."""
        from mergesmith._threads import positive_threads

        threads = max(1, positive_threads(self.threads) // workers)
        return {**asdict(self), "objective": self.objective, "threads": threads}


_WORKER: TrialRunner | None = None


def _init_worker(kwargs: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = TrialRunner(**kwargs)


def _run_in_worker(values: Mapping[str, float], beat: float | None) -> TrialScores:
    assert _WORKER is not None
    return _WORKER.trial(values, beat)


class _Executor:
    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _InProcess(_Executor):
    def __init__(self, args: _RunnerArgs) -> None:
        self.runner = TrialRunner(**args.kwargs())

    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]:
        fut: Future[TrialScores] = Future()
        fut.set_result(self.runner.trial(values, beat))
        return fut


class _LocalPool(_Executor):
    def __init__(self, args: _RunnerArgs, workers: int) -> None:
        import multiprocessing

        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(args.kwargs(workers),),
        )

    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]:
        return self.pool.submit(_run_in_worker, dict(values), beat)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class _RayActors(_Executor):
    """One Ray actor per worker, each holding a TrialRunner; values go to the least busy actor."""

    def __init__(self, args: _RunnerArgs, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'mergesmith[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        actor: Any = ray.remote(num_cpus=1)(TrialRunner)
        self.actors: list[Any] = [actor.remote(**args.kwargs(workers)) for _ in range(workers)]
        self.busy = [0] * workers
        self.lock = threading.Lock()

    def submit(self, values: Mapping[str, float], beat: float | None) -> Future[TrialScores]:
        with self.lock:  # the counts are lowered from Ray's callback thread
            i = self.busy.index(min(self.busy))
            self.busy[i] += 1
        fut: Future[TrialScores] = self.actors[i].trial.remote(dict(values), beat).future()

        def done(_: Future[TrialScores]) -> None:
            with self.lock:
                self.busy[i] -= 1

        fut.add_done_callback(done)
        return fut

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


# -- the study --------------------------------------------------------------------------------------


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
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
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
    from mergesmith.config import load_config
    from mergesmith.evaluate import evaluate, load_task

    space = search_space(doc)
    cfg = load_config(substitute(doc, space, midpoint(space)))
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
    trials: int = 20,
    sampler: str = "tpe",
    seed: int = 0,
    grid_steps: int = 3,
    workers: int = 1,
    executor: str = "local",
    study_name: str | None = None,
    penalty: float = 1.0,
    task_weights: Mapping[str, float] | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    write_best: bool = True,
    stop_early: bool = False,
    progress: Callable[[str], None] | None = print,
    threads: int | None = None,
    add_special_tokens: bool = True,
) -> TuneResult:
    """Run (or resume) a study of ``trials`` trials in ``out_dir/study.db``; see the module doc."""
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
    doc = _yaml.load_file(path, what="tune config")
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{path}: a tune config is a mapping like a merge config")
    try:
        doc = json.loads(json.dumps(doc))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{printable(str(path))}: holds a value that is not plain data ({_shown(str(exc))}); use only "
            "mappings, lists, text, numbers and booleans (quote dates)"
        ) from None
    space = search_space(doc)
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
    build_plan(
        load_config(substitute(doc, space, midpoint(space)), name=str(path))
    )  # every check, no weights
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
    runner: _Executor
    args = _RunnerArgs(doc, list(tasks), device, objective, batch_size, threads, add_special_tokens)
    if executor == "ray":
        runner = _RayActors(args, workers)
    elif workers > 1:
        runner = _LocalPool(args, workers)
    else:
        runner = _InProcess(args)
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
    if _plot(study, out / "search.png"):
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


def _plot(study: Any, target: Path) -> bool:
    """Objective per trial with the best so far, and each parameter's importance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna
    except ImportError:
        return False
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return False
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done]
    best = list(_running_max(values))
    importance: dict[str, float] = {}
    if len(done) >= 3 and len(done[0].params) > 1:
        try:
            importance = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):
            importance = {}
    fig, axes = plt.subplots(1, 2 if importance else 1, figsize=(10 if importance else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(numbers, values, "o", alpha=0.6, label="trial")
    stopped = [
        (t.number, float(t.intermediate_values[0]))
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.PRUNED])
        if 0 in t.intermediate_values
    ]
    if stopped:
        ax.plot(*zip(*stopped), "x", color="C7", label="stopped early (its bound)")
    ax.plot(numbers, best, "-", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.legend()
    ax.set_title("search", fontsize=10)
    if importance:
        ax = axes[0][1]
        names = list(importance)
        ax.barh(names, [importance[n] for n in names])
        ax.invert_yaxis()
        ax.set_title("parameter importance", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True


def _running_max(values: Sequence[float]) -> Iterator[float]:
    best = -math.inf
    for v in values:
        best = max(best, v)
        yield best
