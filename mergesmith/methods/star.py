"""STAR: cut each task matrix's spectrum to the directions that carry a share eta of it, restore its
nuclear norm, average.

Spectral Truncation And Rescale works on each 2-D weight matrix separately. Every model's task
matrix is factored by SVD and keeps its leading singular directions, as few as reach the fraction
``eta`` of the sum of its singular values (its nuclear norm). The kept singular values are then
scaled up together so that they sum to the whole nuclear norm again, and the rebuilt task matrices
are averaged. Other tensors (biases, norms, embeddings) take the mean of the weighted task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["StarModelParams", "StarParams", "kept_rank", "merge", "truncate_and_rescale"]


@dataclass(frozen=True)
class StarParams:
    alpha: float = param(1.0, doc="scale of the merged task vector")
    eta: float = param(
        0.4,
        doc="share of each task matrix's nuclear norm its kept singular values must reach "
        "(a fraction: the paper's eta = 40 % is 0.4)",
        lo=0,
        hi=1,
    )


@dataclass(frozen=True)
class StarModelParams:
    weight: float = param(1.0, doc="coefficient of this model's task vector in the mean")


def kept_rank(singular_values: torch.Tensor, eta: float) -> int:
    """The smallest ``r >= 1`` whose ``r`` leading singular values sum to at least ``eta`` times
    the sum of all of them; the sums are taken in float64. ``singular_values`` is non-empty and in
    descending order."""
    s = singular_values.to(torch.float64)
    total = float(s.sum())
    below = int(torch.count_nonzero(torch.cumsum(s, 0) < eta * total))
    return min(s.numel(), below + 1)


def truncate_and_rescale(matrix: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, s', Vh_r)`` with ``U_r diag(s') Vh_r`` the STAR form of ``matrix``.

    ``r`` is :func:`kept_rank` of the singular values and ``s'`` the ``r`` leading ones times
    ``sum(all) / sum(kept)``, so the nuclear norm is unchanged. A zero matrix gives empty factors.
    ``U_r`` and ``Vh_r`` are views of the full factors.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0:
        return u[:, :0], s[:0], vh[:0]
    r = kept_rank(s, eta)
    s64 = s.to(torch.float64)
    scale = float(s64.sum()) / float(s64[:r].sum())
    return u[:, :r], s[:r] * scale, vh[:r]


def merge(inputs: MergeInputs[StarParams, StarModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    params = inputs.params
    weights = [m.weight for m in inputs.model_params]
    deltas = _steps.task_vectors(base, inputs.tensors)
    count = len(deltas)
    if not _steps.is_weight_matrix(inputs.tensor_name, base):
        return _steps.combine(
            base,
            deltas,
            [w / count for w in weights],
            consensus=None,
            normalize=False,
            lambda_=params.alpha,
        )
    for i, (delta, w) in enumerate(zip(deltas, weights)):
        if w == 0:
            continue
        _steps.require_finite(delta, f"{inputs.tensor_name}: the task vector of model {i + 1}")
        u, s, vh = truncate_and_rescale(delta, params.eta)
        if s.numel():
            base.addmm_(u * s.mul_(params.alpha * w / count), vh)
        del u, s, vh
    deltas.clear()
    return base


METHOD = Method(
    name="star",
    title="STAR (spectral truncation and rescale)",
    paper="https://arxiv.org/abs/2502.10339",
    summary="per matrix: each task matrix cut to the top directions holding eta of its nuclear norm, "
    "rescaled to the whole norm, averaged, times alpha",
    params=StarParams,
    model_params=StarModelParams,
    merge=merge,
)
