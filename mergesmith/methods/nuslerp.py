"""NuSLERP: spherical interpolation of two models (or of their task vectors) set by weights.

Unlike ``slerp``, the position comes from one weight per model, the interpolation can run over the
whole tensor or separately over each row or column, and with a base model the two task vectors are
interpolated and added back to the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method
from mergesmith.parameters import param

__all__ = ["NuSlerpModelParams", "NuSlerpParams", "merge", "nuslerp", "position"]

NORM_FLOOR = 1e-7  # norms are raised to this before dividing by them
COLINEAR_EPS = 1e-8  # directions with 1 - cos^2 <= COLINEAR_EPS^2 are interpolated linearly
ZERO_TOTAL = 1e-6  # weights summing to less than this in magnitude give t = 0.5


@dataclass(frozen=True)
class NuSlerpParams:
    nuslerp_row_wise: bool = param(
        False,
        doc="with nuslerp_flatten false: vectors along the first dimension (per column), not the last (per row)",
    )
    nuslerp_flatten: bool = param(True, doc="interpolate each tensor as one flattened vector")


@dataclass(frozen=True)
class NuSlerpModelParams:
    weight: float = param(doc="this model's share; t = second weight / sum of the two weights")


def position(weights: Sequence[float]) -> float:
    """t = w_1 / (w_0 + w_1), or 0.5 when the weights sum to (nearly) zero."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < ZERO_TOTAL else weights[1] / total


def _layout(x: torch.Tensor, flatten: bool, row_wise: bool) -> tuple[torch.Tensor, int]:
    """A view of contiguous ``x`` and the dimension along which its vectors run."""
    if flatten or x.dim() == 0:
        return x.view(1, -1), -1
    return x, 0 if row_wise else -1


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), in place in ``v0``.

    The angle is measured per vector: the whole flattened tensor with ``flatten``, else each vector
    along the first dimension (``row_wise``) or along the last. Each vector's coefficients are
    sin((1 - t) theta) / sin(theta) and sin(t theta) / sin(theta), applied to the vectors as they
    are, or 1 - t and t where the two directions are colinear (1 - cos^2 <= 1e-16). Returns ``v0``,
    holding the result in its own shape. Both tensors must be contiguous.
    """
    a, dim = _layout(v0, flatten, row_wise)
    b, _ = _layout(v1, flatten, row_wise)
    na = torch.linalg.vector_norm(a, dim=dim, keepdim=True).clamp_min_(NORM_FLOOR)
    nb = torch.linalg.vector_norm(b, dim=dim, keepdim=True).clamp_min_(NORM_FLOOR)
    dot = torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim)
    cos = dot.div_(na * nb).clamp_(-1, 1)
    colinear = (1 - cos * cos) <= COLINEAR_EPS**2
    theta = torch.acos(cos.masked_fill(colinear, 0.0))
    sin_theta = torch.sin(theta).masked_fill_(colinear, 1.0)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    a.mul_(ca).add_(b.mul_(cb))
    return v0


def merge(inputs: MergeInputs[NuSlerpParams, NuSlerpModelParams]) -> torch.Tensor:
    p = inputs.params
    t = position([m.weight for m in inputs.model_params])
    base = inputs.base
    v0, v1 = (x.contiguous() for x in inputs.tensors)
    if base is not None:
        v0, v1 = _steps.task_vectors(base, [v0, v1])
    out = nuslerp(t, v0, v1, flatten=p.nuslerp_flatten, row_wise=p.nuslerp_row_wise)
    return out if base is None else base.add_(out)


METHOD = Method(
    name="nuslerp",
    title="NuSLERP",
    paper="https://github.com/arcee-ai/mergekit",
    summary="SLERP of two models (of their task vectors when a base is given) at t = w_2 / (w_1 + w_2), whole tensor or per row/column",
    params=NuSlerpParams,
    model_params=NuSlerpModelParams,
    merge=merge,
    base="optional",
    min_models=2,
    max_models=2,
)
