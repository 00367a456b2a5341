"""What mergesmith knows of model architectures, read from ``architectures.json``.

Nothing here tests model names in code: a family is a row of data (how layer tensors are named,
which tensors come before the layers, which are tied), matched on ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any

from mergesmith._text import printable
from mergesmith.errors import CheckpointError

__all__ = ["Architecture", "Module", "architecture_for"]

# the layer pattern of a module without layers: it matches no name
_NO_LAYERS = re.compile(r"(?!)(\d+)")

# a million layers is far past any model; longer numbers in tensor names are refused, not parsed
MAX_LAYER_DIGITS = 6


@dataclass(frozen=True)
class Module:
    """One of mergekit's modules of an architecture: the tensors whose names start with ``prefix``,
    with their own layer stack (``layer_pattern``, matched after the prefix) and layer count key
    (a dotted path into config.json, such as ``vision_config.num_hidden_layers``)."""

    name: str
    prefix: str = ""
    layer_pattern: str | None = None  # None: the architecture's own
    num_layers_key: str | None = None  # None: the architecture's own
    layers: bool = True  # False: no layer stack (a projector); every tensor is outside the layers


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layer_pattern: re.Pattern[str]
    num_layers_key: str
    pre_weights: tuple[str, ...]
    vocab_weights: tuple[str, ...]
    tied: dict[str, str]
    fan_in_fan_out: bool = False  # layer weights stored (in, out), as GPT-2's Conv1D
    parts: tuple[Module, ...] = (Module("default"),)  # mergekit's modules, in its order

    @property
    def modules(self) -> tuple[str, ...]:
        """mergekit's module names (the keys of a config's ``modules:``)."""
        return tuple(p.name for p in self.parts)

    def module_of(self, tensor: str) -> str:
        """The module a tensor belongs to: the one with the longest matching prefix; a tensor under
        no module's prefix goes with the first module."""
        best = max(
            (p for p in self.parts if tensor.startswith(p.prefix)), key=lambda p: len(p.prefix), default=None
        )
        return (best or self.parts[0]).name

    def module(self, name: str) -> Architecture:
        """This architecture seen as one of its modules: its layer stack and layer count key."""
        part = next(p for p in self.parts if p.name == name)
        pattern = self.layer_pattern
        if not part.layers:
            pattern = _NO_LAYERS
        elif part.layer_pattern is not None:
            pattern = re.compile("^" + re.escape(part.prefix) + part.layer_pattern.removeprefix("^"))
        return replace(
            self,
            name=self.name if len(self.parts) == 1 else f"{self.name}, module {name}",
            layer_pattern=pattern,
            num_layers_key=(part.num_layers_key or self.num_layers_key) if part.layers else "",
            parts=(part,),
        )

    def layer_of(self, tensor: str) -> int | None:
        """The layer index in a tensor's name, or None for tensors outside the layer stack."""
        m = self.layer_pattern.search(tensor)
        if m is None:
            return None
        if len(m.group(1)) > MAX_LAYER_DIGITS:
            raise CheckpointError(
                f"tensor {printable(tensor[:80])}{'...' if len(tensor) > 80 else ''}: its layer number has "
                f"{len(m.group(1))} digits, more than any model's layer stack; the checkpoint is corrupt or "
                "not a model: check where it came from"
            )
        return int(m.group(1))

    def with_layer(self, tensor: str, layer: int) -> str:
        """The same tensor name with its layer index replaced."""
        m = self.layer_pattern.search(tensor)
        if m is None:
            return tensor
        return tensor[: m.start(1)] + str(layer) + tensor[m.end(1) :]

    def is_pre(self, tensor: str) -> bool:
        """True for tensors that come before the layer stack (embeddings)."""
        return tensor in self.pre_weights or (not self.pre_weights and "embed" in tensor)

    def num_layers(self, config: dict[str, Any]) -> int | None:
        if not self.num_layers_key:  # a module without layers
            return None
        if "." in self.num_layers_key:  # a path into nested configs: text_config.num_hidden_layers
            value: Any = config
            for key in self.num_layers_key.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        value = config.get(self.num_layers_key)
        if value is None and isinstance(config.get("text_config"), dict):
            value = config["text_config"].get(self.num_layers_key)
        return value if isinstance(value, int) else None


@cache
def _data() -> dict[str, Any]:
    text = resources.files("mergesmith").joinpath("architectures.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _build(row: dict[str, Any]) -> Architecture:
    return Architecture(
        name=row["name"],
        model_types=tuple(row["model_types"]),
        layer_pattern=re.compile(row["layer_pattern"]),
        num_layers_key=row["num_layers_key"],
        pre_weights=tuple(row["pre_weights"]),
        vocab_weights=tuple(row["vocab_weights"]),
        tied=dict(row["tied"]),
        fan_in_fan_out=bool(row.get("fan_in_fan_out", False)),
        parts=tuple(_module(m) for m in row["modules"]),
    )


def _module(entry: str | dict[str, Any]) -> Module:
    if isinstance(entry, str):
        return Module(entry)
    return Module(
        name=entry["name"],
        prefix=entry.get("prefix", ""),
        layer_pattern=entry.get("layer_pattern"),
        num_layers_key=entry.get("num_layers_key"),
        layers=bool(entry.get("layers", True)),
    )


def architecture_for(config: dict[str, Any], override: str | None = None) -> Architecture:
    """The family whose model_types include the config's model_type, else the generic fallback.

    ``override`` (mergekit's ``override_architecture``, a class name such as ``LlamaForCausalLM``)
    picks the family whose architectures include it instead, whatever config.json says."""
    model_type = config.get("model_type")
    for row in _data()["families"]:
        if override in row.get("architectures", ()) if override else model_type in row["model_types"]:
            return _build(row)
    return _build(_data()["fallback"])


def compatibility_keys() -> list[str]:
    keys: list[str] = _data()["compatibility_keys"]
    return keys


def layer_count_keys() -> list[str]:
    keys: list[str] = _data()["layer_count_keys"]
    return keys


def per_layer_keys() -> list[str]:
    """config.json keys holding one entry per layer, rebuilt when layers are stacked."""
    keys: list[str] = _data()["per_layer_keys"]
    return keys
