"""Multi-SLERP: spherical interpolation of any number of models by weights.

Each tensor (or task vector, with a base) is split into a direction on the unit sphere and a norm.
The directions are averaged with the weights and projected back onto the sphere, and the result is
scaled to the weighted average of the norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.errors import MethodError
from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method
from mergesmith.parameters import param

__all__ = ["MultiSlerpModelParams", "MultiSlerpParams", "check", "merge"]


@dataclass(frozen=True)
class MultiSlerpParams:
    normalize_weights: bool = param(True, doc="divide the weights by their sum")
    eps: float = param(
        1e-8,
        doc="added to each norm before dividing by it; directions averaging below it fall back",
        lo=0,
        lo_open=True,
    )


@dataclass(frozen=True)
class MultiSlerpModelParams:
    weight: float = param(doc="this model's share of the interpolation")


def check(params: MultiSlerpParams, model_params: Sequence[MultiSlerpModelParams]) -> str | None:
    """Refuse, at plan time, weights that normalize_weights would divide by zero."""
    if params.normalize_weights and len(model_params) > 1 and sum(m.weight for m in model_params) == 0:
        return (
            "the multislerp weights sum to 0 here and normalize_weights is true, which divides by zero; "
            "change the weights or set normalize_weights: false"
        )
    return None


def merge(inputs: MergeInputs[MultiSlerpParams, MultiSlerpModelParams]) -> torch.Tensor:
    params = inputs.params
    if len(inputs.tensors) == 1:
        return inputs.tensors[0]
    trouble = check(params, inputs.model_params)
    if trouble:
        raise MethodError(f"{inputs.tensor_name}: {trouble}")
    weights = [m.weight for m in inputs.model_params]
    if params.normalize_weights:
        total = sum(weights)
        weights = [w / total for w in weights]
    eps = params.eps
    base = inputs.base
    vectors = _steps.task_vectors(base, inputs.tensors) if base is not None else list(inputs.tensors)
    flat = [v.reshape(-1) for v in vectors]
    norms = [float(torch.linalg.vector_norm(v)) for v in flat]

    # weighted mean of the directions v_i / (|v_i| + eps)
    mean = torch.zeros_like(flat[0])
    for v, w, n in zip(flat, weights, norms):
        mean.add_(v, alpha=w / (n + eps))
    mean_norm = float(torch.linalg.vector_norm(mean))

    if mean_norm < eps:
        if len(flat) != 2 and any(n != 0 for n in norms):
            raise MethodError(
                f"{inputs.tensor_name}: the weighted mean of the {len(flat)} models' directions is zero "
                "(opposite directions whose weights cancel), so multislerp has no direction to take; "
                "change the weights"
            )
        # two opposite directions, or nothing to interpolate: the weighted sum
        out = flat[0].mul_(weights[0])
        for v, w in zip(flat[1:], weights[1:]):
            out.add_(v, alpha=w)
        out = out.view(vectors[0].shape)
        return out if base is None else base.add_(out)

    # The weighted tangent vectors at the normalized mean sum to zero, so the exponential map
    # returns the normalized mean itself, scaled by cos(eps).
    scale = math.cos(eps) * sum(w * n for w, n in zip(weights, norms)) / mean_norm
    out = mean.mul_(scale).view(vectors[0].shape)
    return out if base is None else base.add_(out)


METHOD = Method(
    name="multislerp",
    title="Multi-SLERP",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    summary="weighted spherical mean of the models' directions (of task vectors with a base), scaled to the weighted mean norm",
    params=MultiSlerpParams,
    model_params=MultiSlerpModelParams,
    merge=merge,
    base="optional",
    min_models=1,
    check=check,
)
