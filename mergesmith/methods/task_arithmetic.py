"""Task arithmetic: add weighted task vectors to the base (negative weights subtract a skill)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["TaskArithmeticModelParams", "TaskArithmeticParams", "merge"]


@dataclass(frozen=True)
class TaskArithmeticParams:
    normalize: bool = param(False, doc="divide the summed task vector by the sum of the weights")
    lambda_: float = param(1.0, doc="scale of the merged task vector", key="lambda")
    rescale: bool = param(False, doc="accepted for mergekit configs; no effect without dropping")
    int8_mask: bool = param(False, doc="accepted for mergekit configs; no effect on the result")


@dataclass(frozen=True)
class TaskArithmeticModelParams:
    weight: float = param(doc="coefficient of this model's task vector (negative to forget)")


def merge(inputs: MergeInputs[TaskArithmeticParams, TaskArithmeticModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    deltas = _steps.task_vectors(base, inputs.tensors)
    return _steps.combine(
        base,
        deltas,
        [m.weight for m in inputs.model_params],
        consensus=None,
        normalize=inputs.params.normalize,
        lambda_=inputs.params.lambda_,
    )


METHOD = Method(
    name="task_arithmetic",
    title="Task arithmetic",
    paper="https://arxiv.org/abs/2212.04089",
    summary="theta_base + lambda * sum_i w_i (theta_i - theta_base)",
    params=TaskArithmeticParams,
    model_params=TaskArithmeticModelParams,
    merge=merge,
)
