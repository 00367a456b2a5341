"""PEFT LoRA adapters as tensor sources: a base model seen with an adapter applied, tensor by tensor.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). For each target module it stores factors ``A`` (rank x in) and ``B``
(out x rank); the adapted weight is ``W + s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), transposed for ``fan_in_fan_out`` layers (GPT-2's Conv1D). Embedding adapters store
``lora_embedding_A`` (rank x vocab) and ``lora_embedding_B`` (dim x rank): ``W + s * (B @ A)^T``.
Modules in ``modules_to_save`` (and resized embedding base layers) are stored whole and replace
the base's tensor. Nothing is computed until a tensor is asked for.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith import _safetensors
from mergesmith.errors import CheckpointError
from mergesmith.sources import Checkpoint, TensorInfo

__all__ = ["AdaptedCheckpoint", "Adapter", "read_adapter"]

_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMBED_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factors' tensor names in the adapter file and its scaling."""

    a: str
    b: str
    rank: int
    scaling: float
    embedding: bool
    transpose: bool


@dataclass
class Adapter:
    """A PEFT LoRA adapter read from its directory (factors stay on disk until used)."""

    dir: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]  # by the base tensor they change ("...q_proj.weight")
    replaced: dict[str, str]  # base tensor name -> adapter tensor name stored whole
    file: Path
    _entries: dict[str, _safetensors.Entry]
    _tensors: dict[str, torch.Tensor]

    def tensor(self, name: str) -> torch.Tensor:
        if self._entries:
            return _safetensors.read_tensor(self._entries[name])
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._entries:
            return self._entries[name].shape
        return tuple(self._tensors[name].shape)


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """The value of the first pattern naming ``module`` (whole name or a dotted suffix), or None."""
    for pattern, value in patterns.items():
        if module == pattern or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


def read_adapter(directory: Path) -> Adapter:
    """Read an adapter's config and tensor index; errors name the file and what to do."""
    cfg_file = directory / "adapter_config.json"
    try:
        config: dict[str, Any] = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory}: no adapter_config.json; a LoRA input must be a PEFT adapter directory"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(
            f"{cfg_file}: peft_type {kind!r} is not LoRA; only LoRA adapters can be applied"
        )
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise CheckpointError(
                f"{cfg_file}: {what} ({flag}: true) cannot be applied yet; use a plain LoRA adapter"
            )
    st = directory / "adapter_model.safetensors"
    bin_file = directory / "adapter_model.bin"
    entries: dict[str, _safetensors.Entry] = {}
    tensors: dict[str, torch.Tensor] = {}
    if st.is_file():
        entries, _ = _safetensors.read_header(st)
        names = list(entries)
        file = st
    elif bin_file.is_file():
        try:
            loaded = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or unsafe pickle
            raise CheckpointError(f"{bin_file}: cannot be read safely ({exc})") from None
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        names = list(tensors)
        file = bin_file
    else:
        raise CheckpointError(
            f"{directory}: no adapter_model.safetensors or adapter_model.bin next to adapter_config.json"
        )
    adapter = Adapter(directory, config, {}, {}, file, entries, tensors)
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    factors: dict[str, dict[str, str]] = {}
    for name in names:
        key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        m = _FACTOR.match(key) or _EMBED_FACTOR.match(key)
        if m:
            factors.setdefault(m.group("module"), {})[m.group("kind")] = name
        elif key.endswith(".base_layer.weight"):
            adapter.replaced[key.replace(".base_layer.weight", ".weight")] = name
        elif ".lora_" in key:
            raise CheckpointError(f"{file}: tensor {name} is not a LoRA factor mergesmith knows how to apply")
        else:
            adapter.replaced[key.replace(".modules_to_save.", ".").replace(".default.", ".")] = name
    for module, parts in factors.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in parts or b_key not in parts:
            missing = a_key if a_key not in parts else b_key
            raise CheckpointError(
                f"{file}: module {module} has no {missing} factor; the adapter file is incomplete"
            )
        rank = adapter.shape(parts[a_key])[0]
        a_alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        module_alpha = float(a_alpha) if a_alpha is not None else alpha
        scaling = module_alpha / (math.sqrt(rank) if rslora else rank)
        adapter.modules[f"{module}.weight"] = LoraModule(
            parts[a_key], parts[b_key], rank, scaling, embedding, fan_in_fan_out and not embedding
        )
    return adapter


