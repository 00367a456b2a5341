"""DELLA: drop task-vector entries at random, larger magnitudes kept more often, then combine.

Each entry's keep probability grows linearly with its magnitude rank within its row, spread
over ``[density - epsilon, density + epsilon]``. Two presets share this file: ``della`` resolves
signs as TIES does, ``della_linear`` sums the sparse task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from mergesmith.errors import MethodError
from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = [
    "DellaLinearParams",
    "DellaModelParams",
    "DellaParams",
    "check",
    "keep_probabilities",
    "merge_linear",
    "merge_ties",
]


@dataclass(frozen=True)
class DellaParams:
    normalize: bool = param(True, doc="divide by the (agreeing) summed weights")
    lambda_: float = param(1.0, doc="scale of the merged task vector", key="lambda")
    rescale: bool = param(True, doc="rescale survivors (how: see mode); false keeps them as they are")
    mode: str = param(
        "mergekit",
        doc="mergekit: keep each task vector's L1 norm; paper: divide each survivor by its keep probability",
        choices=("mergekit", "paper"),
    )
    int8_mask: bool = param(False, doc="accepted for mergekit configs; no effect on the result")


@dataclass(frozen=True)
class DellaLinearParams(DellaParams):
    normalize: bool = param(False, doc="divide by the summed weights")


@dataclass(frozen=True)
class DellaModelParams:
    weight: float = param(doc="coefficient of this model's task vector")
    density: float = param(
        1.0, doc="mean probability of keeping each task-vector entry", lo=0, hi=1, lo_open=True
    )
    epsilon: float = param(
        0.15, doc="half-width of the keep probabilities' spread around density, by magnitude rank", lo=0
    )


def check(params: DellaParams, model_params: Sequence[DellaModelParams]) -> str | None:
    """Refuse, at plan time, keep probabilities that would leave (0, 1)."""
    for i, mp in enumerate(model_params):
        if mp.density < 1 and not (mp.density - mp.epsilon > 0 and mp.density + mp.epsilon < 1):
            limit = min(mp.density, 1 - mp.density)
            return (
                f"model {i + 1} (counting the models other than the base in config order) has density "
                f"{mp.density:g} and epsilon {mp.epsilon:g}, so its keep probabilities would span "
                f"[{mp.density - mp.epsilon:g}, {mp.density + mp.epsilon:g}]; density - epsilon and "
                f"density + epsilon must lie strictly between 0 and 1: set epsilon below {limit:g} "
                "or move density"
            )
    return None


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's keep probability (float32, shaped like ``delta``).

    Entries are ranked by magnitude within each row, ``r = 0`` the smallest of ``c`` entries
    (equal magnitudes in column order), and get ``density - epsilon + 2 * epsilon * r / (c - 1)``;
    a row of one entry gets ``density``. Rows run along dimension 1 (a 1-D tensor is one row).
    """
    moved = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    cols = moved.shape[-1]
    rows = moved.reshape(-1, cols)
    probs = torch.empty(rows.shape, dtype=torch.float32, device=delta.device)
    if cols == 1:
        probs.fill_(density)
    else:
        for block in _steps.row_blocks(rows.shape[0], cols):
            ranks = _steps.row_ranks(rows[block]).to(torch.float32)
            # the rank scaled into [0, 1], then spread over [density - epsilon, density + epsilon]
            probs[block] = ranks.div_(cols - 1).mul_(2).mul_(epsilon).add_(density - epsilon)
    if delta.dim() < 2:
        return probs.reshape(delta.shape)
    return probs.reshape(moved.shape).movedim(-1, 1).contiguous()


PT = TypeVar("PT", bound=DellaParams)


def _sparse_deltas(inputs: MergeInputs[PT, DellaModelParams]) -> list[torch.Tensor]:
    params = inputs.params
    trouble = check(params, inputs.model_params)
    if trouble:
        raise MethodError(f"{inputs.tensor_name}: {trouble}")
    deltas = _steps.task_vectors(base_of(inputs), inputs.tensors)
    for i, (delta, mp) in enumerate(zip(deltas, inputs.model_params)):
        if mp.density >= 1:
            continue
        probs = keep_probabilities(delta, mp.density, mp.epsilon)
        keep = _steps.random_mask_like(probs, inputs.generator(i))
        if params.rescale and params.mode == "paper":
            delta.mul_(keep).div_(probs.masked_fill_(~keep, 1))  # dropped entries stay 0
        else:
            _steps.apply_mask(delta, keep, "l1" if params.rescale else "none", mp.density)
        del probs, keep
    return deltas


def merge_ties(inputs: MergeInputs[DellaParams, DellaModelParams]) -> torch.Tensor:
    return _steps.combine_sparse(inputs, _sparse_deltas(inputs), "sum")


def merge_linear(inputs: MergeInputs[DellaLinearParams, DellaModelParams]) -> torch.Tensor:
    return _steps.combine_sparse(inputs, _sparse_deltas(inputs), None)


DELLA = Method(
    name="della",
    title="DELLA-Merging",
    paper="https://arxiv.org/abs/2406.11617",
    summary="random drop with keep probability rising with magnitude rank, rescale, TIES sign election",
    params=DellaParams,
    model_params=DellaModelParams,
    merge=merge_ties,
    random=True,
    check=check,
)

DELLA_LINEAR = Method(
    name="della_linear",
    title="DELLA (linear)",
    paper="https://arxiv.org/abs/2406.11617",
    summary="random drop with keep probability rising with magnitude rank, rescale, weighted sum",
    params=DellaLinearParams,
    model_params=DellaModelParams,
    merge=merge_linear,
    random=True,
    check=check,
)
