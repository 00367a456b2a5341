"""SCE (FuseChat): select high-variance entries, calculate per-model weights, erase minority signs.

Per tensor: optionally keep only the entries where the task vectors vary most across models; weigh
each model by its task vector's mean squared entry (normalized over the models); then, entry by
entry, average with those weights only the task vectors whose sign agrees with the sign of their
sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, NoParams, base_of
from mergesmith.parameters import param

__all__ = ["SceParams", "energy_weights", "merge", "variance_mask"]

WEIGHT_SUM_FLOOR = 1e-6  # below this summed energy the models are weighed equally
DIVISOR_FLOOR = 1e-6  # the per-entry sum of agreeing weights is raised to at least this
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SceParams:
    select_topk: float = param(
        1.0,
        doc="fraction of the entries with non-zero variance across models kept, highest variance first",
        lo=0,
        hi=1,
        lo_open=True,
    )
    int8_mask: bool = param(False, doc="accepted for mergekit configs; no effect on the result")


def variance_mask(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Where the task vectors' population variance across models is among the highest.

    ``k = floor(fraction * m)`` entries are selected, ``m`` the number of entries whose variance is
    not zero (the product is taken in float32); equal variances are taken in index order.
    """
    flat = [d.reshape(-1) for d in deltas]
    var = torch.empty_like(flat[0])
    for start in range(0, var.numel(), _CHUNK):
        stack = torch.stack([d[start : start + _CHUNK] for d in flat])
        var[start : start + _CHUNK] = torch.var(stack, dim=0, unbiased=False)
        del stack
    nonzero = int(torch.count_nonzero(var))
    k = int(np.float32(nonzero) * np.float32(fraction))
    return _steps.top_k_mask(var, k).reshape(deltas[0].shape)


def energy_weights(deltas: list[torch.Tensor]) -> list[float]:
    """Each model's mean squared task-vector entry over the summed means (equal weights when that
    sum is below ``WEIGHT_SUM_FLOOR``)."""
    energy = torch.stack([d.square().mean() for d in deltas])
    total = float(energy.sum())
    if abs(total) < WEIGHT_SUM_FLOOR:
        return [float(w) for w in torch.full_like(energy, 1.0) / len(deltas)]
    return [float(w) for w in energy / total]


def merge(inputs: MergeInputs[SceParams, NoParams]) -> torch.Tensor:
    base = base_of(inputs)
    deltas = _steps.task_vectors(base, inputs.tensors)
    if inputs.params.select_topk < 1:
        keep = variance_mask(deltas, inputs.params.select_topk)
        for d in deltas:
            d.mul_(keep)
        del keep
    weights = energy_weights(deltas)
    flat_base = base.reshape(-1)
    flat = [d.reshape(-1) for d in deltas]
    for start in range(0, flat_base.numel(), _CHUNK):
        part = [d[start : start + _CHUNK] for d in flat]
        sign = _steps.elect_sign(part, "sum")  # sign of the unweighted sum, ties to +
        mixed = torch.zeros_like(part[0])
        divisor = torch.zeros_like(part[0])
        for d, w in zip(part, weights):
            agreeing = (d * sign > 0).to(d.dtype).mul_(w)  # w where d has the elected sign, else 0
            mixed.add_(d.mul_(agreeing))
            divisor.add_(agreeing)
        flat_base[start : start + _CHUNK].add_(mixed.div_(divisor.clamp_min_(DIVISOR_FLOOR)))
    deltas.clear()
    return base


METHOD = Method(
    name="sce",
    title="SCE (select, calculate, erase)",
    paper="https://arxiv.org/abs/2408.07990",
    summary="keep top-variance entries, weigh models by mean squared task vector, erase minority signs",
    params=SceParams,
    model_params=NoParams,
    merge=merge,
)
