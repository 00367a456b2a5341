"""CART: average the models, then add back each model's offset from the average, cut to low rank.

Centered Arithmetic with Rank-reduced Task vectors takes no base model. Its origin is the plain
average of the models, and each model's task vector is its offset from that average. On every 2-D
weight matrix each offset is replaced by its best approximation of rank ``max(1, floor(rank_ratio
* r))`` (its leading singular triplets), the approximations are summed, scaled by ``lambda`` and
added to the average. Other tensors (biases, norms, embeddings) keep their full offsets, which sum
to zero, so they take the average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, NoParams
from mergesmith.parameters import param

__all__ = ["CartParams", "kept_rank", "merge"]


@dataclass(frozen=True)
class CartParams:
    lambda_: float = param(1.0, doc="scale of the summed low-rank centered task vectors", key="lambda")
    rank_ratio: float = param(
        0.08,
        doc="fraction of each weight matrix's full rank min(m, n) kept of every centered task matrix, "
        "floor(rank_ratio * r) and at least 1",
        lo=0,
        hi=1,
        lo_open=True,
    )


def kept_rank(rank: int, rank_ratio: float) -> int:
    """How many singular directions of each centered task matrix CART keeps: ``floor(rank_ratio *
    rank)``, at least 1 and at most ``rank``."""
    return min(rank, max(1, int(rank_ratio * rank)))


def _average(tensors: list[torch.Tensor]) -> torch.Tensor:
    mean = tensors[0].clone()
    for t in tensors[1:]:
        mean.add_(t)
    return mean.div_(len(tensors))


def merge(inputs: MergeInputs[CartParams, NoParams]) -> torch.Tensor:
    params = inputs.params
    tensors = list(inputs.tensors)
    mean = _average(tensors)
    if params.lambda_ == 0 or len(tensors) == 1 or not _steps.is_weight_matrix(inputs.tensor_name, mean):
        # full centered task vectors sum to zero: theta_avg + lambda * 0
        return mean
    rows, cols = mean.shape
    rank = min(rows, cols)
    count = kept_rank(rank, params.rank_ratio)
    if count == rank:  # every centered task matrix is kept whole, and they sum to zero
        return mean
    total = torch.zeros_like(mean)
    for i, tensor in enumerate(tensors):
        centered = tensor.sub_(mean)
        _steps.require_finite(centered, f"{inputs.tensor_name}: the centered task vector of model {i + 1}")
        u, s, vh = _steps.top_singular(centered, count)
        total.addmm_(u * s, vh)
        del u, s, vh
    return mean.add_(total, alpha=params.lambda_)


METHOD = Method(
    name="cart",
    title="CART (centered arithmetic with rank-reduced task vectors)",
    paper="https://arxiv.org/abs/2412.12153",
    summary="per matrix: theta_avg + lambda * sum_i SVD_k(theta_i - theta_avg), k = rank_ratio of the rank; no base model",
    params=CartParams,
    model_params=NoParams,
    merge=merge,
    base="unused",
    min_models=1,
)
