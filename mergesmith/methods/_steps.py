"""Shared steps that task-vector methods compose: trim, drop, rescale, elect signs, combine.

Each step is a function of plain tensors. Steps work in place on the tensors they are given, which
a merge method owns (see MergeInputs); this keeps the peak memory of a merge to the inputs of one
tensor plus fixed-size scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

RescaleMode = Literal["none", "l1", "inverse"]
Consensus = Literal["sum", "count"]

_EPS = 1e-7
_CHUNK = 1 << 22


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """delta_i = theta_i - theta_base for each model, computed in place in the given tensors."""
    return [t.sub_(base) for t in tensors]


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``k = max(1, floor(density * n))`` entries of largest magnitude.

    Entries tied at the threshold are taken in index order, so exactly ``k`` entries are kept.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    mags = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mags, n - k + 1).values
    keep = mags > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at = (mags == threshold).nonzero().reshape(-1)[:missing]
        keep[at] = True
    return keep.reshape(delta.shape)


def random_mask(
    shape: torch.Size, density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Boolean mask keeping each entry independently with probability ``density``.

    Drawn on the CPU in fixed-size chunks from ``generator``, so the bits depend only on the seed,
    not on thread count, order of work or device.
    """
    n = 1
    for s in shape:
        n *= s
    keep = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        keep[start:stop] = torch.rand(stop - start, generator=generator) < density
    return keep.reshape(shape).to(device)


def apply_mask(delta: torch.Tensor, keep: torch.Tensor, rescale: RescaleMode, density: float) -> torch.Tensor:
    """Zero the dropped entries of ``delta`` (in place) and rescale the survivors.

    ``l1`` scales the survivors so the task vector keeps its L1 norm; ``inverse`` divides them by
    the keep probability ``density`` (the DARE paper); ``none`` leaves them as they are.
    """
    before = delta.abs().sum() if rescale == "l1" else None
    delta.mul_(keep)
    if rescale == "inverse":
        delta.div_(density)
    elif before is not None:
        after = delta.abs().sum()
        if before >= _EPS and after >= _EPS:
            delta.mul_(before / after)
    return delta


def elect_sign(deltas: Sequence[torch.Tensor], consensus: Consensus) -> torch.Tensor:
    """Boolean tensor, True where the elected sign is positive (ties go to positive).

    ``sum`` elects the sign of the summed (weighted) task vectors, i.e. the sign with more total
    magnitude; ``count`` elects the sign held by more models.
    """
    score = torch.zeros_like(deltas[0])
    for d in deltas:
        score.add_(d if consensus == "sum" else torch.sign(d))
    return score >= 0


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """base + lambda * merged task vector, computed in place in ``base`` and ``deltas``.

    Without consensus the merged vector is ``sum_i w_i delta_i``, divided by ``sum_i w_i`` when
    ``normalize``. With consensus, only entries whose sign agrees with the elected sign count, and
    ``normalize`` divides each entry by the sum of the weights of the models that agree there
    (the disjoint mean). The work runs over fixed-size chunks, so it needs no full-size scratch.
    """
    total = float(sum(weights))
    divide_all = consensus is None and normalize and abs(total) >= 1e-8
    flat_base = base.reshape(-1)
    flat = [d.reshape(-1) for d in deltas]
    for start in range(0, flat_base.numel(), _CHUNK):
        part = [d[start : start + _CHUNK] for d in flat]
        for d, w in zip(part, weights):
            d.mul_(w)
        if consensus is None:
            mixed = part[0].clone()
            for d in part[1:]:
                mixed.add_(d)
            if divide_all:
                mixed.div_(total)
        else:
            positive = elect_sign(part, consensus)
            mixed = torch.zeros_like(part[0])
            divisor = torch.zeros_like(part[0]) if normalize else None
            for d, w in zip(part, weights):
                agree = torch.where(positive, d > 0, d < 0)
                mixed.add_(d.mul_(agree))
                if divisor is not None:
                    divisor.add_(agree.to(divisor.dtype), alpha=w)
            if divisor is not None:
                divisor[divisor == 0] = 1
                mixed.div_(divisor)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        flat_base[start : start + _CHUNK].add_(mixed)
    deltas.clear()
    return base
