"""Karcher mean: the Riemannian (intrinsic) mean of the models' directions on the unit sphere.

Each tensor is split into a direction and a norm. The directions' Karcher mean, the point of the
sphere that minimizes the sum of squared arc lengths to them, is found by a few steps of Riemannian
gradient descent from their normalized Euclidean mean; it is scaled to the mean of the norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.methods._spec import MergeInputs, Method, NoParams
from mergesmith.parameters import param

__all__ = ["KarcherParams", "karcher_mean", "merge"]


@dataclass(frozen=True)
class KarcherParams:
    max_iter: int = param(10, doc="most gradient steps on the sphere", lo=0)
    tol: float = param(1e-5, doc="stop when the step is shorter; norms up to it count as zero tensors", lo=0)


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equally weighted Karcher mean direction of ``tensors``, times their mean norm.

    Works in place in the given tensors (they become unit vectors) and returns a new tensor.
    Tensors with norm <= ``tol`` take no part in the direction but still count, with their norm,
    in the mean norm; when every tensor is that small the result is zero.
    """
    alpha = 1.0 / len(tensors)
    norms = [_norm(x) for x in tensors]
    units = [x.reshape(-1) for x in tensors]
    for u, n in zip(units, norms):
        if n != 0:
            u.div_(n)
    scale = sum(alpha * n for n in norms)
    valid = [u for u, n in zip(units, norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    share = 1.0 / len(valid)

    mean = torch.zeros_like(valid[0])
    for u in valid:
        mean.add_(u, alpha=share)
    length = _norm(mean)
    if length < tol:  # the directions cancel out: start from the first one
        mean.copy_(valid[0])
    else:
        mean.div_(length)

    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        # gradient: the mean of the log maps, theta / sin(theta) * (u - cos(theta) * mean)
        tangent.zero_()
        along_mean = 0.0  # the -cos(theta) mean parts, summed and added once
        for u in valid:
            cos = min(1.0, max(-1.0, float(torch.dot(mean, u))))
            theta = math.acos(cos)
            sin = math.sin(theta)
            if theta < tol or sin == 0:
                continue
            coef = share * theta / sin
            tangent.add_(u, alpha=coef)
            along_mean -= coef * cos
        tangent.add_(mean, alpha=along_mean)
        step = _norm(tangent)
        if step < tol:
            break
        # exponential map: walk a great-circle arc of length |tangent| along it
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        length = _norm(mean)
        if length > tol:
            mean.div_(length)
    return mean.mul_(scale).view(tensors[0].shape)


def merge(inputs: MergeInputs[KarcherParams, NoParams]) -> torch.Tensor:
    tensors = [*inputs.tensors, *([inputs.base] if inputs.base is not None else [])]
    if len(tensors) == 1:
        return tensors[0]
    tensors = [x.contiguous() for x in tensors]
    return karcher_mean(tensors, inputs.params.max_iter, inputs.params.tol)


METHOD = Method(
    name="karcher",
    title="Karcher mean",
    paper="https://en.wikipedia.org/wiki/Karcher_mean",
    summary="Riemannian mean of the models' directions on the unit sphere, scaled to their mean norm",
    params=KarcherParams,
    model_params=NoParams,
    merge=merge,
    base="optional",
    min_models=1,
)
