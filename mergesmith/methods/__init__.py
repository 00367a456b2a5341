"""The registry of merge methods. A method is one module here plus one line below."""

from __future__ import annotations

from typing import Any

from mergesmith.methods import (
    arcee_fusion,
    breadcrumbs,
    cabs,
    cart,
    consensus,
    dare,
    della,
    iso,
    karcher,
    knots,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    pcb,
    ram,
    sce,
    slerp,
    star,
    task_arithmetic,
    ties,
    tsv,
)
from mergesmith.methods._spec import MergeInputs, Method, NoParams

__all__ = ["REGISTRY", "MergeInputs", "Method", "NoParams", "get_method"]

REGISTRY: dict[str, Method[Any, Any]] = {
    m.name: m
    for m in (
        # averages and interpolations
        linear.METHOD,
        slerp.METHOD,
        nuslerp.METHOD,
        multislerp.METHOD,
        karcher.METHOD,
        model_stock.METHOD,
        nearswap.METHOD,
        arcee_fusion.METHOD,
        # task-vector methods
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.DARE_LINEAR,
        dare.DARE_TIES,
        breadcrumbs.BREADCRUMBS,
        breadcrumbs.BREADCRUMBS_TIES,
        della.DELLA,
        della.DELLA_LINEAR,
        sce.METHOD,
        knots.METHOD,
        ram.RAM,
        ram.RAMPLUS_TL,
        pcb.METHOD,
        cabs.METHOD,
        consensus.CONSENSUS_TA,
        consensus.CONSENSUS_TIES,
        # subspace methods
        tsv.METHOD,
        iso.ISO_C,
        iso.ISO_CTS,
        star.METHOD,
        cart.METHOD,
        # layer surgery
        passthrough.METHOD,
    )
}


def get_method(name: str) -> Method[Any, Any] | None:
    """The method registered under ``name``, or None."""
    return REGISTRY.get(name)
