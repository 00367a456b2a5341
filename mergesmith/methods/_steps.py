"""Shared steps that task-vector methods compose: trim, drop, rescale, elect signs, combine.

Each step is a function of plain tensors. Steps work in place on the tensors they are given, which
a merge method owns (see MergeInputs); this keeps the peak memory of a merge to the inputs of one
tensor plus fixed-size scratch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

from mergesmith.errors import MethodError
from mergesmith.methods._spec import MergeInputs, base_of

__all__ = [
    "apply_mask",
    "combine",
    "combine_sparse",
    "elect_sign",
    "is_weight_matrix",
    "keep_at_least",
    "orthonormal_factor",
    "random_mask",
    "random_mask_like",
    "require_finite",
    "row_blocks",
    "row_ranks",
    "task_vectors",
    "top_k_mask",
    "top_singular",
    "trim_to_top",
    "zero_singular_tolerance",
]

RescaleMode = Literal["none", "l1", "inverse"]
Consensus = Literal["sum", "count"]

_EPS = 1e-7
_CHUNK = 1 << 20  # elementwise work runs over chunks this size, which stay in cache
_MASK_CHUNK = 1 << 22  # random draws come in chunks this size; changing it changes the masks


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """delta_i = theta_i - theta_base for each model, computed in place in the given tensors."""
    return [t.sub_(base) for t in tensors]


def trim_to_top(
    delta: torch.Tensor,
    density: float,
    rescale: RescaleMode = "none",
    reuse: MutableMapping[str, Any] | None = None,
) -> torch.Tensor:
    """Keep the ``k = max(1, floor(density * n))`` entries of ``delta`` with largest magnitude.

    Works in place and returns ``delta``. Entries tied at the threshold magnitude are kept in index
    order, so exactly ``k`` entries survive. ``rescale`` is applied to the survivors as in
    :func:`apply_mask`. Scratch memory is one magnitude copy plus fixed-size chunks, never a
    full-size boolean mask.

    With ``reuse`` (a store that belongs to this task vector, see ``MergeInputs.reuse``) the
    magnitudes are sorted once and kept there, so that trimming the same task vector again at any
    density finds its threshold by lookup instead of a selection.
    """
    if not delta.is_contiguous():  # work on a flat copy, then write the result back
        return delta.copy_(trim_to_top(delta.contiguous(), density, rescale, reuse))
    flat = delta.view(-1)
    n = flat.numel()
    if density >= 1 or n == 0:
        return delta
    before = flat.abs().sum() if rescale == "l1" else None
    if density <= 0:
        flat.zero_()
        return delta
    k = max(1, int(density * n))
    if reuse is None:
        threshold, tied, below = _kth_largest_magnitude(flat, k)
    else:
        threshold, tied, below = _kth_from_sorted(flat, k, reuse)
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
    if flat.device.type == "cpu" and flat.dtype in _MAGNITUDE_BITS:
        return _kth_by_histogram(flat, k)
    mags = flat.abs()
    kth = torch.kthvalue(mags, n - k + 1).values
    above = int(torch.count_nonzero(mags > kth))
    equal = int(torch.count_nonzero(mags == kth))
    return float(kth), k - above, equal - (k - above)


# float dtype: (integer dtype of its bits, mask clearing the sign bit, shift leaving 16 bits of key)
_MAGNITUDE_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 15),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 47),
}
_BUCKETS = 1 << 16


def _kth_by_histogram(flat: torch.Tensor, k: int) -> tuple[float, int, int]:
    """:func:`_kth_largest_magnitude` of a CPU float32/float64 tensor by a radix selection.

    With the sign bit cleared, the bits of a float read as an integer order like its magnitude
    (NaN above infinity, as a sort puts it). One pass over fixed-size chunks counts the entries in
    each of 2**16 buckets of the top bits, which finds the bucket holding the (n - k)-th smallest
    magnitude; a second pass looks at that bucket's entries alone (every entry of equal magnitude
    is among them). For float32 the 15 low bits left tell those values apart, so a second
    histogram of them gives the threshold and its ties directly; for float64 a selection among the
    bucket's entries does. Scratch is a few chunks and the histograms (float64: the bucket's
    entries), never a full-size copy, and no step depends on the thread count.
    """
    n = flat.numel()
    rank = n - k  # 0-based position of the threshold among the magnitudes in ascending order
    int_dtype, sign_off, shift = _MAGNITUDE_BITS[flat.dtype]
    bits = flat.view(int_dtype)
    hist = torch.zeros(_BUCKETS, dtype=torch.int64)
    key = torch.empty(min(n, _CHUNK), dtype=int_dtype)
    for start in range(0, n, _CHUNK):
        part = bits[start : start + _CHUNK]
        kp = key[: part.numel()]
        torch.bitwise_and(part, sign_off, out=kp)
        kp.bitwise_right_shift_(shift)
        hist.add_(torch.bincount(kp, minlength=_BUCKETS))
    cum = hist.cumsum(0)
    bucket = int(torch.searchsorted(cum, rank, right=True))
    before = int(cum[bucket] - hist[bucket])  # entries in lower buckets
    inside = rank - before  # the threshold's position among the bucket's entries
    members: list[torch.Tensor] = []
    span = 1 << shift  # values per bucket
    low = torch.zeros(span + 2, dtype=torch.int64) if shift <= 16 else None
    mag = torch.empty(min(n, _CHUNK), dtype=int_dtype)
    for start in range(0, n, _CHUNK):
        part = bits[start : start + _CHUNK]
        mp = mag[: part.numel()]
        torch.bitwise_and(part, sign_off, out=mp)
        if low is None:
            kp = key[: part.numel()]
            torch.bitwise_right_shift(mp, shift, out=kp)
            members.append(mp[kp == bucket])
        else:  # count each value of the bucket: bins 1 .. span; lower values land in 0, higher in span + 1
            mp.sub_((bucket << shift) - 1).clamp_(0, span + 1)
            low.add_(torch.bincount(mp, minlength=span + 2))
    if low is not None:
        low = low[1 : span + 1]
    if low is not None:
        cum_low = low.cumsum(0)
        offset = int(torch.searchsorted(cum_low, inside, right=True))
        value = (bucket << shift) | offset
        equal = int(low[offset])
        at_or_below = before + int(cum_low[offset])
    else:
        values = torch.cat(members).numpy()
        values.partition(inside)
        value = int(values[inside])
        at_or_below = before + int(np.count_nonzero(values <= value))
        equal = int(np.count_nonzero(values == value))
    tied = at_or_below - rank  # entries equal to the threshold at positions rank .. n - 1
    threshold = torch.tensor(int(value), dtype=int_dtype).view(flat.dtype)
    return float(threshold), tied, equal - tied


def _kth_from_sorted(flat: torch.Tensor, k: int, reuse: MutableMapping[str, Any]) -> tuple[float, int, int]:
    """As :func:`_kth_largest_magnitude`, from the magnitudes sorted once and kept in ``reuse``."""
    n = flat.numel()
    order = reuse.get("sorted_magnitudes")
    if order is None or order.numel() != n:
        mags = flat.abs()
        if mags.device.type == "cpu" and mags.dtype in (torch.float32, torch.float64):
            order = torch.from_numpy(np.sort(mags.numpy()))
        else:
            order = torch.sort(mags).values
        reuse["sorted_magnitudes"] = order
    kth = order[n - k : n - k + 1]
    first = int(torch.searchsorted(order, kth, side="left"))
    after = int(torch.searchsorted(order, kth, side="right"))
    return float(kth), after - (n - k), (n - k) - first


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
    score = deltas[0].clone() if consensus == "sum" else torch.sign(deltas[0])
    for d in deltas[1:]:
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
    divide_by: Literal["weight", "count"] = "weight",
) -> torch.Tensor:
    """base + lambda * merged task vector, computed in place in ``base`` and ``deltas``.

    Without consensus the merged vector is ``sum_i w_i delta_i``, divided by ``sum_i w_i`` when
    ``normalize``. With consensus, only entries whose sign agrees with the elected sign count, and
    ``normalize`` divides each entry by the sum of the weights of the models that agree there
    (the disjoint mean), or by their number with ``divide_by="count"``. The work runs over fixed-size chunks, so it needs no full-size scratch.
    """
    total = float(sum(weights))
    divide_all = consensus is None and normalize and abs(total) >= 1e-8
    if not base.is_contiguous():  # work on a flat copy, then write the result back
        return base.copy_(
            combine(
                base.contiguous(),
                deltas,
                weights,
                consensus=consensus,
                normalize=normalize,
                lambda_=lambda_,
                divide_by=divide_by,
            )
        )
    deltas[:] = [d if d.is_contiguous() else d.contiguous() for d in deltas]
    flat_base = base.view(-1)
    flat = [d.view(-1) for d in deltas]
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
                    divisor.add_(d.sign_(), alpha=w if divide_by == "weight" else 1.0)
            mixed.mul_(sign)
            if divisor is not None:
                divisor.add_(divisor == 0)  # 0 -> 1, the rest unchanged; faster than masked_fill_
                mixed.div_(divisor)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        flat_base[start : start + _CHUNK].add_(mixed)
    deltas.clear()
    return base


class _Combined(Protocol):
    @property
    def normalize(self) -> bool: ...
    @property
    def lambda_(self) -> float: ...


class _Weighted(Protocol):
    @property
    def weight(self) -> float: ...


_P = TypeVar("_P", bound=_Combined)
_M = TypeVar("_M", bound=_Weighted)


def combine_sparse(
    inputs: MergeInputs[_P, _M], deltas: list[torch.Tensor], consensus: Consensus | None
) -> torch.Tensor:
    """:func:`combine` of sparsified task vectors with the inputs' weights, ``normalize`` and ``lambda``.

    The last step of every drop-then-merge method (DARE, breadcrumbs, DELLA): ``consensus=None``
    gives the linear variant, ``"sum"`` the TIES variant.
    """
    return combine(
        base_of(inputs),
        deltas,
        [m.weight for m in inputs.model_params],
        consensus=consensus,
        normalize=inputs.params.normalize,
        lambda_=inputs.params.lambda_,
    )


def keep_at_least(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero, in place, every entry of ``delta`` with ``|x| < threshold``; return ``delta``."""
    if threshold <= 0:
        return delta
    if not delta.is_contiguous():
        return delta.copy_(keep_at_least(delta.contiguous(), threshold))
    t = torch.tensor(threshold, dtype=delta.dtype)
    below = float(torch.nextafter(t, torch.zeros_like(t)))  # |x| > this <=> |x| >= threshold
    flat = delta.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        part.copy_(torch.nn.functional.hardshrink(part, below))
    return delta


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask, shaped like ``values``, of its ``k`` entries of largest magnitude.

    Entries of equal magnitude are taken in flat index order (lower index first), so exactly
    ``min(max(k, 0), n)`` entries are selected. Linear time; scratch is two magnitude copies.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        fill = torch.ones if k >= n else torch.zeros
        return fill(values.shape, dtype=torch.bool, device=values.device)
    threshold, tied, below = _kth_largest_magnitude(flat, k)
    mags = flat.abs()
    keep = mags > threshold
    at = mags == threshold
    if below:
        at[at.nonzero().reshape(-1)[tied:]] = False
    keep |= at
    return keep.reshape(values.shape)


