"""The merge report: base, parents and merged models side by side on every task.

A merged model is judged on the tasks it was evaluated on. Each such task is owned by the parent
of that model that scores best on it (or by the parent the caller names): the merged model's
normalized accuracy on the task is its accuracy over the owner's, and its average is the mean
over its tasks. The best merge is the one with the highest average among those judged on at
least two tasks (one task alone says nothing about what a merge kept). Two warnings:

- *collapse*: normalized accuracy below ``collapse_below`` (default 0.5), both compared as printed
  (to a tenth of a percent): the merge lost most of that parent's capability (catastrophic
  interference); the advice depends on the merge method when the entry knows it;
- *below base*: accuracy under the base model's on a task of the merge (by more than
  ``base_margin``): the merge does worse than not fine-tuning at all.

:func:`build_report` is pure (scores in, report out); :func:`compare` evaluates the models first.
The report is written as Markdown, JSON and, with matplotlib installed, a PNG heatmap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath

from mergesmith import defaults
from mergesmith._output import atomic_write, os_error
from mergesmith._text import printable
from mergesmith.errors import ConfigError
from mergesmith.evaluate import Task, TaskScore, evaluate

__all__ = ["Entry", "Report", "Warning", "build_report", "compare", "labels", "method_of", "write_report"]

Scores = Mapping[str, TaskScore]  # task name -> score


@dataclass(frozen=True)
class Entry:
    """One evaluated model: its label, where it came from, and its score on each task."""

    name: str
    path: str
    scores: Scores
    parents: tuple[str, ...] = ()  # merged models: the names of the parents merged into it
    method: str | None = None  # merged models: the merge method, where known


@dataclass(frozen=True)
class Warning:
    model: str
    task: str
    kind: str  # "collapse" or "below_base"
    message: str


@dataclass
class Report:
    tasks: list[str]
    base: Entry | None
    parents: list[Entry]
    merged: list[Entry]
    owners: dict[str, str]  # task -> parent name
    normalized: dict[str, dict[str, float]]  # merged name -> task -> accuracy / owner's accuracy
    average: dict[str, float]  # merged name -> mean normalized accuracy over its tasks
    warnings: list[Warning] = field(default_factory=list)

    def best(self) -> str | None:
        """The merged model with the highest average normalized accuracy among those judged on at
        least two tasks; None when there is none."""
        judged = [n for n in self.average if len(self.normalized.get(n, {})) >= 2]
        return max(judged, key=lambda n: self.average[n], default=None)

    def to_dict(self) -> dict[str, object]:
        def entry(e: Entry | None) -> dict[str, object] | None:
            if e is None:
                return None
            return {
                "name": e.name,
                "path": e.path,
                "parents": list(e.parents),
                "method": e.method,
                "scores": {t: asdict(s) for t, s in e.scores.items()},
            }

        return {
            "tasks": self.tasks,
            "owners": self.owners,
            "base": entry(self.base),
            "parents": [entry(p) for p in self.parents],
            "merged": [entry(m) for m in self.merged],
            "normalized_accuracy": self.normalized,
            "average_normalized_accuracy": self.average,
            "warnings": [asdict(w) for w in self.warnings],
        }

    def to_markdown(self) -> str:
        head = ["model", *self.tasks, "avg normalized"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def row(e: Entry, kind: str) -> str:
            cells = [f"{e.name} ({kind})"]
            for t in self.tasks:
                s = e.scores.get(t)
                if s is None:
                    cells.append("")
                    continue
                cell = f"{s.accuracy:.1%}"
                norm = self.normalized.get(e.name, {}).get(t)
                if norm is not None:
                    cell += f" ({_percent(norm)})"
                if self.owners.get(t) == e.name:
                    cell = f"**{cell}**"
                cells.append(cell)
            avg = self.average.get(e.name)
            cells.append(f"{avg:.1%}" if avg is not None else "")
            return "| " + " | ".join(cells) + " |"

        if self.base is not None:
            lines.append(row(self.base, "base"))
        lines += [row(p, "parent") for p in self.parents]
        lines += [row(m, "merged") for m in self.merged]
        text = [
            "Exact-match accuracy per task; in brackets, normalized accuracy (merged / the parent that",
            "owns the task, shown in bold). The average is over each merged model's own tasks.",
            "",
            *lines,
        ]
        best = self.best()
        if best is not None:
            text += [
                "",
                f"Best merge: {best} ({self.average[best]:.1%} normalized accuracy on average over "
                f"{len(self.normalized[best])} tasks).",
            ]
        if self.warnings:
            text += ["", "Warnings:", *(f"- {w.message}" for w in self.warnings)]
        return "\n".join(text) + "\n"


def build_report(
    tasks: Sequence[str],
    parents: Sequence[Entry],
    merged: Sequence[Entry],
    *,
    base: Entry | None = None,
    owners: Mapping[str, str] | None = None,
    collapse_below: float = 0.5,
    base_margin: float = 0.0,
) -> Report:
    """Normalize each merged model's accuracy by the owning parent's and collect the warnings."""
    names = [p.name for p in parents]
    if len(set(names)) != len(names):
        raise ConfigError(f"parent names must differ, found {names}")
    for task, name in (owners or {}).items():
        if name not in names:
            raise ConfigError(f"task {task!r} is owned by {name!r}, which is not a parent: {names}")
    chosen: dict[str, str] = {}
    for task in tasks:
        owner = _owner(task, parents, owners)
        if owner is not None:
            chosen[task] = owner.name
    by_name = {p.name: p for p in parents}
    normalized: dict[str, dict[str, float]] = {}
    average: dict[str, float] = {}
    warnings: list[Warning] = []
    for m in merged:
        unknown = [n for n in m.parents if n not in by_name]
        if unknown:
            raise ConfigError(f"merged model {m.name!r} names unknown parents {unknown}; parents are {names}")
        pool = [by_name[n] for n in m.parents] if m.parents else list(parents)
        norms: dict[str, float] = {}
        for t in tasks:
            if t not in m.scores:
                continue
            owner = _owner(t, pool, owners)
            if owner is None or owner.scores[t].accuracy <= 0:
                continue
            ref = owner.scores[t].accuracy
            norms[t] = m.scores[t].accuracy / ref
            if _shown(norms[t]) < _shown(collapse_below):  # as printed: 49.96% is 50.0%, not below it
                warnings.append(
                    Warning(
                        m.name,
                        t,
                        "collapse",
                        f"{m.name}: {t} collapsed to {m.scores[t].accuracy:.1%} from {ref:.1%} in "
                        f"{owner.name} ({_percent(norms[t])} normalized, below {_percent(collapse_below)}): "
                        "the merge destroyed this capability (catastrophic interference); "
                        + _advice(m.method),
                    )
                )
            if base is not None and t in base.scores:
                floor = base.scores[t].accuracy
                if m.scores[t].accuracy < floor - base_margin:
                    warnings.append(
                        Warning(
                            m.name,
                            t,
                            "below_base",
                            f"{m.name}: {t} at {m.scores[t].accuracy:.1%} is worse than the base model's "
                            f"{floor:.1%}",
                        )
                    )
        normalized[m.name] = norms
        if norms:
            average[m.name] = sum(norms.values()) / len(norms)
    return Report(list(tasks), base, list(parents), list(merged), chosen, normalized, average, warnings)


def _shown(fraction: float) -> float:
    """A fraction as printed by :func:`_percent`, in percent."""
    return round(fraction * 100, 1)


def _percent(fraction: float) -> str:
    return f"{_shown(fraction):.1f}%"


# methods that already keep only part of each change (a density): the advice for them is a lower one
_TRIMMING = {
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "knots_ties",
}


def _advice(method: str | None) -> str:
    """What to try after a collapse, never the method that was used."""
    if method in _TRIMMING:
        return (
            f"lower the other models' weights, or keep less of each with a lower density than this "
            f"{method} merge used"
        )
    others = [m for m in ("ties", "dare_ties") if m != method]
    return "lower the other models' weights, or trim with " + " or ".join(others)


def method_of(model: str) -> str | None:
    """The merge method recorded in a model directory mergesmith wrote (None where there is none)."""
    import yaml

    path = Path(model) / "mergesmith_config.yml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    method = doc.get("merge_method") if isinstance(doc, dict) else None
    return method if isinstance(method, str) else None


def labels(models: Sequence[str]) -> list[str]:
    """Short, distinct labels for models: ``NAME=MODEL`` as given, else the last path part
    (``base+adapter`` gives ``base+adapter``'s last parts); the full text where two would clash."""
    out: list[str] = []
    for m in models:
        name, sep, _ = m.partition("=")
        label = name if sep else "+".join(PurePath(part).name or part for part in m.split("+"))
        out.append(label if label not in out else m)
    return out


def _owner(task: str, pool: Sequence[Entry], owners: Mapping[str, str] | None) -> Entry | None:
    """The named owner when it is in ``pool``, else the best-scoring parent of ``pool`` on the task
    (the first of the best), or None when the task belongs to none of them."""
    named = (owners or {}).get(task)
    if named is not None:
        return next((p for p in pool if p.name == named), None) or _best(task, pool)
    return _best(task, pool)


def _best(task: str, pool: Sequence[Entry]) -> Entry | None:
    scored = [p for p in pool if task in p.scores]
    return max(scored, key=lambda p: p.scores[task].accuracy) if scored else None


def write_report(report: Report, directory: str | Path, stem: str = "eval_report") -> list[Path]:
    """``<stem>.md``, ``<stem>.json`` and, when matplotlib is installed, ``<stem>.png``."""
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(out, exc, "cannot create the report directory") from None
    md = out / f"{stem}.md"
    atomic_write(md, report.to_markdown())
    js = out / f"{stem}.json"
    atomic_write(js, json.dumps(report.to_dict(), indent=2) + "\n")
    written = [md, js]
    png = out / f"{stem}.png"
    if _plot(report, png):
        written.append(png)
    return written


def _plot(report: Report, path: Path) -> bool:
    """A heatmap of accuracy, one row per model, one column per task; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = ([report.base] if report.base else []) + report.parents + report.merged
    labels = [e.name for e in rows]
    grid = [[e.scores[t].accuracy if t in e.scores else float("nan") for t in report.tasks] for e in rows]
    height = 1.2 + 0.32 * len(rows)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(report.tasks), height))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(report.tasks)), report.tasks)
    ax.set_yticks(range(len(labels)), labels)
    for i, values in enumerate(grid):
        for j, v in enumerate(values):
            if v == v:  # not NaN
                ax.text(
                    j,
                    i,
                    f"{v:.0%}",
                    ha="center",
                    va="center",
                    color="white" if v < 0.6 else "black",
                    fontsize=8,
                )
    if report.base is not None:
        ax.axhline(0.5, color="white", linewidth=2)
    ax.axhline(len(rows) - len(report.merged) - 0.5, color="white", linewidth=2)
    ax.set_title("exact-match accuracy", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare(
    tasks: Sequence[Task],
    parents: Mapping[str, str],
    merged: Mapping[str, tuple[str, Sequence[str]]],
    *,
    base: str | None = None,
    owners: Mapping[str, str] | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    device: str = defaults.DEVICE,
    progress: bool = False,
    collapse_below: float = 0.5,
    add_special_tokens: bool = True,
    say: Callable[[str], None] | None = None,
    methods: Mapping[str, str | None] | None = None,
) -> Report:
    """Evaluate every model and build the report.

    ``parents`` maps a label to a model (path, Hub id or ``base+adapter``); ``merged`` maps a label
    to ``(model, names of its parents)`` (an empty list means all parents). ``say`` receives a line
    as each model and task starts. ``methods`` gives a merged label's method; otherwise it is read
    from the ``mergesmith_config.yml`` mergesmith writes beside a merged model.
    """
    cache: dict[str, dict[str, TaskScore]] = {}
    models = list(
        dict.fromkeys([*([base] if base else []), *parents.values(), *(p for p, _ in merged.values())])
    )

    def scores(model: str) -> dict[str, TaskScore]:
        if model not in cache:
            if say is not None:
                say(f"model {len(cache) + 1}/{len(models)}: {printable(model)}")
            got = evaluate(
                model,
                tasks,
                batch_size=batch_size,
                device=device,
                progress=progress,
                add_special_tokens=add_special_tokens,
                say=say,
            )
            cache[model] = {s.task: s for s in got}
        return cache[model]

    for label, (_, names) in merged.items():
        unknown = [n for n in names if n not in parents]
        if unknown:
            raise ConfigError(
                f"merged model {label!r} names unknown parents {unknown}; parents are {list(parents)}"
            )
    base_entry = Entry("base", base, scores(base)) if base else None
    parent_entries = [Entry(n, p, scores(p)) for n, p in parents.items()]
    known = dict(methods or {})
    merged_entries = [
        Entry(n, p, scores(p), tuple(names), known[n] if n in known else method_of(p))
        for n, (p, names) in merged.items()
    ]
    return build_report(
        [t.name for t in tasks],
        parent_entries,
        merged_entries,
        base=base_entry,
        owners=owners,
        collapse_below=collapse_below,
    )
