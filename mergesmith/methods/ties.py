"""TIES: trim each task vector to its largest entries, elect a sign, average the agreeing ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param


@dataclass(frozen=True)
class TiesParams:
    normalize: bool = param(True, doc="divide each entry by the summed weight of agreeing models")
    lambda_: float = param(1.0, doc="scale of the merged task vector", key="lambda")
    rescale: bool = param(False, doc="rescale trimmed task vectors to keep their L1 norm")
    int8_mask: bool = param(False, doc="accepted for mergekit configs; no effect on the result")


@dataclass(frozen=True)
class TiesModelParams:
    weight: float = param(doc="coefficient of this model's task vector")
    density: float = param(
        1.0, doc="fraction of the task vector's entries kept, by magnitude", lo=0, hi=1, lo_open=True
    )


def merge(inputs: MergeInputs[TiesParams, TiesModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    rescale: _steps.RescaleMode = "l1" if inputs.params.rescale else "none"
    deltas = _steps.task_vectors(base, inputs.tensors)
    for delta, mp in zip(deltas, inputs.model_params):
        if mp.density < 1:
            _steps.trim_to_top(delta, mp.density, rescale)
    return _steps.combine(
        base,
        deltas,
        [m.weight for m in inputs.model_params],
        consensus="sum",
        normalize=inputs.params.normalize,
        lambda_=inputs.params.lambda_,
    )


METHOD = Method(
    name="ties",
    title="TIES-Merging",
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim task vectors to top-density magnitudes, elect signs, disjoint mean",
    params=TiesParams,
    model_params=TiesModelParams,
    merge=merge,
)