def row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Consecutive slices of rows that hold about one work chunk of entries each (at least one row)."""
    step = max(1, _CHUNK // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def row_ranks(rows: torch.Tensor, *, descending: bool = False) -> torch.Tensor:
    """The 0-based rank (int64) of each entry of a 2-D tensor by magnitude within its row.

    Rank 0 is the smallest magnitude, or the largest when ``descending``. Entries of equal
    magnitude get consecutive ranks in column order (the lower column the lower rank), so each
    row's ranks are exactly ``0 .. n_cols - 1``.
    """
    order = torch.argsort(rows.abs(), dim=1, descending=descending, stable=True)
    positions = torch.arange(rows.shape[1], device=rows.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def random_mask_like(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask keeping entry ``j`` independently with probability ``probs[j]``.

    It consumes ``generator`` exactly as :func:`random_mask` does (the same uniform draws in the
    same chunks, compared with the entry's probability), so where every probability equals
    ``density`` the two functions give the same mask.
    """
    flat = probs.reshape(-1)
    n = flat.numel()
    keep = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, _MASK_CHUNK):
        stop = min(n, start + _MASK_CHUNK)
        keep[start:stop] = torch.rand(stop - start, generator=generator) < flat[start:stop].cpu()
    return keep.reshape(probs.shape).to(probs.device)


