"""Isotropic merging: give the summed task matrix a flat singular-value spectrum.

Two presets share this file. ``iso_c`` keeps the singular directions of the weighted sum of the task
matrices and sets every singular value to their mean. ``iso_cts`` keeps only the leading directions
of the sum (the common subspace), fills the rest of the rank with each model's own leading
directions outside it, orthonormalises the lot and gives it the same flat spectrum. Tensors that
are not weight matrices (biases, norms, embeddings) take the mean of the weighted task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["IsoCParams", "IsoCtsParams", "IsoModelParams", "merge_c", "merge_cts", "split_rank"]


@dataclass(frozen=True)
class IsoCParams:
    alpha: float = param(1.0, doc="scale of the merged task vector")


@dataclass(frozen=True)
class IsoCtsParams:
    alpha: float = param(1.0, doc="scale of the merged task vector")
    common_space_fraction: float = param(
        0.8,
        doc="share of each matrix's rank taken from the summed task matrix; the rest is split among the models",
        lo=0,
        hi=1,
    )


@dataclass(frozen=True)
class IsoModelParams:
    weight: float = param(1.0, doc="coefficient of this model's task vector")


def split_rank(rank: int, models: int, common_space_fraction: float) -> tuple[int, int]:
    """(directions from the summed matrix, directions from each model): ``common + models * per_model == rank``.

    The per-model count is ``(rank - floor(rank * fraction)) / models`` rounded half to even, but
    no more than ``rank // models``; the common subspace takes what is left.
    """
    common = int(rank * common_space_fraction)
    per_model = min(round((rank - common) / models), rank // models)
    return rank - models * per_model, per_model


def _fallback(
    base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], alpha: float
) -> torch.Tensor:
    """base + alpha * (1/T) * sum_i w_i delta_i, for tensors that are not weight matrices."""
    scaled = [w / len(deltas) for w in weights]
    return _steps.combine(base, deltas, scaled, consensus=None, normalize=False, lambda_=alpha)


def merge_c(inputs: MergeInputs[IsoCParams, IsoModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    weights = [m.weight for m in inputs.model_params]
    deltas = _steps.task_vectors(base, inputs.tensors)
    if not _steps.is_weight_matrix(inputs.tensor_name, base):
        return _fallback(base, deltas, weights, inputs.params.alpha)
    total = deltas[0].mul_(weights[0])
    for delta, w in zip(deltas[1:], weights[1:]):
        total.add_(delta, alpha=w)
    deltas.clear()
    _steps.require_finite(total, f"{inputs.tensor_name}: the weighted sum of the task vectors")
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    del total
    sigma = float(s.mean())
    return base.addmm_(u, vh, alpha=inputs.params.alpha * sigma)


def merge_cts(inputs: MergeInputs[IsoCtsParams, IsoModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    weights = [m.weight for m in inputs.model_params]
    deltas = _steps.task_vectors(base, inputs.tensors)
    if not _steps.is_weight_matrix(inputs.tensor_name, base):
        return _fallback(base, deltas, weights, inputs.params.alpha)
    rows, cols = base.shape
    rank = min(rows, cols)
    common, per_model = split_rank(rank, len(deltas), inputs.params.common_space_fraction)
    for delta, w in zip(deltas, weights):
        delta.mul_(w)
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    _steps.require_finite(total, f"{inputs.tensor_name}: the weighted sum of the task vectors")
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    del total
    u_hat = base.new_empty(rows, rank)
    s_hat = base.new_empty(rank)
    vh_hat = base.new_empty(rank, cols)
    u_hat[:, :common] = u[:, :common]
    s_hat[:common] = s[:common]
    vh_hat[:common] = vh[:common]
    del u, s, vh
    u_common = u_hat[:, :common]
    filled = common
    for delta in deltas if per_model else ():
        scale = float(torch.linalg.vector_norm(delta))
        if scale == 0:  # this model leaves the matrix as it is (or has weight 0)
            continue
        if common:
            delta.addmm_(u_common, u_common.T @ delta, alpha=-1)  # remove the common subspace
        tu, ts, tvh = _steps.top_singular(delta, per_model, scale)
        n = ts.numel()
        u_hat[:, filled : filled + n] = tu
        s_hat[filled : filled + n] = ts
        vh_hat[filled : filled + n] = tvh
        filled += n
        del tu, ts, tvh
    deltas.clear()
    if filled == 0:
        return base
    sigma = float(s_hat[:filled].mean())
    u_perp = _steps.orthonormal_factor(u_hat[:, :filled])
    del u_hat, u_common
    vh_perp = _steps.orthonormal_factor(vh_hat[:filled])
    del vh_hat
    return base.addmm_(u_perp, vh_perp, alpha=inputs.params.alpha * sigma)


ISO_C = Method(
    name="iso_c",
    title="Iso-C (isotropic merging in the common subspace)",
    paper="https://arxiv.org/abs/2502.04959",
    summary="per matrix: SVD of the summed task matrices, every singular value set to their mean, times alpha",
    params=IsoCParams,
    model_params=IsoModelParams,
    merge=merge_c,
)

ISO_CTS = Method(
    name="iso_cts",
    title="Iso-CTS (isotropic merging in common and task-specific subspaces)",
    paper="https://arxiv.org/abs/2502.04959",
    summary="per matrix: top directions of the summed task matrices plus each model's own, flat spectrum, times alpha",
    params=IsoCtsParams,
    model_params=IsoModelParams,
    merge=merge_cts,
)
