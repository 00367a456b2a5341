"""DARE: drop task-vector entries at random and rescale the survivors, then combine.

Two presets share this file: ``dare_linear`` sums the sparse task vectors, ``dare_ties`` resolves
their signs as TIES does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["DareModelParams", "DareParams", "merge_linear", "merge_ties"]


@dataclass(frozen=True)
class DareParams:
    normalize: bool = param(False, doc="divide by the (agreeing) summed weights")
    lambda_: float = param(1.0, doc="scale of the merged task vector", key="lambda")
    rescale: bool = param(True, doc="rescale survivors (how: see mode); false keeps them as they are")
    mode: str = param(
        "mergekit",
        doc="mergekit: keep each task vector's L1 norm; paper: divide survivors by density",
        choices=("mergekit", "paper"),
    )
    int8_mask: bool = param(False, doc="accepted for mergekit configs; no effect on the result")


@dataclass(frozen=True)
class DareModelParams:
    weight: float = param(doc="coefficient of this model's task vector")
    density: float = param(1.0, doc="probability of keeping each task-vector entry", lo=0, hi=1, lo_open=True)


def _sparse_deltas(inputs: MergeInputs[DareParams, DareModelParams]) -> list[torch.Tensor]:
    base = base_of(inputs)
    params = inputs.params
    rescale: _steps.RescaleMode = "none"
    if params.rescale:
        rescale = "inverse" if params.mode == "paper" else "l1"
    deltas = _steps.task_vectors(base, inputs.tensors)
    for i, (delta, mp) in enumerate(zip(deltas, inputs.model_params)):
        if mp.density < 1:
            keep = _steps.random_mask(delta.shape, mp.density, inputs.generator(i), delta.device)
            _steps.apply_mask(delta, keep, rescale, mp.density)
            del keep
    return deltas


def merge_linear(inputs: MergeInputs[DareParams, DareModelParams]) -> torch.Tensor:
    return _steps.combine_sparse(inputs, _sparse_deltas(inputs), None)


def merge_ties(inputs: MergeInputs[DareParams, DareModelParams]) -> torch.Tensor:
    return _steps.combine_sparse(inputs, _sparse_deltas(inputs), "sum")


DARE_LINEAR = Method(
    name="dare_linear",
    title="DARE (linear)",
    paper="https://arxiv.org/abs/2311.03099",
    summary="random drop with keep rate density, rescale survivors, weighted sum",
    params=DareParams,
    model_params=DareModelParams,
    merge=merge_linear,
    random=True,
)

DARE_TIES = Method(
    name="dare_ties",
    title="DARE + TIES sign election",
    paper="https://arxiv.org/abs/2311.03099",
    summary="random drop with keep rate density, rescale survivors, TIES sign election",
    params=DareParams,
    model_params=DareModelParams,
    merge=merge_ties,
    random=True,
)
