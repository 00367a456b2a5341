"""PCB-merging: score every task-vector entry by intra- and inter-task balancing, keep the top ones.

Per tensor: each task vector's entries get a score, the product of two softmaxes over the tensor's
entries. Intra-balancing ranks an entry by its squared value within its own task (sharpened by the
number of models); inter-balancing sums, over every task, how large the entry's product with that
task's entry is. Each task keeps its top ``density`` fraction of scores; every entry of the merged
task vector is the score-weighted mean of the kept task-vector entries, added to the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, NoParams, base_of
from mergesmith.parameters import param

__all__ = ["PcbParams", "balancing_score", "kept_count", "merge", "min_max", "softmax"]


@dataclass(frozen=True)
class PcbParams:
    density: float = param(
        doc="fraction of each task vector's entries kept, highest balancing score first",
        lo=0,
        hi=1,
        lo_open=True,
    )
    weight: float = param(1.0, doc="scale of the merged task vector (the paper's lambda)")


def min_max(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to [0, 1] by its minimum and maximum, in place; all 0 when ``x`` is constant."""
    lo, hi = torch.aminmax(x)
    span = hi - lo
    if float(span) <= 0:
        return x.zero_()
    return x.sub_(lo).div_(span)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """The softmax of a flat ``x`` over all its entries, in place."""
    x.sub_(x.max()).exp_()
    return x.div_(x.sum())


def balancing_score(deltas: list[torch.Tensor], i: int) -> torch.Tensor:
    """Flat task vector ``i``'s balancing scores ``b_i = intra_i * inter_i`` (see the method's page).

    ``intra_i = softmax(N * norm(d_i * d_i))`` and ``inter_i = sum_j softmax(norm(d_i * d_j))``,
    ``norm`` the min-max scaling over the tensor's entries and ``N`` the number of task vectors.
    Scratch is three tensors the size of one task vector.
    """
    n = len(deltas)
    score = min_max(deltas[i] * deltas[i])
    inter = softmax(score.clone())  # the term j = i
    for j, other in enumerate(deltas):
        if j != i:
            inter.add_(softmax(min_max(deltas[i] * other)))
    return softmax(score.mul_(n)).mul_(inter)


def kept_count(density: float, entries: int) -> int:
    """How many entries each task keeps: ``max(1, floor(density * entries))``, all at ``density`` 1."""
    if density >= 1:
        return entries
    return min(entries, max(1, int(density * entries)))


def merge(inputs: MergeInputs[PcbParams, NoParams]) -> torch.Tensor:
    base = base_of(inputs)
    deltas = [d.reshape(-1) for d in _steps.task_vectors(base, inputs.tensors)]
    entries = base.numel()
    if entries == 0:
        return base
    k = kept_count(inputs.params.density, entries)
    total = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for i, delta in enumerate(deltas):  # each model's drop depends on its own scores only
        score = balancing_score(deltas, i)
        if k < entries:
            score.mul_(_steps.top_k_mask(score, k))
        divisor.add_(score)
        total.addcmul_(delta, score)
        del score
    deltas.clear()
    total.div_(divisor.clamp_min_(torch.finfo(divisor.dtype).tiny))  # an entry no task keeps stays 0
    return base.add_(total.reshape(base.shape), alpha=inputs.params.weight)


METHOD = Method(
    name="pcb",
    title="PCB-merging (parameter competition balancing)",
    paper="https://arxiv.org/abs/2410.02396",
    summary="score entries by intra- and inter-task balancing, keep the top density, score-weighted mean",
    params=PcbParams,
    model_params=NoParams,
    merge=merge,
)
