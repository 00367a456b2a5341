"""RAM (Reinforced Agent Merging): average task-vector entries only over the models that changed them.

Per entry, a model contributes when its task-vector entry exceeds ``epsilon`` in magnitude. An
entry changed by one model alone keeps that model's change in full; one changed by several gets
their mean. ``ramplus_tl`` also scales each model's unique entries by ``1 + r * min(alpha, rho)``,
``rho`` being the ratio of that model's shared to unique entries in the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, NoParams, base_of
from mergesmith.parameters import param

__all__ = ["RamParams", "RamPlusParams", "contributions", "merge_ram", "merge_ramplus_tl", "unique_boosts"]


@dataclass(frozen=True)
class RamParams:
    epsilon: float = param(
        1e-5, doc="a model changes an entry when its task-vector entry exceeds this in magnitude", lo=0
    )


@dataclass(frozen=True)
class RamPlusParams:
    r: float = param(0.1, doc="gain of the boost to each model's unique entries")
    alpha: float = param(0.2, doc="cap on the shared-to-unique ratio rho", lo=0)
    epsilon: float = param(
        1e-5,
        doc="a model changes an entry when its task-vector entry exceeds this in magnitude; "
        "also the floor of the unique count that divides rho",
        lo=0,
        lo_open=True,
    )


def contributions(deltas: Sequence[torch.Tensor], epsilon: float) -> torch.Tensor:
    """Zero, in place, each task vector's entries with ``|x| <= epsilon``; return per entry how
    many models contribute (int32)."""
    count = torch.zeros(deltas[0].shape, dtype=torch.int32, device=deltas[0].device)
    for delta in deltas:
        changed = delta.abs() > epsilon
        delta.mul_(changed)
        count.add_(changed)
    return count


def unique_boosts(
    deltas: Sequence[torch.Tensor], count: torch.Tensor, r: float, alpha: float, epsilon: float
) -> list[float]:
    """Per model, ``1 + r * clamp(shared / max(unique, epsilon), 0, alpha)`` in float32, with
    ``shared`` and ``unique`` the numbers of its contributing entries that other models also
    change, and that it alone changes."""
    overlap = count > 1
    alone = count == 1
    boosts = []
    for delta in deltas:
        changed = delta != 0
        shared = torch.count_nonzero(changed & overlap)
        unique = torch.count_nonzero(changed & alone)
        rho = shared.to(torch.float32) / unique.to(torch.float32).clamp(min=epsilon)
        boosts.append(float(1 + r * rho.clamp(min=0, max=alpha)))
    return boosts


def _combine(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], count: torch.Tensor, boosts: Sequence[float]
) -> torch.Tensor:
    """base + Σ_i (d_i / count where count > 1, else d_i · boost_i)."""
    overlap = count > 1
    denom = count.clamp(min=1).to(base.dtype)
    total: torch.Tensor | None = None
    for delta, boost in zip(deltas, boosts):
        term = torch.where(overlap, delta / denom, delta * boost if boost != 1 else delta)
        total = term if total is None else total.add_(term)
    return base if total is None else base.add_(total)


def merge_ram(inputs: MergeInputs[RamParams, NoParams]) -> torch.Tensor:
    base = base_of(inputs)
    deltas = _steps.task_vectors(base, inputs.tensors)
    if not deltas:
        return base
    count = contributions(deltas, inputs.params.epsilon)
    return _combine(base, deltas, count, [1.0] * len(deltas))


def merge_ramplus_tl(inputs: MergeInputs[RamPlusParams, NoParams]) -> torch.Tensor:
    base = base_of(inputs)
    p = inputs.params
    deltas = _steps.task_vectors(base, inputs.tensors)
    if not deltas:
        return base
    count = contributions(deltas, p.epsilon)
    boosts = unique_boosts(deltas, count, p.r, p.alpha, p.epsilon)
    return _combine(base, deltas, count, boosts)


RAM = Method(
    name="ram",
    title="Reinforced Agent Merging",
    paper="https://arxiv.org/abs/2601.13572",
    summary="per entry, the mean task vector over the models that change it (magnitude above epsilon)",
    params=RamParams,
    model_params=NoParams,
    merge=merge_ram,
)

RAMPLUS_TL = Method(
    name="ramplus_tl",
    title="Reinforced Agent Merging Plus (tensor-local)",
    paper="https://arxiv.org/abs/2601.13572",
    summary="ram, with each model's unique entries scaled by 1 + r * min(alpha, shared/unique)",
    params=RamPlusParams,
    model_params=NoParams,
    merge=merge_ramplus_tl,
)
