"""Typed method parameters and the per-tensor settings users write for them.

A method declares its parameters as a frozen dataclass whose fields are made with :func:`param`.
A *setting* is what the YAML gives for one parameter: a scalar, a list of numbers (a gradient
interpolated across the layers of a slice) or a list of ``{filter: ..., value: ...}`` conditions
matched on tensor names. :func:`evaluate` turns a setting into the value for one tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergesmith._yaml import shown

__all__ = [
    "REQUIRED",
    "Condition",
    "ParamInfo",
    "check_setting",
    "evaluate",
    "is_condition_list",
    "param",
    "param_infos",
    "resolve",
]


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


def param(
    default: Any = REQUIRED,
    *,
    doc: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    key: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """Declare one method parameter: its default (or required), bounds and one-line description."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "key": key, "choices": choices}
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ParamInfo:
    """Everything known about one declared parameter."""

    attr: str
    key: str
    type: type
    default: Any
    doc: str
    lo: float | None
    hi: float | None
    lo_open: bool
    choices: tuple[str, ...] | None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def is_names(self) -> bool:
        """Whether the value is a list of model names (type ``tuple[str, ...]``), given whole."""
        return typing.get_origin(self.type) is tuple

    def bounds_text(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        if self.lo is None and self.hi is None:
            return ""
        left = "(" if self.lo_open else "["
        lo = "-inf" if self.lo is None else _num(self.lo)
        hi = "inf" if self.hi is None else _num(self.hi)
        return f"{left}{lo}, {hi}]" if self.hi is not None else f"{left}{lo}, inf)"

    def check_scalar(self, value: Any) -> tuple[Any, str | None]:
        """Coerce a YAML scalar to this parameter's type; return (value, problem)."""
        if self.type is bool:
            if isinstance(value, bool):
                return value, None
            return None, f"expected true or false, found {shown(value)}"
        if self.type is str:
            if not isinstance(value, str):
                return None, f"expected one of {', '.join(self.choices or ())}, found {shown(value)}"
            if self.choices and value not in self.choices:
                return None, f"expected one of {', '.join(self.choices)}, found {shown(value)}"
            return value, None
        number: float
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None, f"expected a number, found {shown(value)}"
        try:
            number = float(value)
        except ValueError:
            return None, f"expected a number, found {shown(value)}"
        if not math.isfinite(number):
            return None, f"expected a finite number, found {shown(value)}"
        if self.type is int:
            if number != int(number):
                return None, f"expected a whole number, found {shown(value)}"
            number = int(number)
        if self.lo is not None and (number < self.lo or (self.lo_open and number == self.lo)):
            return None, f"{_num(number)} is outside {self.bounds_text()}"
        if self.hi is not None and number > self.hi:
            return None, f"{_num(number)} is outside {self.bounds_text()}"
        return number, None


def _num(x: float) -> str:
    return f"{x:g}"


def param_infos(cls: type) -> list[ParamInfo]:
    """The declared parameters of a parameter dataclass, in declaration order."""
    return list(_param_infos(cls))


@functools.cache
def _param_infos(cls: type) -> tuple[ParamInfo, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else REQUIRED
        out.append(
            ParamInfo(
                attr=f.name,
                key=meta.get("key") or f.name,
                type=hints[f.name],
                default=default,
                doc=meta.get("doc", ""),
                lo=meta.get("lo"),
                hi=meta.get("hi"),
                lo_open=bool(meta.get("lo_open")),
                choices=meta.get("choices"),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class Condition:
    """One ``{filter: ..., value: ...}`` entry: applies when ``filter`` is in the tensor's name."""

    filter: str | None
    value: Any

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


def is_condition_list(setting: Any) -> bool:
    return isinstance(setting, list) and any(isinstance(e, Mapping) for e in setting)


def check_setting(info: ParamInfo, setting: Any) -> list[str]:
    """Problems with a setting written for ``info``: its shape and every value in it."""
    if info.is_names:
        if isinstance(setting, list) and all(isinstance(v, str) for v in setting):
            return []
        return [f": expected a list of model names, found {shown(setting)}"]
    if isinstance(setting, list):
        if not setting:
            return [": an empty list gives no value"]
        if is_condition_list(setting):
            problems = []
            for i, cond in enumerate(setting):
                if not isinstance(cond, Mapping):
                    problems.append(f"[{i}]: expected {{filter: ..., value: ...}}, found {shown(cond)}")
                    continue
                unknown = set(cond) - {"filter", "value"}
                if unknown:
                    problems.append(
                        f"[{i}]: unknown key {shown(sorted(map(str, unknown))[0])} (a condition has filter and value)"
                    )
                if "value" not in cond:
                    problems.append(f"[{i}]: a condition needs a value")
                    continue
                flt = cond.get("filter")
                if flt is not None and not isinstance(flt, str):
                    problems.append(f"[{i}].filter: expected a string, found {shown(flt)}")
                if isinstance(cond["value"], list) and is_condition_list(cond["value"]):
                    problems.append(f"[{i}].value: conditions cannot nest")
                    continue
                problems += [f"[{i}].value{p}" for p in check_setting(info, cond["value"])]
            return problems
        problems = []
        for i, v in enumerate(setting):
            _, problem = info.check_scalar(v)
            if problem:
                problems.append(f"[{i}]: {problem}")
        return problems
    if isinstance(setting, Mapping):
        return [": expected a value, a list of values or a list of {filter, value} conditions"]
    _, problem = info.check_scalar(setting)
    return [f": {problem}"] if problem else []


def evaluate(info: ParamInfo, setting: Any, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for one tensor at relative layer position ``t`` in [0, 1].

    Returns None when a condition list has no entry matching the tensor.
    A numeric list is a gradient: the value is linearly interpolated at ``t`` between its
    evenly spaced points. A list of non-numbers picks the entry at ``t``. A list of model names
    (see :attr:`ParamInfo.is_names`) is the value itself.
    """
    if info.is_names:
        return tuple(setting)
    if isinstance(setting, list):
        if is_condition_list(setting):
            for cond in setting:
                if Condition(cond.get("filter"), cond["value"]).matches(tensor_name):
                    return evaluate(info, cond["value"], tensor_name, t)
            return None
        values = [info.check_scalar(v)[0] for v in setting]
        if info.type in (bool, str):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        result = (1 - frac) * values[i0] + frac * values[i1]
        return round(result) if info.type is int else result
    return info.check_scalar(setting)[0]


def resolve(info: ParamInfo, scopes: Sequence[Mapping[str, Any] | None], tensor_name: str, t: float) -> Any:
    """The value of a parameter for one tensor, from the first scope that gives one, or its default."""
    for scope in scopes:
        if scope is not None and info.key in scope:
            value = evaluate(info, scope[info.key], tensor_name, t)
            if value is not None:
                return value
    return info.default
