"""What mergesmith knows of model architectures, read from ``architectures.json``.

Nothing here tests model names in code: a family is a row of data (how layer tensors are named,
which tensors come before the layers, which are tied), matched on ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any

from mergesmith._text import printable
from mergesmith.errors import CheckpointError
from mergesmith.stacks import Derived, derive, from_names

__all__ = [
    "Architecture",
    "Module",
    "architecture_for",
    "architecture_rows",
    "compatibility_keys",
    "layer_count_keys",
    "per_layer_keys",
]

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


def architecture_for(
    config: dict[str, Any], override: str | None = None, keys: Sequence[str] | None = None
) -> Architecture:
    """What the checkpoint with this config.json (and these tensor names) is made of.

    A row of architectures.json whose model_types include the config's model_type is used as long as
    it describes the tensors (its module names are mergekit's); otherwise, given the tensor names,
    the stacks, vocabulary tensors and ties are derived from the model's transformers definition
    (or from the names alone), each stack with its own layer positions; without tensor names, the
    generic fallback row.

    ``override`` (mergekit's ``override_architecture``, a class name such as ``LlamaForCausalLM``)
    picks the family whose architectures include it instead, whatever config.json says."""
    model_type = config.get("model_type")
    for row in _data()["families"]:
        if override in row.get("architectures", ()) if override else model_type in row["model_types"]:
            arch = _build(row)
            if override or keys is None:
                return arch
            named = from_names(keys)  # cheap: one stack the row describes needs no model definition
            if len(arch.parts) == 1 and len(named.stacks) <= 1 and _describes(arch, named, keys):
                return arch
            derived = derive(config, keys)
            if _describes(arch, derived, keys):
                return arch
            return _from_derived(config, derived) or arch
    if keys is not None:
        found = _from_derived(config, derive(config, keys))
        if found is not None:
            return found
    return _build(_data()["fallback"])


def _describes(arch: Architecture, derived: Derived, keys: Sequence[str]) -> bool:
    """Whether a row places every layer tensor in the stack and at the index the derivation does."""
    if not derived.stacks:
        return True
    prefixes = {s.prefix for s in derived.stacks}
    views: dict[str, Architecture] = {}
    for name in keys:
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit() and i > 0), None)
        if at is None or ".".join(parts[:at]) not in prefixes:
            continue
        module = arch.module_of(name)
        if module not in views:
            views[module] = arch.module(module) if len(arch.parts) > 1 else arch
        layer = views[module].layer_of(name)  # a corrupt index is refused here, by the row's rule
        if layer is None or str(layer) != parts[at].lstrip("0").rjust(1, "0"):
            return False
    return True


def _from_derived(config: dict[str, Any], derived: Derived) -> Architecture | None:
    """An architecture whose modules are the derived stacks, named by their tensor-name prefixes."""
    stacks = derived.stacks
    if not stacks:
        return None
    name = derived.source.removeprefix("transformers ")
    if derived.source == "tensor names":
        shown = f" ({', '.join(s.prefix for s in stacks)})" if len(stacks) > 1 else ""
        name = f"generic transformer{shown}"
    either = "|".join(re.escape(s.prefix) for s in stacks)
    model_type = config.get("model_type")
    parts: tuple[Module, ...] = (Module("default"),)
    key = stacks[0].count_key or ("num_hidden_layers" if derived.source == "tensor names" else "")
    if len(stacks) > 1:
        parts = tuple(
            Module(
                name=s.prefix,
                prefix=s.prefix + ".",
                layer_pattern=r"(\d+)\.",
                num_layers_key=s.count_key or "",
            )
            for s in stacks
        )
        key = ""
    return Architecture(
        name=name,
        model_types=(model_type,) if isinstance(model_type, str) else (),
        layer_pattern=re.compile(rf"^(?:{either})\.(\d+)\."),
        num_layers_key=key,
        pre_weights=derived.pre,
        vocab_weights=derived.vocab,
        tied=dict(derived.tied),
        parts=parts,
    )


def architecture_rows() -> list[dict[str, Any]]:
    """The family rows of architectures.json, as data."""
    rows: list[dict[str, Any]] = _data()["families"]
    return rows


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
