"""KnOTS-TIES: align the task updates of a matrix in one shared SVD basis, then merge them with TIES.

For each weight matrix, the task matrices ``D_i = W_i - W_base`` are put side by side and factored
once, ``[D_1 ... D_n] = U S [V_1^T ... V_n^T]``, so every ``D_i = U S V_i^T`` is written in the same
left basis. TIES (trim by magnitude, elect signs, disjoint mean) then merges the task-specific
factors ``V_i^T``, where the models' updates are aligned, and the merged update is
``U S V*^T``. Other tensors (norms, biases, embeddings) are merged with TIES directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["KnotsModelParams", "KnotsParams", "merge", "shared_basis", "ties_into"]


@dataclass(frozen=True)
class KnotsParams:
    normalize: bool = param(True, doc="divide each entry by the summed weight of agreeing models")
    lambda_: float = param(1.0, doc="scale of the merged task vector", key="lambda")


@dataclass(frozen=True)
class KnotsModelParams:
    weight: float = param(1.0, doc="coefficient of this model's task factors")
    density: float = param(
        1.0, doc="fraction of the model's task factors V_i kept, by magnitude", lo=0, hi=1, lo_open=True
    )


def ties_into(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """``base + lambda * TIES(deltas)``, in place in ``base`` and ``deltas``."""
    for delta, density in zip(deltas, densities):
        if density < 1:
            _steps.trim_to_top(delta, density)
    return _steps.combine(base, deltas, weights, consensus="sum", normalize=normalize, lambda_=lambda_)


def shared_basis(
    factors: list[torch.Tensor], left: torch.Tensor | None, shape: tuple[int, int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """From ``left @ [F_1 ... F_n] = [D_1 ... D_n]`` (``left`` with orthonormal columns, or the
    identity when None), ``(U S, [V_1^T ... V_n^T])`` of the thin SVD of ``[D_1 ... D_n]``, with
    rounding-level singular directions dropped."""
    u, s, vh = torch.linalg.svd(torch.cat(factors, dim=1), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0:
        return u[:, :0], [vh[:0, : f.shape[1]] for f in factors]
    keep = int(torch.count_nonzero(s > _steps.zero_singular_tolerance(shape, float(s[0]), s.dtype)))
    basis = u[:, :keep] if left is None else left @ u[:, :keep]
    scaled = basis * s[:keep]
    blocks, start = [], 0
    for f in factors:
        blocks.append(vh[:keep, start : start + f.shape[1]].contiguous())
        start += f.shape[1]
    return scaled, blocks


def _ties(
    base: torch.Tensor, deltas: list[torch.Tensor], inputs: MergeInputs[KnotsParams, KnotsModelParams]
) -> torch.Tensor:
    return ties_into(
        base,
        deltas,
        [m.weight for m in inputs.model_params],
        [m.density for m in inputs.model_params],
        normalize=inputs.params.normalize,
        lambda_=inputs.params.lambda_,
    )


def merge(inputs: MergeInputs[KnotsParams, KnotsModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    deltas = _steps.task_vectors(base, inputs.tensors)
    if not _steps.is_weight_matrix(inputs.tensor_name, base):
        return _ties(base, deltas, inputs)
    for i, delta in enumerate(deltas):
        _steps.require_finite(delta, f"{inputs.tensor_name}: the task vector of model {i + 1}")
    # A model that left this matrix unchanged has V_i = 0 exactly; in floating point its block of
    # the SVD would be rounding noise that TIES could count as agreeing, so it is left out.
    members = [
        i for i, (d, mp) in enumerate(zip(deltas, inputs.model_params)) if mp.weight != 0 and bool(d.any())
    ]
    used = [deltas[i] for i in members]
    deltas.clear()
    if not used:
        return base
    left, factors = shared_basis(used, None, (base.shape[0], base.shape[1]))
    del used
    if left.shape[1] == 0:
        return base
    merged = ties_into(
        torch.zeros_like(factors[0]),
        factors,
        [inputs.model_params[i].weight for i in members],
        [inputs.model_params[i].density for i in members],
        normalize=inputs.params.normalize,
        lambda_=inputs.params.lambda_,
    )  # lambda * V*^T
    return base.addmm_(left, merged)


METHOD = Method(
    name="knots_ties",
    title="KnOTS-TIES",
    paper="https://arxiv.org/abs/2410.19735",
    summary="per matrix: one SVD of the side-by-side task matrices, TIES on each model's factors in that basis",
    params=KnotsParams,
    model_params=KnotsModelParams,
    merge=merge,
)
