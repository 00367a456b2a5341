"""Statistics over a whole model's task vector, gathered by streaming passes before the merge.

Some methods, as their papers define them, trim each model's task vector over all of its weights
at once rather than tensor by tensor: TIES keeps the entries whose magnitude is among the top
``density`` of the model's whole task vector. :func:`magnitude_thresholds` finds each model's
magnitude threshold exactly without holding the model: a first pass counts magnitudes into a
histogram over the top bits of their float32 representation (monotone in the value for
non-negative floats), a second pass collects only the magnitudes in the bin that holds the
threshold and selects it exactly among them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = ["magnitude_thresholds"]

_SHIFT = 15  # bins hold the top 16 bits of a non-negative float32: exponent and 8 mantissa bits
_BINS = 1 << 16

# For one job: the base tensor and the inputs' task vectors with the plan model index of each.
TaskVectors = Callable[[], Iterable[tuple[int, torch.Tensor]]]


def _bins(mags: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_right_shift(mags.view(torch.int32), _SHIFT)


def magnitude_thresholds(jobs: Iterable[TaskVectors], ranks: Mapping[int, float]) -> dict[int, float]:
    """For each model, the magnitude that its top ``ranks[model]`` fraction of entries reach.

    ``jobs`` is iterated twice (it must give the same task vectors each time). For a model with
    ``n`` entries in all and ``keep = int(density * n)``, the threshold is the ``(keep + 1)``-th
    largest magnitude, as in the TIES reference code (which keeps every entry at or above the
    ``(n - keep)``-th smallest); ``keep == n`` gives 0 (everything is kept).
    """
    jobs = list(jobs)
    counts: dict[int, torch.Tensor] = {}
    sizes: dict[int, int] = {}
    for make in jobs:
        for model, delta in make():
            mags = delta.detach().abs().float().reshape(-1).cpu()
            hist = torch.bincount(_bins(mags), minlength=_BINS)
            counts[model] = counts[model] + hist if model in counts else hist
            sizes[model] = sizes.get(model, 0) + mags.numel()
    targets: dict[int, tuple[int, int]] = {}  # model -> (bin, rank within the bin from its top)
    thresholds: dict[int, float] = {}
    for model, hist in counts.items():
        n = sizes[model]
        keep = int(ranks[model] * n)
        if keep >= n:
            thresholds[model] = 0.0
            continue
        wanted = keep + 1  # 1-based rank from the largest
        above = torch.flip(hist, [0]).cumsum(0)  # entries in this bin or any higher one
        top_down = int(torch.searchsorted(above, torch.tensor(wanted)))
        b = _BINS - 1 - top_down
        higher = int(above[top_down - 1]) if top_down > 0 else 0
        targets[model] = (b, wanted - higher)
    picked: dict[int, list[torch.Tensor]] = {m: [] for m in targets}
    for make in jobs:
        for model, delta in make():
            if model not in targets:
                continue
            mags = delta.detach().abs().float().reshape(-1).cpu()
            picked[model].append(mags[_bins(mags) == targets[model][0]])
    for model, (_, rank) in targets.items():
        values = torch.cat(picked[model])
        thresholds[model] = float(torch.topk(values, rank).values[-1])
    return thresholds
