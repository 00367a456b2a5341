"""NearSwap: take the other model's value where it lies within t of the base, else step t toward it.

Entry by entry, the base is interpolated toward the secondary model with weight
``min(1, t / |base - secondary|)``: entries that differ by at most ``t`` take the secondary's value,
entries that differ more move from the base by exactly ``t`` toward it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods._spec import MergeInputs, Method, NoParams, base_of
from mergesmith.parameters import param

__all__ = ["NearSwapParams", "merge", "weight"]

DIFF_FLOOR = 1e-6  # |base - secondary| is raised to this before dividing t by it


@dataclass(frozen=True)
class NearSwapParams:
    t: float = param(doc="distance within which an entry takes the secondary model's value", lo=0)


def weight(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Per entry: clamp(t / max(|base - other|, 1e-6), 0, 1)."""
    w = torch.sub(other, base).abs_().clamp_min_(DIFF_FLOOR)
    return w.reciprocal_().mul_(t).clamp_(0, 1)


def merge(inputs: MergeInputs[NearSwapParams, NoParams]) -> torch.Tensor:
    base = base_of(inputs)
    other = inputs.tensors[0]
    return base.lerp_(other, weight(base, other, inputs.params.t))


METHOD = Method(
    name="nearswap",
    title="NearSwap",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    summary="per entry, lerp from the base to the other model with weight min(1, t / abs(base - other))",
    params=NearSwapParams,
    model_params=NoParams,
    merge=merge,
    base="required",
    min_models=1,
    max_models=1,
)
