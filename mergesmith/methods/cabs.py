"""CABS: conflict-aware, balanced (n:m) sparsification of task vectors, then their weighted sum.

Per tensor, the models are taken in turn: in the order ``pruning_order`` names them, else sorted
by name (mergekit's default). Each model's task vector is cut into blocks of ``m`` consecutive
entries (in the tensor's flattened order) and, in every block, keeps its ``n`` largest-magnitude
entries among those no earlier model has kept (balanced sparsification). The
entries it keeps are then taken: no later model may keep them (conflict-aware sparsification), so
the kept task vectors never overlap. The merge adds each kept task vector, times the model's
weight, to the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.errors import MethodError
from mergesmith.methods._spec import MergeInputs, Method, base_of
from mergesmith.parameters import param

__all__ = ["CabsModelParams", "CabsParams", "block_sizes", "merge", "n_m_keep", "pruning_sequence"]

UNSET_N = -1  # a model's n_val that takes default_n_val
UNSET_M = 0  # a model's m_val that takes default_m_val
_CHUNK = 1 << 18  # entries of one model handled at a time (rounded down to whole blocks)


@dataclass(frozen=True)
class CabsParams:
    default_n_val: int = param(1, doc="entries kept per block (n of n:m), for models without n_val", lo=0)
    default_m_val: int = param(4, doc="block size (m of n:m), for models without m_val", lo=1)
    pruning_order: tuple[str, ...] = param(
        (),
        doc="model names in the order they choose their entries (empty: sorted by name); "
        "every model but the base must be listed",
    )


@dataclass(frozen=True)
class CabsModelParams:
    weight: float = param(1.0, doc="coefficient (lambda) of this model's kept task vector")
    n_val: int = param(
        UNSET_N, doc="entries kept per block of m_val for this model; -1 takes default_n_val", lo=UNSET_N
    )
    m_val: int = param(UNSET_M, doc="block size for this model; 0 takes default_m_val", lo=UNSET_M)


def block_sizes(params: CabsParams, mp: CabsModelParams) -> tuple[int, int]:
    """The (n, m) of one model: its own n_val and m_val when given, else the defaults."""
    if mp.n_val != UNSET_N and mp.m_val != UNSET_M:
        return mp.n_val, mp.m_val
    return params.default_n_val, params.default_m_val


def n_m_keep(magnitude: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Where ``magnitude`` (flat) is among the ``n`` largest of its block of ``m`` and above 0.

    Blocks are consecutive runs of ``m`` entries from the start; a shorter last block keeps up to
    ``n`` of its entries. Equal magnitudes are taken lower index first. Entries of magnitude 0 or
    less (nothing to keep, or not available) are never kept, so a block with fewer than ``n``
    positive entries keeps just those.
    """
    count = magnitude.numel()
    if n >= m:
        return magnitude > 0
    keep = torch.zeros(count, dtype=torch.bool, device=magnitude.device)
    if n == 0 or count == 0:
        return keep
    whole = count - count % m
    if whole:
        blocks = magnitude[:whole].view(-1, m)
        order = torch.sort(blocks, dim=1, descending=True, stable=True).indices[:, :n]
        chosen = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, order, True)
        keep[:whole] = chosen.view(-1)
    if whole < count:
        tail = magnitude[whole:]
        order = torch.sort(tail, descending=True, stable=True).indices[:n]
        keep[whole + order] = True
    return keep & (magnitude > 0)


def pruning_sequence(names: Sequence[str], order: Sequence[str]) -> list[int]:
    """The positions of the models named ``names`` in the order they are pruned.

    With ``order`` (model names), the models in the order it names them; each name takes every
    model of that name, in the given order, and names of no model here are passed over. Without
    ``order``, the models sorted by name (equal names keep their order).
    """
    if not order:
        return sorted(range(len(names)), key=lambda i: names[i])
    out: list[int] = []
    for name in dict.fromkeys(order):
        out += [i for i, n in enumerate(names) if n == name]
    return out


def merge(inputs: MergeInputs[CabsParams, CabsModelParams]) -> torch.Tensor:
    base = base_of(inputs)
    params = inputs.params
    flat_base = base.reshape(-1)
    count = flat_base.numel()
    taken = torch.zeros(count, dtype=torch.bool, device=base.device)
    if inputs.models:
        sequence = pruning_sequence(inputs.models, params.pruning_order)
    else:
        sequence = list(range(len(inputs.tensors)))
    for i in sequence:
        tensor, mp = inputs.tensors[i], inputs.model_params[i]
        n, m = block_sizes(params, mp)
        _check_sizes(inputs.tensor_name, n, m)
        flat = tensor.reshape(-1)
        step = max(m, _CHUNK - _CHUNK % m)
        for start in range(0, count, step):
            stop = min(count, start + step)
            delta = flat[start:stop].sub_(flat_base[start:stop])
            # NaN counts as the largest magnitude, so that it reaches the result and is reported
            magnitude = delta.abs().nan_to_num_(nan=float("inf")).masked_fill_(taken[start:stop], -1.0)
            keep = n_m_keep(magnitude, n, m)
            del magnitude
            taken[start:stop] |= keep
            flat_base[start:stop].add_(delta.mul_(keep), alpha=mp.weight)
    return base


def _check_sizes(tensor_name: str, n: int, m: int) -> None:
    if m < 1 or n < 0 or n > m:
        raise MethodError(f"{tensor_name}: cabs needs 0 <= n <= m and m >= 1; found n={n}, m={m}")


def _check(params: CabsParams, model_params: Sequence[CabsModelParams]) -> str | None:
    if params.default_n_val > params.default_m_val:
        return (
            f"cabs keeps default_n_val entries of every block of default_m_val, so default_n_val must "
            f"lie in [0, default_m_val]; found default_n_val={params.default_n_val}, "
            f"default_m_val={params.default_m_val}"
        )
    for i, mp in enumerate(model_params, start=1):
        given_n, given_m = mp.n_val != UNSET_N, mp.m_val != UNSET_M
        if given_n != given_m:
            present, absent = ("n_val", "m_val") if given_n else ("m_val", "n_val")
            return (
                f"cabs: model {i} (counting the models other than the base in config order) sets {present} without {absent}; give both, "
                "or neither to use default_n_val and default_m_val"
            )
        if given_n and mp.n_val > mp.m_val:
            return (
                f"cabs: model {i} (counting the models other than the base in config order) keeps n_val entries of every block of m_val, so "
                f"n_val must lie in [0, m_val]; found n_val={mp.n_val}, m_val={mp.m_val}"
            )
    return None


def _check_names(params: CabsParams, names: Sequence[str], every: Sequence[str]) -> str | None:
    order = params.pruning_order
    if not order:
        return None
    unknown = [n for n in order if n not in every]
    if unknown:
        return (
            f"cabs: pruning_order names {unknown[0]!r}, which is not a model of this merge; "
            f"use the names as the config writes them: {', '.join(dict.fromkeys(every))}"
        )
    missing = [n for n in dict.fromkeys(names) if n not in order]
    if missing:
        return (
            f"cabs: pruning_order leaves out {missing[0]!r}; list every model besides the base "
            "(mergekit would leave it out of the merge), or remove pruning_order to sort them by name"
        )
    return None


METHOD = Method(
    name="cabs",
    title="CABS (conflict-aware and balanced sparsification)",
    paper="https://arxiv.org/abs/2503.01874",
    summary="n:m-prune task vectors in turn onto entries no earlier model kept, weighted sum onto the base",
    params=CabsParams,
    model_params=CabsModelParams,
    merge=merge,
    check=_check,
    check_names=_check_names,
)
