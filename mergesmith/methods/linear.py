"""Linear: a weighted average of the models' weights (model soups)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.errors import MethodError
from mergesmith.methods._spec import MergeInputs, Method
from mergesmith.parameters import param

__all__ = ["LinearModelParams", "LinearParams", "check", "merge"]


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = param(True, doc="divide by the sum of the weights")


@dataclass(frozen=True)
class LinearModelParams:
    weight: float = param(doc="this model's coefficient")


def check(params: LinearParams, model_params: Sequence[LinearModelParams]) -> str | None:
    """Refuse, at plan time, weights that normalize would divide by zero."""
    if params.normalize and sum(m.weight for m in model_params) == 0:
        return "the linear weights sum to 0 here and normalize is true, which divides by zero; change the weights or set normalize: false"
    return None


def merge(inputs: MergeInputs[LinearParams, LinearModelParams]) -> torch.Tensor:
    weights = [m.weight for m in inputs.model_params]
    out = inputs.tensors[0].mul_(weights[0])
    for tensor, w in zip(inputs.tensors[1:], weights[1:]):
        out.add_(tensor, alpha=w)
    if inputs.params.normalize:
        trouble = check(inputs.params, inputs.model_params)
        if trouble:
            raise MethodError(f"{inputs.tensor_name}: {trouble}")
        out.div_(sum(weights))
    return out


METHOD = Method(
    name="linear",
    title="Linear (model soups)",
    paper="https://arxiv.org/abs/2203.05482",
    summary="weighted average sum_i w_i theta_i, divided by sum_i w_i when normalize",
    params=LinearParams,
    model_params=LinearModelParams,
    merge=merge,
    base="unused",
    min_models=1,
    check=check,
)
