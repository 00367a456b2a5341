"""TIES: trim each task vector to its largest entries, elect a sign, average the agreeing ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.errors import MethodError
from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["TiesModelParams", "TiesParams", "merge"]


@dataclass(frozen=True)
class TiesParams:
    normalize: bool = param(True, doc="divide each entry by the summed weight of agreeing models")
    lambda_: float = param(1.0, doc="scale of the merged task vector", key="lambda")
    rescale: bool = param(False, doc="rescale trimmed task vectors to keep their L1 norm")
    int8_mask: bool = param(False, doc="accepted for mergekit configs; no effect on the result")
    mode: str = param(
        "mergekit",
        doc="mergekit: trim each tensor, weight-summed disjoint mean; paper: trim over the whole model, "
        "count-averaged disjoint mean",
        choices=("mergekit", "paper"),
    )


@dataclass(frozen=True)
class TiesModelParams:
    weight: float = param(doc="coefficient of this model's task vector")
    density: float = param(
        1.0, doc="fraction of the task vector's entries kept, by magnitude", lo=0, hi=1, lo_open=True
    )


def merge(inputs: MergeInputs[TiesParams, TiesModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    params = inputs.params
    rescale: _steps.RescaleMode = "l1" if params.rescale else "none"
    deltas = _steps.task_vectors(base, inputs.tensors)
    paper = params.mode == "paper"
    if paper and inputs.thresholds is None:
        raise MethodError(f"{inputs.tensor_name}: ties in paper mode needs the whole-model thresholds")
    for i, (delta, mp) in enumerate(zip(deltas, inputs.model_params)):
        if paper and inputs.thresholds is not None:
            _steps.keep_at_least(delta, inputs.thresholds[i])
        elif mp.density < 1:
            _steps.trim_to_top(delta, mp.density, rescale, reuse=inputs.store(i))
    return _steps.combine(
        base,
        deltas,
        [m.weight for m in inputs.model_params],
        consensus="sum",
        normalize=params.normalize,
        lambda_=params.lambda_,
        divide_by="count" if paper else "weight",
    )


def _whole_model(params: TiesParams) -> bool:
    return params.mode == "paper"


def _check(params: TiesParams, model_params: Sequence[TiesModelParams]) -> str | None:
    if params.mode == "paper" and params.rescale:
        return "ties mode: paper keeps the trimmed entries as they are; remove rescale: true or use mode: mergekit"
    return None


METHOD = Method(
    name="ties",
    title="TIES-Merging",
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim task vectors to top-density magnitudes, elect signs, disjoint mean",
    params=TiesParams,
    model_params=TiesModelParams,
    merge=merge,
    whole_model_trim=_whole_model,
    check=_check,
)
