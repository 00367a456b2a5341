"""Passthrough: copy one model's tensors unchanged (optionally scaled), for stacking layers with slices."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods._spec import MergeInputs, Method, NoParams
from mergesmith.parameters import param

__all__ = ["PassthroughModelParams", "merge"]


@dataclass(frozen=True)
class PassthroughModelParams:
    scale: float = param(
        1.0, doc="factor applied to the tensor (e.g. 0 to silence a duplicated layer's output)"
    )


def merge(inputs: MergeInputs[NoParams, PassthroughModelParams]) -> torch.Tensor:
    (tensor,) = inputs.tensors
    scale = inputs.model_params[0].scale
    return tensor if scale == 1.0 else tensor.mul_(scale)


METHOD = Method(
    name="passthrough",
    title="Passthrough",
    paper="https://arxiv.org/abs/2312.15166",
    summary="copy one model's tensors as they are; with slices, stack layer ranges of several models",
    params=NoParams,
    model_params=PassthroughModelParams,
    merge=merge,
    base="unused",
    min_models=1,
    max_models=1,
)
