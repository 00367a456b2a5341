"""What a trial is scored by: the weighted mean normalized accuracy less a penalty for accuracy
lost below the base model, and its bound for a trial scored in part."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mergesmith import defaults

__all__ = ["Objective", "optimistic"]


@dataclass(frozen=True)
class Objective:
    """Weighted mean normalized accuracy, less ``penalty`` x the accuracy lost below the base."""

    owner_accuracy: Mapping[str, float]  # task -> the best parent's accuracy
    base_accuracy: Mapping[str, float] | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    penalty: float = defaults.PENALTY

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
