"""SLERP: spherical linear interpolation between the base model and one other model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergesmith.methods._spec import MergeInputs, Method, NoParams, base_of
from mergesmith.parameters import param

__all__ = ["SlerpParams", "merge", "slerp"]

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpParams:
    t: float = param(doc="position between the base (0) and the other model (1)", lo=0, hi=1)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle through the directions of v0 and v1 (whole tensors).

    Falls back to linear interpolation when the two directions are nearly colinear
    (|cos| > 0.9995), where the spherical formula is numerically unstable.
    """
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    n0 = n0 if n0 > EPS else torch.ones_like(n0)
    n1 = n1 if n1 > EPS else torch.ones_like(n1)
    dot = float(torch.sum((v0 / n0) * (v1 / n1)).clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, t) if t not in (0.0, 1.0) else (v0 if t == 0 else v1).clone()
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin((1 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return v0 * s0 + v1 * s1


def merge(inputs: MergeInputs[SlerpParams, NoParams]) -> torch.Tensor:
    return slerp(inputs.params.t, base_of(inputs), inputs.tensors[0])


METHOD = Method(
    name="slerp",
    title="SLERP",
    paper="https://en.wikipedia.org/wiki/Slerp",
    summary="spherical interpolation from the base (t=0) to the other model (t=1)",
    params=SlerpParams,
    model_params=NoParams,
    merge=merge,
    base="required",
    min_models=1,
    max_models=1,
)
