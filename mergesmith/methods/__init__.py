"""The registry of merge methods. A method is one module here plus one line below."""

from __future__ import annotations

from typing import Any

from mergesmith.methods import dare, linear, passthrough, slerp, task_arithmetic, ties
from mergesmith.methods._spec import MergeInputs, Method, NoParams

__all__ = ["REGISTRY", "MergeInputs", "Method", "NoParams", "get_method"]

REGISTRY: dict[str, Method[Any, Any]] = {
    m.name: m
    for m in (
        linear.METHOD,
        slerp.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.DARE_LINEAR,
        dare.DARE_TIES,
        passthrough.METHOD,
    )
}


def get_method(name: str) -> Method[Any, Any] | None:
    """The method registered under ``name``, or None."""
    return REGISTRY.get(name)