class AdaptedCheckpoint(Checkpoint):
    """A base model checkpoint with a LoRA adapter applied to the tensors it targets."""

    def __init__(self, base: Checkpoint, adapter: Adapter, name: str) -> None:
        self.__dict__.update(base.__dict__)
        self.base = base
        self.adapter = adapter
        self.name = name
        self.weight_files = [*base.weight_files, adapter.file]
        self._base_keys = set(base.keys())
        self._check()

    def _check(self) -> None:
        base_keys = self._base_keys
        problems = []
        for target, module in self.adapter.modules.items():
            if target not in base_keys:
                problems.append(
                    f"{self.adapter.file}: the adapter changes {target}, which {self.base.name} does not have; "
                    "the adapter was trained on another architecture (check base_model_name_or_path: "
                    f"{self.adapter.config.get('base_model_name_or_path')!r})"
                )
                continue
            shape = self.info(target).shape
            a = self.adapter.shape(module.a)
            b = self.adapter.shape(module.b)
            if module.embedding:
                delta = (a[1], b[0])
            else:
                delta = (b[0], a[1]) if not module.transpose else (a[1], b[0])
            if len(shape) != 2 or delta != shape or a[0] != b[1]:
                problems.append(
                    f"{self.adapter.file}: {target}: factors A {a} and B {b} give a {delta} change, but the "
                    f"base's tensor is {shape} in {self.base.name}; the adapter was made for a model of "
                    "another size"
                )
        for target, stored in self.adapter.replaced.items():
            if target in base_keys and self.adapter.shape(stored)[1:] != self.base.info(target).shape[1:]:
                problems.append(
                    f"{self.adapter.file}: {stored} has shape {self.adapter.shape(stored)}, but {target} is "
                    f"{self.base.info(target).shape} in {self.base.name}"
                )
        if problems:
            raise CheckpointError(problems)

    def keys(self) -> list[str]:
        return self.base.keys() + [k for k in self.adapter.replaced if k not in self._base_keys]

    def info(self, name: str) -> TensorInfo:
        if name in self.adapter.replaced:
            stored = self.adapter.replaced[name]
            return TensorInfo(self.adapter.shape(stored), self.base_dtype(name), self.adapter.file.name)
        return self.base.info(name)

    def base_dtype(self, name: str) -> torch.dtype:
        if name in self._base_keys:
            return self.base.info(name).dtype
        return self.adapter.tensor(self.adapter.replaced[name]).dtype

    @property
    def dirs(self) -> list[Path]:
        return [self.base.dir, self.adapter.dir]

    def entry(self, name: str) -> _safetensors.Entry | None:
        """Where a tensor's bytes lie: only for tensors the adapter leaves as the base has them; a
        tensor it changes or replaces exists only through :meth:`get`."""
        if name in self.adapter.modules or name in self.adapter.replaced:
            return None
        return self.base.entry(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.adapter.replaced:
            tensor = self.adapter.tensor(self.adapter.replaced[name]).to(self.base_dtype(name)).clone()
        else:
            tensor = self.base.get(name)
        module = self.adapter.modules.get(name)
        if module is None:
            return tensor
        a = self.adapter.tensor(module.a).float()
        b = self.adapter.tensor(module.b).float()
        delta = b @ a
        if module.embedding or module.transpose:
            delta = delta.T
        merged = tensor.float().add_(delta, alpha=module.scaling)
        return merged.to(tensor.dtype)
