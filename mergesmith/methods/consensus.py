"""Consensus merging: keep only the entries of a multi-task vector that several tasks rely on.

Per tensor, each model's TALL mask marks the entries where its task vector is larger than its
distance to the multi-task vector (times the model's ``tall_lambda``): the entries the merge would
get wrong for that task without them. The consensus mask keeps the entries that at least
``min_agreement`` models mark; the others (used by one task alone, or by none) are dropped from the
multi-task vector before it is added, scaled by ``lambda``, to the base. ``consensus_ta`` builds the
multi-task vector by task arithmetic, ``consensus_ties`` by TIES; the TALL masks of each are taken
against its own multi-task vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mergesmith.errors import MethodError
from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = [
    "ConsensusTaModelParams",
    "ConsensusTaParams",
    "ConsensusTiesModelParams",
    "ConsensusTiesParams",
    "consensus_mask",
    "merge_ta",
    "merge_ties",
    "tall_mask",
]

DEFAULT_TALL_LAMBDA = 0.4  # the middle of the paper's search grid 0.2, 0.3, ..., 0.6

_AGREEMENT_DOC = "how many models' TALL masks must mark an entry for it to be kept (0 keeps every entry)"
_TALL_LAMBDA_DOC = (
    "TALL mask threshold: marks entries with |task vector| >= tall_lambda * |multi-task - task vector|"
)


@dataclass(frozen=True)
class ConsensusTaParams:
    min_agreement: int = param(2, doc=_AGREEMENT_DOC, lo=0)
    normalize: bool = param(False, doc="divide the summed task vector by the sum of the weights")
    lambda_: float = param(1.0, doc="scale of the masked multi-task vector", key="lambda")


@dataclass(frozen=True)
class ConsensusTaModelParams:
    weight: float = param(1.0, doc="coefficient of this model's task vector in the multi-task vector")
    tall_lambda: float = param(DEFAULT_TALL_LAMBDA, doc=_TALL_LAMBDA_DOC, lo=0)


@dataclass(frozen=True)
class ConsensusTiesParams:
    min_agreement: int = param(2, doc=_AGREEMENT_DOC, lo=0)
    normalize: bool = param(
        False, doc="divide each entry by the summed weight of agreeing models (false: their sum)"
    )
    lambda_: float = param(1.0, doc="scale of the masked multi-task vector", key="lambda")
    rescale: bool = param(False, doc="rescale trimmed task vectors to keep their L1 norm")
    mode: str = param(
        "mergekit",
        doc="mergekit: trim each tensor, as ties does by default; paper: trim over the whole model, "
        "count-averaged disjoint mean, as the authors' code",
        choices=("mergekit", "paper"),
    )


@dataclass(frozen=True)
class ConsensusTiesModelParams:
    weight: float = param(1.0, doc="coefficient of this model's task vector in the multi-task vector")
    density: float = param(
        0.2, doc="fraction of the task vector's entries kept, by magnitude", lo=0, hi=1, lo_open=True
    )
    tall_lambda: float = param(DEFAULT_TALL_LAMBDA, doc=_TALL_LAMBDA_DOC, lo=0)


def tall_mask(delta: torch.Tensor, merged: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """Where ``|delta| >= tall_lambda * |merged - delta|``: the TALL mask of one task vector against
    the multi-task vector ``merged`` (boolean, shaped like ``delta``)."""
    return delta.abs() >= (merged - delta).abs_().mul_(tall_lambda)


def consensus_mask(
    deltas: Sequence[torch.Tensor], merged: torch.Tensor, tall_lambdas: Sequence[float], min_agreement: int
) -> torch.Tensor:
    """Where at least ``min_agreement`` of the task vectors' TALL masks (see :func:`tall_mask`) are
    set."""
    count = torch.zeros(merged.shape, dtype=torch.int32, device=merged.device)
    for delta, lam in zip(deltas, tall_lambdas):
        count.add_(tall_mask(delta, merged, lam))
    return count >= min_agreement


class _Shared(Protocol):
    @property
    def min_agreement(self) -> int: ...
    @property
    def lambda_(self) -> float: ...


class _PerModel(Protocol):
    @property
    def tall_lambda(self) -> float: ...


def _add_consensus(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    merged: torch.Tensor,
    params: _Shared,
    model_params: Sequence[_PerModel],
) -> torch.Tensor:
    """base + lambda * (consensus mask ⊙ merged), in place in ``base``."""
    keep = consensus_mask(deltas, merged, [m.tall_lambda for m in model_params], params.min_agreement)
    deltas.clear()
    # a product, not a selection: a NaN of the multi-task vector stays, so the merge reports it
    return base.add_(merged.mul_(keep), alpha=params.lambda_)


def merge_ta(inputs: MergeInputs[ConsensusTaParams, ConsensusTaModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    params = inputs.params
    deltas = _steps.task_vectors(base, inputs.tensors)
    merged = _steps.combine(
        torch.zeros_like(base),
        [d.clone() for d in deltas],
        [m.weight for m in inputs.model_params],
        consensus=None,
        normalize=params.normalize,
        lambda_=1.0,
    )
    return _add_consensus(base, deltas, merged, params, inputs.model_params)


def merge_ties(inputs: MergeInputs[ConsensusTiesParams, ConsensusTiesModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    params = inputs.params
    rescale: _steps.RescaleMode = "l1" if params.rescale else "none"
    paper = params.mode == "paper"
    if paper and inputs.thresholds is None:
        raise MethodError(
            f"{inputs.tensor_name}: consensus_ties in paper mode needs the whole-model thresholds"
        )
    deltas = _steps.task_vectors(base, inputs.tensors)
    trimmed = []
    for i, (delta, mp) in enumerate(zip(deltas, inputs.model_params)):
        copy = delta.clone()
        if paper and inputs.thresholds is not None:
            _steps.keep_at_least(copy, inputs.thresholds[i])
        elif mp.density < 1:
            _steps.trim_to_top(copy, mp.density, rescale, reuse=inputs.store(i))
        trimmed.append(copy)
    merged = _steps.combine(
        torch.zeros_like(base),
        trimmed,
        [m.weight for m in inputs.model_params],
        consensus="sum",
        normalize=params.normalize,
        lambda_=1.0,
        divide_by="count" if paper else "weight",
    )
    return _add_consensus(base, deltas, merged, params, inputs.model_params)


def _check_agreement(name: str, params: _Shared, model_params: Sequence[object]) -> str | None:
    k, count = params.min_agreement, len(model_params)
    if k > count:
        models = f"{count} model{'s' if count != 1 else ''}"
        return (
            f"{name}: min_agreement: {k} keeps the entries that at least {k} models mark as "
            f"important, but this tensor is merged from {models} besides the base, so nothing "
            f"would be kept; set min_agreement to at most {count}, or merge more models"
        )
    return None


def _check_ta(params: ConsensusTaParams, model_params: Sequence[ConsensusTaModelParams]) -> str | None:
    return _check_agreement("consensus_ta", params, model_params)


def _check_ties(params: ConsensusTiesParams, model_params: Sequence[ConsensusTiesModelParams]) -> str | None:
    if params.mode == "paper" and params.rescale:
        return (
            "consensus_ties mode: paper keeps the trimmed entries as they are; "
            "remove rescale: true or use mode: mergekit"
        )
    return _check_agreement("consensus_ties", params, model_params)


def _whole_model(params: ConsensusTiesParams) -> bool:
    return params.mode == "paper"


_TITLE = "Consensus merging ({}, with TALL masks)"
_PAPER = "https://arxiv.org/abs/2405.07813"

CONSENSUS_TA = Method(
    name="consensus_ta",
    title=_TITLE.format("task arithmetic"),
    paper=_PAPER,
    summary="task arithmetic keeping only the entries that min_agreement models' TALL masks mark",
    params=ConsensusTaParams,
    model_params=ConsensusTaModelParams,
    merge=merge_ta,
    check=_check_ta,
)

CONSENSUS_TIES = Method(
    name="consensus_ties",
    title=_TITLE.format("TIES"),
    paper=_PAPER,
    summary="TIES merge keeping only the entries that min_agreement models' TALL masks mark",
    params=ConsensusTiesParams,
    model_params=ConsensusTiesModelParams,
    merge=merge_ties,
    check=_check_ties,
    whole_model_trim=_whole_model,
)
