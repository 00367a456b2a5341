"""The plot of a study: objective per trial with the best so far, and each parameter's importance."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot"]


def plot(study: Any, target: Path) -> bool:
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
