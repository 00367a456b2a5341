"""KnOTS-TIES: align the task updates of a matrix in one shared SVD basis, then merge them with TIES.

For each weight matrix, the task matrices ``D_i = W_i - W_base`` are put side by side and factored
once, ``[D_1 ... D_n] = U S [V_1^T ... V_n^T]``, so every ``D_i = U S V_i^T`` is written in the same
left basis. TIES (trim by magnitude, elect signs, disjoint mean) then merges the task-specific
factors ``V_i^T``, where the models' updates are aligned, and the merged update is
``U S V*^T``. Other tensors (norms, biases, embeddings) are merged with TIES directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesmith.methods import _steps
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param


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


def _ties(
    base: torch.Tensor, deltas: list[torch.Tensor], inputs: MergeInputs[KnotsParams, KnotsModelParams]
) -> torch.Tensor:
    for delta, mp in zip(deltas, inputs.model_params):
        if mp.density < 1:
            _steps.trim_to_top(delta, mp.density)
    return _steps.combine(
        base,
        deltas,
        [m.weight for m in inputs.model_params],
        consensus="sum",
        normalize=inputs.params.normalize,
        lambda_=inputs.params.lambda_,
    )


def merge(inputs: MergeInputs[KnotsParams, KnotsModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    deltas = _steps.task_vectors(base, inputs.tensors)
    if not _steps.is_weight_matrix(inputs.tensor_name, base):
        return _ties(base, deltas, inputs)
    rows, cols = base.shape
    stacked = torch.cat(deltas, dim=1)
    deltas.clear()
    _steps.require_finite(stacked, f"{inputs.tensor_name}: the task vectors")
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    del stacked
    if s.numel() == 0 or float(s[0]) == 0:
        return base
    keep = int(torch.count_nonzero(s > _steps.zero_singular_tolerance((rows, cols), float(s[0]), s.dtype)))
    u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    factors = [vh[:, i * cols : (i + 1) * cols].clone() for i in range(len(inputs.model_params))]
    del vh
    merged = _ties(torch.zeros_like(factors[0]), factors, inputs)  # lambda * V*^T
    return base.addmm_(u * s, merged)


METHOD = Method(
    name="knots_ties",
    title="KnOTS-TIES",
    paper="https://arxiv.org/abs/2410.19735",
    summary="per matrix: one SVD of the side-by-side task matrices, TIES on each model's factors in that basis",
    params=KnotsParams,
    model_params=KnotsModelParams,
    merge=merge,
)
