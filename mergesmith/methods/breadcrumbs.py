"""Model Breadcrumbs: keep a middle band of each task vector's magnitudes, then combine.

The largest entries (outliers) and the smallest (noise) of each task vector are dropped. Two
presets share this file: ``breadcrumbs`` sums the sparse task vectors, ``breadcrumbs_ties``
resolves their signs as TIES does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = [
    "BreadcrumbsModelParams",
    "BreadcrumbsParams",
    "band_mask",
    "merge_linear",
    "merge_ties",
    "row_band_mask",
]


@dataclass(frozen=True)
class BreadcrumbsParams:
    normalize: bool = param(False, doc="divide by the (agreeing) summed weights")
    lambda_: float = param(1.0, doc="scale of the merged task vector", key="lambda")
    rescale: bool = param(False, doc="rescale each sparse task vector to keep its L1 norm")
    mode: str = param(
        "mergekit",
        doc="mergekit: one band over the whole tensor, density first; paper: a band per row, gamma first",
        choices=("mergekit", "paper"),
    )
    int8_mask: bool = param(False, doc="accepted for mergekit configs; no effect on the result")


@dataclass(frozen=True)
class BreadcrumbsModelParams:
    weight: float = param(doc="coefficient of this model's task vector")
    density: float = param(
        1.0, doc="fraction of the task vector's entries kept, by magnitude", lo=0, hi=1, lo_open=True
    )
    gamma: float = param(0.01, doc="fraction of the largest-magnitude entries dropped", lo=0, hi=1)


def band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The entries the mergekit-style band keeps, over the whole tensor.

    With ``n`` entries ranked by magnitude, largest first: ``k = floor(density * n)`` entries are
    kept, those that follow the ``floor(gamma * n)`` largest; when that would run past the end,
    the band is moved up to the ``k`` smallest entries (the kept count wins over gamma).
    """
    n = delta.numel()
    keep_n = int(density * n)
    top_n = int(gamma * n)
    below = max(0, n - keep_n - top_n)  # entries under the band
    keep = _steps.top_k_mask(delta, n - below)
    if n - below - keep_n > 0:
        keep &= ~_steps.top_k_mask(delta, n - below - keep_n)
    return keep


def row_band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The entries the paper's band keeps, row by row along the last axis.

    In a row of ``c`` entries ranked by magnitude, largest first, the ``floor(gamma * c)`` largest
    are dropped and the next ``floor(density * c)`` kept (fewer when the row runs out). A 1-D
    tensor is one row; a 0-D tensor is kept whole.
    """
    if delta.dim() == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    cols = delta.shape[-1]
    rows = delta.reshape(-1, cols)
    top_n = int(gamma * cols)
    stop = top_n + int(density * cols)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    for block in _steps.row_blocks(rows.shape[0], cols):
        ranks = _steps.row_ranks(rows[block], descending=True)
        keep[block] = (ranks >= top_n) & (ranks < stop)
    return keep.reshape(delta.shape)


def _sparse_deltas(inputs: MergeInputs[BreadcrumbsParams, BreadcrumbsModelParams]) -> list[torch.Tensor]:
    params = inputs.params
    rescale: _steps.RescaleMode = "l1" if params.rescale else "none"
    deltas = _steps.task_vectors(base_of(inputs), inputs.tensors)
    for delta, mp in zip(deltas, inputs.model_params):
        if params.mode == "paper":
            if mp.density >= 1 and mp.gamma <= 0:
                continue
            keep = row_band_mask(delta, mp.density, mp.gamma)
        else:
            if mp.density >= 1:
                continue
            keep = band_mask(delta, mp.density, mp.gamma)
        _steps.apply_mask(delta, keep, rescale, mp.density)
        del keep
    return deltas


def merge_linear(inputs: MergeInputs[BreadcrumbsParams, BreadcrumbsModelParams]) -> torch.Tensor:
    return _steps.combine_sparse(inputs, _sparse_deltas(inputs), None)


def merge_ties(inputs: MergeInputs[BreadcrumbsParams, BreadcrumbsModelParams]) -> torch.Tensor:
    return _steps.combine_sparse(inputs, _sparse_deltas(inputs), "sum")


BREADCRUMBS = Method(
    name="breadcrumbs",
    title="Model Breadcrumbs",
    paper="https://arxiv.org/abs/2312.06795",
    summary="drop each task vector's largest (gamma) and smallest entries, keep density, weighted sum",
    params=BreadcrumbsParams,
    model_params=BreadcrumbsModelParams,
    merge=merge_linear,
)

BREADCRUMBS_TIES = Method(
    name="breadcrumbs_ties",
    title="Model Breadcrumbs + TIES sign election",
    paper="https://arxiv.org/abs/2312.06795",
    summary="drop each task vector's largest (gamma) and smallest entries, keep density, TIES sign election",
    params=BreadcrumbsParams,
    model_params=BreadcrumbsModelParams,
    merge=merge_ties,
)
