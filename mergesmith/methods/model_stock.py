"""Model Stock: move from the base toward the fine-tunes' average by a ratio set by their angle.

The fine-tuned models' task vectors are compared pairwise; the more they agree (the larger the
average cosine between them), the closer the result lies to the average of the fine-tunes, and the
more they disagree, the closer it stays to the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, NoParams, base_of
from mergesmith.parameters import param

__all__ = ["ModelStockParams", "interpolation_ratio", "merge"]

NORM_FLOOR = 1e-6  # the product of two task-vector norms is raised to this before dividing
SINGULAR = 1e-6  # |1 + (k - 1) cos| below this has no finite ratio: the base is kept


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = param(
        False, doc="one ratio per row (vectors along the last dimension) instead of per tensor"
    )


def _as_rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """``x`` as a 2-D view: one row per vector the ratio is computed for."""
    if filter_wise and x.dim() >= 2:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(1, -1)


def interpolation_ratio(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per row of the 2-D task vectors ``deltas``: t = k c / (1 + (k - 1) c).

    ``c`` is the mean over all pairs of models of the cosine between their task vectors (each
    cosine clamped to [-1, 1], norms' product floored at 1e-6), ``k`` the number of models. Where
    the denominator is within 1e-6 of zero, t is 0.
    """
    k = len(deltas)
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(k):
        for j in range(i + 1, k):
            dot = torch.einsum("ij,ij->i", deltas[i], deltas[j])
            cos_sum.add_((dot / (norms[i] * norms[j]).clamp_min(NORM_FLOOR)).clamp_(-1, 1))
            pairs += 1
    cos = cos_sum.div_(pairs)
    denominator = cos * (k - 1) + 1
    singular = denominator.abs() < SINGULAR
    ratio = (cos * k) / torch.where(singular, torch.ones_like(denominator), denominator)
    return ratio.masked_fill_(singular, 0.0)


def merge(inputs: MergeInputs[ModelStockParams, NoParams]) -> torch.Tensor:
    base = base_of(inputs).contiguous()
    if base.numel() == 0:
        return base
    filter_wise = inputs.params.filter_wise
    k = len(inputs.tensors)
    deltas = [_as_rows(d, filter_wise) for d in _steps.task_vectors(base, inputs.tensors)]
    ratio = interpolation_ratio(deltas)
    mean = deltas[0]
    for d in deltas[1:]:
        mean.add_(d)
    # t * mean(theta_i) + (1 - t) * theta_base  ==  theta_base + t * mean(delta_i)
    mean.mul_((ratio / k).unsqueeze(-1))
    rows = _as_rows(base, filter_wise)
    rows.add_(mean)
    return rows.reshape(base.shape)


METHOD = Method(
    name="model_stock",
    title="Model Stock",
    paper="https://arxiv.org/abs/2403.19522",
    summary="t * mean_i theta_i + (1 - t) * theta_base, t = k cos / (1 + (k - 1) cos) from the task vectors' mean cosine",
    params=ModelStockParams,
    model_params=NoParams,
    merge=merge,
    base="required",
    min_models=2,
)
