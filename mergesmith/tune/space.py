"""The search space of a tune config: its ``{search: [low, high]}`` nodes, their values, and the
checks on the search options."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith import _yaml, defaults
from mergesmith._text import printable
from mergesmith.errors import ConfigError, ConfigWarning

if TYPE_CHECKING:
    from mergesmith.config import MergeConfig

__all__ = [
    "MAX_GRID",
    "SAMPLERS",
    "Dimension",
    "check_options",
    "midpoint",
    "search_space",
    "substitute",
    "substitute_lined",
    "trial_config",
]

SAMPLERS = ("tpe", "cmaes", "grid")
MAX_GRID = 100_000  # points a grid search may enqueue


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


def search_space(doc: Mapping[str, Any], *, source: str | None = None) -> list[Dimension]:
    """Every ``{search: [low, high]}`` node of a config document, or a ConfigError naming each bad one.
    With ``source`` (the file ``doc`` was read from by :mod:`mergesmith._yaml`) the error names that
    file and each problem's line."""
    found: list[Dimension] = []
    problems: list[str] = []

    def walk(node: Any, path: tuple[str | int, ...], line: int | None) -> None:
        if isinstance(node, Mapping):
            if "search" in node:
                where = ("" if source is None or not line else f"line {line}: ") + ".".join(
                    str(p) for p in path
                )
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
                walk(v, (*path, k), _yaml.line_of(node, k) or line)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i), _yaml.line_of(node, i) or line)

    walk(doc, (), None)
    if problems:
        raise ConfigError(problems, source or "tune config")
    if not found:
        raise ConfigError(
            "the config searches nothing: mark a value as {search: [low, high]}", source or "tune config"
        )
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
    if isinstance(value, list):
        items = [repr(v) if not isinstance(v, (dict, list)) else "..." for v in value[:4]]
        text = "[" + ", ".join(items + (["..."] if len(value) > 4 else [])) + "]"
    elif isinstance(value, dict):
        text = "{...}"
    else:
        text = repr(value)
    return printable(text if len(text) <= 60 else text[:60] + "...")


def check_options(
    space: Sequence[Dimension],
    tasks: Sequence[str],
    *,
    sampler: str,
    seed: int,
    grid_steps: int,
    penalty: float,
    task_weights: Mapping[str, float],
    batch_size: int = defaults.TUNE_BATCH_SIZE,
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


def trial_config(
    doc: Any, space: Sequence[Dimension], values: Mapping[str, float], name: str | None = None
) -> MergeConfig:
    """The merge config at ``values``, read without repeating the config's warnings: the study
    shows them once, when it first reads the tune config. ``doc`` as read by
    :mod:`mergesmith._yaml` (with ``name``, its path) keeps the tune config's lines in errors."""
    from mergesmith.config import load_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        if name is not None:
            return load_config(substitute_lined(doc, space, values), name=name)
        return load_config(substitute(doc, space, values))


def substitute(
    doc: Mapping[str, Any], space: Sequence[Dimension], values: Mapping[str, float]
) -> dict[str, Any]:
    """A plain config document with each searched node replaced by its value."""
    out: Any = json.loads(json.dumps(doc))
    _put(out, space, values)
    return dict(out)


def substitute_lined(doc: Any, space: Sequence[Dimension], values: Mapping[str, float]) -> Any:
    """:func:`substitute` on a document read by :mod:`mergesmith._yaml`, keeping the line of every
    key and item, so that a merge config error names the tune config's lines."""
    out = copy.deepcopy(doc)
    _put(out, space, values)
    return out


def _put(doc: Any, space: Sequence[Dimension], values: Mapping[str, float]) -> None:
    for dim in space:
        node = doc
        for key in dim.path[:-1]:
            node = node[key]
        node[dim.path[-1]] = float(values[dim.name])


def midpoint(space: Sequence[Dimension]) -> dict[str, float]:
    """The starting values: each dimension's ``default``, else the middle of its range."""
    return {d.name: d.default if d.default is not None else d.grid(3)[1] for d in space}
