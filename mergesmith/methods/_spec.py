"""What a merge method is: typed parameters and a pure function of tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch

from mergesmith.errors import MethodError
from mergesmith.parameters import ParamInfo, param_infos

__all__ = ["MergeInputs", "Method", "NoParams", "base_of"]

P = TypeVar("P")
M = TypeVar("M")

BasePolicy = Literal["required", "optional", "unused"]


@dataclass(frozen=True)
class NoParams:
    """A method or model without parameters."""


@dataclass(frozen=True)
class MergeInputs(Generic[P, M]):
    """The tensors and resolved parameters of one output tensor.

    ``tensors`` are the non-base inputs in config order (all inputs when the method takes no base),
    converted to a floating compute dtype; ``model_params`` lines up with them. The method owns
    ``base`` and ``tensors``: it may overwrite them in place (and return one of them), which keeps
    a merge's memory to the inputs of one tensor.
    """

    tensor_name: str
    base: torch.Tensor | None
    tensors: Sequence[torch.Tensor]
    params: P
    model_params: Sequence[M]
    seed: int = 0
    thresholds: Sequence[float] | None = None  # whole-model magnitude thresholds, per input
    # Per input, a store kept while the same inputs are merged again and again with other
    # parameters (tuning trials); None in a one-off merge. Steps keep there what depends on that
    # input's task vector alone, such as its sorted magnitudes (see _steps.trim_to_top).
    reuse: Sequence[MutableMapping[str, Any]] | None = None
    # The models of ``tensors``, as mergekit names them (path, with @revision when given); empty
    # where the tensors do not come from named models.
    models: Sequence[str] = ()

    def store(self, index: int) -> MutableMapping[str, Any] | None:
        """The store of input ``index`` (see ``reuse``), or None."""
        return None if self.reuse is None else self.reuse[index]

    def generator(self, index: int) -> torch.Generator:
        """A CPU random generator for input ``index``, seeded from the run seed and tensor name."""
        digest = hashlib.sha256(f"{self.seed}\0{self.tensor_name}\0{index}".encode()).digest()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


@dataclass(frozen=True)
class Method(Generic[P, M]):
    """A merge method: its name, paper, parameter types and merge function."""

    name: str
    title: str
    paper: str
    summary: str
    params: type[P]
    model_params: type[M]
    merge: Callable[[MergeInputs[P, M]], torch.Tensor]
    base: BasePolicy = "required"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    check: Callable[[P, Sequence[M]], str | None] | None = None
    # Checks the merge-wide parameters against model names (see MergeInputs.models): those of one
    # tensor's inputs besides the base, in config order, and those of every model in the merge.
    check_names: Callable[[P, Sequence[str], Sequence[str]], str | None] | None = None
    # With these params, trim each model by a magnitude threshold over its whole task vector: the
    # executor computes it first (mergesmith.whole_model) and passes it as MergeInputs.thresholds.
    # The method's per-model parameters must then include one ``density`` for the whole model.
    whole_model_trim: Callable[[P], bool] | None = None
    aliases: tuple[str, ...] = field(default=())

    @property
    def param_infos(self) -> list[ParamInfo]:
        return param_infos(self.params)

    @property
    def model_param_infos(self) -> list[ParamInfo]:
        return param_infos(self.model_params)

    def build_params(self, values: Mapping[str, Any]) -> P:
        return self.params(**{i.attr: values[i.key] for i in self.param_infos})

    def build_model_params(self, values: Mapping[str, Any]) -> M:
        return self.model_params(**{i.attr: values[i.key] for i in self.model_param_infos})

    def models_text(self) -> str:
        """How many models the method takes, in words."""
        lo, hi = self.min_models, self.max_models
        count = f"exactly {lo}" if lo == hi else (f"{lo} or more" if hi is None else f"{lo} to {hi}")
        if self.base == "required":
            return f"a base_model and {count} other model{'s' if hi != 1 else ''}"
        noun = "model" if hi == 1 else "models"
        if self.base == "optional":
            return f"{count} {noun} besides an optional base_model"
        return f"{count} {noun}"


def base_of(inputs: MergeInputs[Any, Any]) -> torch.Tensor:
    """The base tensor of a method that requires one (the planner always supplies it)."""
    if inputs.base is None:
        raise MethodError(f"{inputs.tensor_name}: this method needs the base model's tensor; give base_model")
    return inputs.base
