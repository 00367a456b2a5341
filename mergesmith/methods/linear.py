"""Linear: a weighted average of the models' weights (model soups)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.errors import MethodError
from mergesmith.methods._spec import MergeInputs, Method
from mergesmith.parameters import param


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = param(True, doc="divide by the sum of the weights")


@dataclass(frozen=True)
class LinearModelParams:
    weight: float = param(doc="this model's coefficient")


def merge(inputs: MergeInputs[LinearParams, LinearModelParams]) -> torch.Tensor:
    weights = [m.weight for m in inputs.model_params]
    out = torch.zeros_like(inputs.tensors[0])
    for tensor, w in zip(inputs.tensors, weights):
        out.add_(tensor, alpha=w)
    if inputs.params.normalize:
        total = sum(weights)
        if total == 0:
            raise MethodError(
                f"{inputs.tensor_name}: the linear weights sum to 0, so normalize would divide by "
                "zero; change the weights or set normalize: false"
            )
        out.div_(total)
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
)
