"""Arcee Fusion: take the other model's value only where its change stands out from the rest.

Each entry's importance is its change ``|other - base|`` times the KL divergence between the
softmax of its row in the other model and in the base. Entries whose importance reaches
``median + 1.5 * IQR`` of the tensor's importances take the other model's value; all others keep
the base's.
"""

from __future__ import annotations

import numpy as np
import torch

from mergesmith.methods._spec import MergeInputs, Method, NoParams, base_of

__all__ = ["importance", "merge", "order_statistics", "threshold"]

SOFTMAX_FLOOR = 1e-8  # added to both softmaxes before taking the KL divergence


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|other - base| times, per row (last dimension), KL(softmax(other) || softmax(base))."""
    p = torch.softmax(other, dim=-1).add_(SOFTMAX_FLOOR)
    q = torch.softmax(base, dim=-1).add_(SOFTMAX_FLOOR)
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return torch.sub(other, base).abs_().mul_(kl)


def order_statistics(values: torch.Tensor) -> list[torch.Tensor]:
    """The entries at 0-based positions ``floor(q * (n - 1))`` of the sorted values, for the
    quartiles ``q`` = 1/4, 1/2, 3/4, as 0-dim tensors of the values' dtype."""
    flat = values.reshape(-1)
    n = flat.numel()
    # floor(q * (n - 1)) for q = 1/4, 1/2, 3/4, in exact integer arithmetic
    pos = [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]
    # exact selection without a full sort; numpy's needs one copy of the values, where
    # torch.kthvalue would also allocate an int64 index per entry
    picked = np.partition(flat.detach().cpu().numpy(), pos)[pos]
    return [torch.tensor(v, dtype=values.dtype, device=values.device) for v in picked]


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (q3 - q1) of the scores (a 0-dim tensor)."""
    q1, median, q3 = order_statistics(scores)
    return median + 1.5 * (q3 - q1)


def merge(inputs: MergeInputs[NoParams, NoParams]) -> torch.Tensor:
    base = base_of(inputs)
    other = inputs.tensors[0]
    if base.numel() == 0:
        return base
    scores = importance(base, other)
    keep = scores >= threshold(scores)
    del scores
    delta = other.sub_(base).mul_(keep)
    return base.add_(delta)


METHOD = Method(
    name="arcee_fusion",
    title="Arcee Fusion",
    paper="https://arcee.ai",
    summary="take the other model's entries whose change times its row's KL divergence reaches median + 1.5 IQR",
    params=NoParams,
    model_params=NoParams,
    merge=merge,
    base="required",
    min_models=1,
    max_models=1,
)
