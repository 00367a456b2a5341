"""TSV-M: keep each task matrix's leading singular directions, decorrelate them across models, add.

Task Singular Vectors merging works on each 2-D weight matrix separately. Every model's task matrix
is cut down to its top singular triplets; the left singular vectors of all models are put side by
side and replaced by the nearest matrix with orthonormal columns (orthogonal Procrustes), and so
are the right ones; the merged task matrix is rebuilt from those and the kept singular values.
Other tensors (biases, norms, embeddings) take the mean of the weighted task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["TsvModelParams", "TsvParams", "kept_directions", "merge"]


@dataclass(frozen=True)
class TsvParams:
    alpha: float = param(1.0, doc="scale of the merged task vector")
    k: float = param(
        0.0,
        doc="fraction of each task matrix's singular directions kept; 0 keeps 1/T of them for T models",
        lo=0,
        hi=1,
    )


@dataclass(frozen=True)
class TsvModelParams:
    weight: float = param(1.0, doc="coefficient of this model's task vector (scales its singular values)")


def kept_directions(rank: int, models: int, k: float) -> int:
    """How many singular directions of each task matrix TSV-M keeps: at least 1, at most ``rank``."""
    count = rank // models if k == 0 else int(k * rank)
    return min(rank, max(1, count))


def merge(inputs: MergeInputs[TsvParams, TsvModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    params = inputs.params
    weights = [m.weight for m in inputs.model_params]
    deltas = _steps.task_vectors(base, inputs.tensors)
    if not _steps.is_weight_matrix(inputs.tensor_name, base):
        return _steps.combine(
            base,
            deltas,
            [w / len(deltas) for w in weights],
            consensus=None,
            normalize=False,
            lambda_=params.alpha,
        )
    rows, cols = base.shape
    count = kept_directions(min(rows, cols), len(deltas), params.k)
    width = count * sum(1 for w in weights if w != 0)
    u_hat = base.new_empty(rows, width)
    s_hat = base.new_empty(width)
    vh_hat = base.new_empty(width, cols)
    filled = 0
    for i, (delta, w) in enumerate(zip(deltas, weights)):
        if w == 0:
            continue
        _steps.require_finite(delta, f"{inputs.tensor_name}: the task vector of model {i + 1}")
        u, s, vh = _steps.top_singular(delta, count)
        n = s.numel()
        u_hat[:, filled : filled + n] = u
        torch.mul(s, w, out=s_hat[filled : filled + n])
        vh_hat[filled : filled + n] = vh
        filled += n
        del u, s, vh
    deltas.clear()
    if filled == 0:  # every task matrix is zero or weighted 0
        return base
    u_perp = _steps.orthonormal_factor(u_hat[:, :filled])
    del u_hat
    vh_perp = _steps.orthonormal_factor(vh_hat[:filled])
    del vh_hat
    u_perp.mul_(s_hat[:filled])
    return base.addmm_(u_perp, vh_perp, alpha=params.alpha)


METHOD = Method(
    name="tsv",
    title="TSV-M (task singular vectors)",
    paper="https://arxiv.org/abs/2412.00081",
    summary="per matrix: top singular directions of each task matrix, decorrelated across models, added with scale alpha",
    params=TsvParams,
    model_params=TsvModelParams,
    merge=merge,
)
