"""Shared steps that task-vector methods compose: trim, drop, rescale, elect signs, combine.

Each step is a function of plain tensors. Steps work in place on the tensors they are given, which
a merge method owns (see MergeInputs); this keeps the peak memory of a merge to the inputs of one
tensor plus fixed-size scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

RescaleMode = Literal["none", "l1", "inverse"]
Consensus = Literal["sum", "count"]

_EPS = 1e-7
_CHUNK = 1 << 20  # elementwise work runs over chunks this size, which stay in cache
_MASK_CHUNK = 1 << 22  # random draws come in chunks this size; changing it changes the masks


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """delta_i = theta_i - theta_base for each model, computed in place in the given tensors."""
    return [t.sub_(base) for t in tensors]


def trim_to_top(delta: torch.Tensor, density: float, rescale: RescaleMode = "none") -> torch.Tensor:
    """Keep the ``k = max(1, floor(density * n))`` entries of ``delta`` with largest magnitude.

    Works in place and returns ``delta``. Entries tied at the threshold magnitude are kept in index
    order, so exactly ``k`` entries survive. ``rescale`` is applied to the survivors as in
    :func:`apply_mask`. Scratch memory is one magnitude copy plus fixed-size chunks, never a
    full-size boolean mask.
    """
    flat = delta.reshape(-1)
    n = flat.numel()
    if density >= 1 or n == 0:
        return delta
    before = flat.abs().sum() if rescale == "l1" else None
    if density <= 0:
        flat.zero_()
        return delta
    k = max(1, int(density * n))
    threshold, tied, below = _kth_largest_magnitude(flat, k)
    if threshold > 0:  # else fewer than k entries are non-zero, and all of them are kept
        _keep_top(flat, threshold, tied if below else None)
    _rescale(delta, before, rescale, density)
    return delta


def _keep_top(flat: torch.Tensor, threshold: float, tied: int | None) -> None:
    """Zero entries with ``|x| < threshold`` and, when ``tied`` is given, all but the first
    ``tied`` entries with ``|x| == threshold`` (``None``: keep every one of them).

    One pass over fixed-size chunks: while tied entries remain to be kept, a chunk keeps
    ``|x| >= threshold`` (counting the ties it kept); after that, chunks keep ``|x| > threshold``.
    """
    t = torch.tensor(threshold, dtype=flat.dtype)
    at_or_above = float(torch.nextafter(t, torch.zeros_like(t)))  # |x| > this <=> |x| >= threshold
    shrink = torch.nn.functional.hardshrink  # keeps |x| > lambd
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        if tied is None or tied == 0:
            part.copy_(shrink(part, at_or_above if tied is None else threshold))
            continue
        equal = part.abs() == threshold
        count = int(torch.count_nonzero(equal))
        part.copy_(shrink(part, at_or_above))
        if count > tied:
            part[equal.nonzero().reshape(-1)[tied:]] = 0
            count = tied
        tied -= count


def _kth_largest_magnitude(flat: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The k-th largest |x|, how many entries equal to it are in the top k, and how many are not."""
    n = flat.numel()
    mags = flat.abs()
    if mags.device.type == "cpu" and mags.dtype in (torch.float32, torch.float64):
        m = mags.numpy()
        m.partition(n - k)  # in place and linear time: m[n - k:] are the k largest
        threshold = m[n - k]
        tied = int(np.count_nonzero(m[n - k :] == threshold))
        below = int(np.count_nonzero(m[: n - k] == threshold))
        return float(threshold), tied, below
    kth = torch.kthvalue(mags, n - k + 1).values
    above = int(torch.count_nonzero(mags > kth))
    equal = int(torch.count_nonzero(mags == kth))
    return float(kth), k - above, equal - (k - above)


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
    for start in range(0, n, _MASK_CHUNK):
        stop = min(n, start + _MASK_CHUNK)
        keep[start:stop] = torch.rand(stop - start, generator=generator) < density
    return keep.reshape(shape).to(device)


def apply_mask(delta: torch.Tensor, keep: torch.Tensor, rescale: RescaleMode, density: float) -> torch.Tensor:
    """Zero the dropped entries of ``delta`` (in place) and rescale the survivors.

    ``l1`` scales the survivors so the task vector keeps its L1 norm; ``inverse`` divides them by
    the keep probability ``density`` (the DARE paper); ``none`` leaves them as they are.
    """
    before = delta.abs().sum() if rescale == "l1" else None
    delta.mul_(keep)
    _rescale(delta, before, rescale, density)
    return delta


def _rescale(delta: torch.Tensor, before: torch.Tensor | None, rescale: RescaleMode, density: float) -> None:
    if rescale == "inverse":
        delta.div_(density)
    elif before is not None:
        after = delta.abs().sum()
        if before >= _EPS and after >= _EPS:
            delta.mul_(before / after)


def elect_sign(deltas: Sequence[torch.Tensor], consensus: Consensus) -> torch.Tensor:
    """+1 where the elected sign is positive (ties go to positive), -1 where it is negative.

    ``sum`` elects the sign of the summed (weighted) task vectors, i.e. the sign with more total
    magnitude; ``count`` elects the sign held by more models.
    """
    score = torch.zeros_like(deltas[0])
    for d in deltas:
        score.add_(d if consensus == "sum" else torch.sign(d))
    return score.sign_().add_(0.5).sign_()  # maps 0 to +1, keeps +1 and -1


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
            sign = elect_sign(part, consensus)
            mixed = torch.zeros_like(part[0])
            divisor = torch.zeros_like(part[0]) if normalize else None
            for d, w in zip(part, weights):
                d.mul_(sign).clamp_min_(0)  # |d| where d has the elected sign, else 0
                mixed.add_(d)
                if divisor is not None:
                    divisor.add_(d.sign_(), alpha=w)
            mixed.mul_(sign)
            if divisor is not None:
                divisor.masked_fill_(divisor == 0, 1)
                mixed.div_(divisor)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        flat_base[start : start + _CHUNK].add_(mixed)
    deltas.clear()
    return base