# -- steps of the SVD-based (subspace) methods ------------------------------------------------------

_VOCAB_PARTS = frozenset({"lm_head", "wte", "wpe"})


def is_weight_matrix(tensor_name: str, tensor: torch.Tensor) -> bool:
    """True for a non-empty 2-D tensor that is not an embedding or vocabulary projection.

    A name counts as an embedding when one of its dot-separated parts contains ``embed`` or is
    ``lm_head``, ``wte`` or ``wpe``. SVD-based methods merge the other tensors (1-D, 3-D and up,
    embeddings) by plain task arithmetic.
    """
    if tensor.dim() != 2 or tensor.numel() == 0:
        return False
    return not any("embed" in part or part in _VOCAB_PARTS for part in tensor_name.split("."))


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise a MethodError naming ``what`` when ``tensor`` holds NaN or infinite values."""
    if not bool(torch.isfinite(tensor).all()):
        raise MethodError(
            f"{what} holds NaN or infinite values, which have no singular value decomposition; "
            "check the input models for NaN/Inf"
        )


def zero_singular_tolerance(shape: Sequence[int], scale: float, dtype: torch.dtype) -> float:
    """Singular values at or below this are rounding error: ``4 * sqrt(max(shape)) * eps * scale``.

    ``scale`` is the size of the matrix they came from (its largest singular value or a bound on
    it). Rounding leaves exactly rank-deficient float32 matrices with a few ``eps * scale`` of
    spurious singular value; this cut sits above that and well below real directions.
    """
    return 4 * math.sqrt(max(shape)) * torch.finfo(dtype).eps * scale


def top_singular(
    matrix: torch.Tensor, count: int, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``count`` leading singular triplets ``(U_k, S_k, Vh_k)`` of ``matrix``, fewer if it has
    fewer numerically non-zero singular values.

    Singular values at or below :func:`zero_singular_tolerance` of ``scale`` (default: the largest
    singular value) are left out: their vectors are an arbitrary basis of a null space. The
    results are views of the full factors; copy them to let the rest be freed.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0:
        return u, s, vh
    ref = float(s[0]) if scale is None else scale
    tol = zero_singular_tolerance(matrix.shape, ref, matrix.dtype)
    keep = min(count, int(torch.count_nonzero(s > tol)))
    return u[:, :keep], s[:keep], vh[:keep]


def orthonormal_factor(x: torch.Tensor) -> torch.Tensor:
    """``P @ Q^T`` from the reduced SVD ``x = P S Q^T``: the matrix nearest to ``x`` (Frobenius norm)
    whose columns, or rows when ``x`` is wider than tall, are orthonormal (orthogonal Procrustes).

    It commutes with transposition, so the same call orthonormalises stacked right singular
    vectors given as rows.
    """
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return torch.matmul(p, qh)
