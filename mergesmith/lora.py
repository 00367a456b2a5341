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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergesmith import _json, _safetensors
from mergesmith._text import printable
from mergesmith.architecture import architecture_for
from mergesmith.errors import CheckpointError
from mergesmith.sources import ModelSource, TensorInfo

__all__ = ["AdaptedCheckpoint", "Adapter", "LoraModule", "check_config", "read_adapter"]

_PREFIX = "base_model.model."
MAX_PATTERN = 2000  # characters of a module-name regular expression in adapter_config.json
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

    def dtype(self, name: str) -> torch.dtype:
        if self._entries:
            return self._entries[name].dtype
        return self._tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        if self._entries:
            return self._entries[name].shape
        return tuple(self._tensors[name].shape)


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """The value of the first pattern naming ``module`` (whole name or a dotted suffix), or None,
    matched as PEFT matches ``rank_pattern`` and ``alpha_pattern`` keys."""
    for pattern, value in patterns.items():
        if module == pattern or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


# Config keys of LoRA variants whose update is not ``W + s * B @ A`` (or that change more than
# the weights the factors name): applying them as plain LoRA would give a wrong model.
_VARIANTS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "arrow_config": "Arrow routing",
}


_FIX = "; correct adapter_config.json or save the adapter again with PEFT"


def _shown(value: Any) -> str:
    """A value read from adapter_config.json, as JSON writes it, shortened and safe to print."""
    text = printable(json.dumps(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_patterns(config: dict[str, Any], key: str, valid: Any, expected: str, problems: list[str]) -> None:
    patterns = config.get(key)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        problems.append(
            f"{key} is {_shown(patterns)}; expected a mapping of module pattern to {expected}{_FIX}"
        )
        return
    for pattern, value in patterns.items():
        _check_regex(f"{key} pattern", pattern, problems)
        if not valid(value):
            problems.append(f"{key}[{_shown(pattern)}] is {_shown(value)}; expected {expected}{_FIX}")


def _nested_repeat(pattern: str) -> bool:
    """Whether a regular expression repeats something that itself repeats (``(a+)+``, ``(.*)*``):
    such a pattern can take exponential time on a name it almost matches, so it is not run."""
    try:
        from re import _constants, _parser  # type: ignore[attr-defined]
    except ImportError:  # a Python without the parser module: no check
        return False
    repeats = {_constants.MAX_REPEAT, _constants.MIN_REPEAT, getattr(_constants, "POSSESSIVE_REPEAT", None)}

    def walk(items: Any, inside: bool) -> bool:
        for op, av in items:
            if op in repeats:
                _low, high, sub = av
                if high > 1 and inside:
                    return True
                if walk(sub, inside or high > 1):
                    return True
            elif op is _constants.SUBPATTERN:
                if walk(av[-1], inside):
                    return True
            elif op is _constants.BRANCH:
                if any(walk(branch, inside) for branch in av[1]):
                    return True
            elif op in (_constants.ASSERT, _constants.ASSERT_NOT) and walk(av[1], inside):
                return True
        return False

    try:
        return walk(_parser.parse(pattern), False)
    except Exception:  # re.compile reports a malformed pattern
        return False


def _check_regex(what: str, pattern: str, problems: list[str]) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        problems.append(f"{what} {_shown(pattern)} is not a regular expression ({exc}){_FIX}")
        return
    if len(pattern) > MAX_PATTERN or _nested_repeat(pattern):
        problems.append(
            f"{what} {_shown(pattern[:80])} "
            + (
                f"is {len(pattern)} characters long, more than {MAX_PATTERN}"
                if len(pattern) > MAX_PATTERN
                else "repeats a group that itself repeats, which can take exponential time to match"
            )
            + "; list the module names instead, or write the pattern without nested repetition"
            + _FIX
        )


def check_config(config: Any, cfg_file: Path) -> dict[str, Any]:
    """``adapter_config.json`` checked whole, as PEFT's LoraConfig reads it: every problem is
    reported at once, naming the key, what it holds and what it should hold."""
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{cfg_file}: holds a JSON {type(config).__name__}, not an object of LoRA settings; "
            "repair the file or save the adapter again with PEFT"
        )
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(
            f"{cfg_file}: peft_type {_shown(kind)} is not LoRA; only LoRA adapters can be applied"
        )
    problems = []
    for flag, what in _VARIANTS.items():
        if config.get(flag):
            problems.append(
                f"{what} ({flag}: {_shown(config[flag])}) cannot be applied by mergesmith; "
                "use a plain LoRA adapter"
            )
    if "r" in config and not _is_rank(config["r"]):
        problems.append(f"r is {_shown(config['r'])}; expected a whole number of at least 1{_FIX}")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        problems.append(f"lora_alpha is {_shown(config['lora_alpha'])}; expected a finite number{_FIX}")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            problems.append(f"{flag} is {_shown(config[flag])}; expected true or false{_FIX}")
    _check_patterns(config, "rank_pattern", _is_rank, "a whole number of at least 1", problems)
    _check_patterns(config, "alpha_pattern", _is_number, "a finite number", problems)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_regex("target_modules", targets, problems)
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        problems.append(
            f"target_modules is {_shown(targets)}; expected a list of module names or a regular expression{_FIX}"
        )
    if problems:
        raise CheckpointError([f"{cfg_file}: {p}" for p in problems])
    return config


def _targets_match(targets: Any, modules: set[str]) -> bool:
    """Whether ``target_modules`` names at least one of ``modules``, as PEFT matches it."""
    if targets is None or targets == "all-linear" or not modules:
        return True
    if isinstance(targets, str):
        return any(re.fullmatch(targets, m) for m in modules)
    return any(m == t or m.endswith(f".{t}") for t in targets for m in modules)


def read_adapter(directory: Path) -> Adapter:
    """Read an adapter's config and tensor index; errors name the file and what to do."""
    cfg_file = directory / "adapter_config.json"
    if not cfg_file.exists():
        raise CheckpointError(
            f"{directory}: no adapter_config.json; a LoRA input must be a PEFT adapter directory"
        )
    config = check_config(
        _json.read_json(cfg_file, fix="repair the file or save the adapter again with PEFT"), cfg_file
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
        if not isinstance(loaded, dict):
            raise CheckpointError(
                f"{bin_file}: holds a {type(loaded).__name__}, not a mapping of tensor names to tensors; "
                "save the adapter again with PEFT"
            )
        tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        names = list(tensors)
        file = bin_file
    else:
        raise CheckpointError(
            f"{directory}: no adapter_model.safetensors or adapter_model.bin next to adapter_config.json"
        )
    adapter = Adapter(directory, config, {}, {}, file, entries, tensors)
    r = config.get("r", 8)
    alpha = float(config.get("lora_alpha", 8))  # PEFT's LoraConfig defaults: r=8, lora_alpha=8
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
            raise CheckpointError(
                f"{file}: tensor {printable(name)} is not a LoRA factor mergesmith knows how to apply; "
                "use a plain LoRA adapter"
            )
        else:
            adapter.replaced[key.replace(".modules_to_save.", ".").replace(".default.", ".")] = name
    problems = []
    for module, parts in factors.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in parts or b_key not in parts:
            missing = a_key if a_key not in parts else b_key
            problems.append(
                f"module {printable(module)} has no {missing} factor; the adapter file is incomplete"
            )
            continue
        a, b = adapter.shape(parts[a_key]), adapter.shape(parts[b_key])
        bad = [
            f"{printable(parts[k])} is {dtype}"
            for k in (a_key, b_key)
            if not (dtype := adapter.dtype(parts[k])).is_floating_point
        ]
        if bad:
            problems.append(
                f"{', '.join(bad)}; LoRA factors must be floating point (a quantized or corrupt adapter)"
            )
            continue
        if len(a) != 2 or len(b) != 2:
            problems.append(
                f"module {printable(module)}: factors A {a} and B {b} must both be matrices (2-D); "
                "the adapter is corrupt or of another kind"
            )
            continue
        if a[0] == 0 or a[0] != b[1]:
            problems.append(
                f"module {printable(module)}: factors A {a} and B {b} do not chain (A's rows, the rank, must "
                "equal B's columns and be at least 1); the adapter is corrupt"
            )
            continue
        rank = a[0]
        declared = _pattern_value(config.get("rank_pattern") or {}, module)
        expected = declared if declared is not None else r
        if rank != expected:
            if declared is not None:
                source = f"rank_pattern in adapter_config.json says {expected}"
            elif "r" in config:
                source = f"r in adapter_config.json says {expected}"
            else:
                source = f"adapter_config.json gives no r, so PEFT's default {expected} applies"
            problems.append(
                f"module {printable(module)} has rank {rank} (A {a}, B {b}), but {source}; "
                "fix adapter_config.json or save the adapter again with PEFT"
            )
            continue
        a_alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        module_alpha = float(a_alpha) if a_alpha is not None else alpha
        scaling = module_alpha / (math.sqrt(rank) if rslora else rank)
        adapter.modules[f"{module}.weight"] = LoraModule(
            parts[a_key], parts[b_key], rank, scaling, embedding, fan_in_fan_out and not embedding
        )
    if problems:
        raise CheckpointError([f"{file}: {p}" for p in problems])
    return adapter


class AdaptedCheckpoint:
    """A base model with a LoRA adapter applied to the tensors it targets: a :class:`ModelSource`
    that reads the base's tensors through it, changed where the adapter changes them."""

    def __init__(self, base: ModelSource, adapter: Adapter, name: str) -> None:
        self.base = base
        self.adapter = adapter
        self.name = name
        self.weight_files = [*base.weight_files, adapter.file]
        self._base_keys = set(base.keys())
        self._check()

    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    @property
    def dir(self) -> Path:
        return self.base.dir

    @property
    def fp8_scales(self) -> dict[str, str]:
        return self.base.fp8_scales

    def side_file(self, name: str) -> Path | None:
        return self.base.side_file(name)

    def _check(self) -> None:
        base_keys = self._base_keys
        file = self.adapter.file
        # a base holding quantization data was refused when it was opened (Checkpoint)
        problems = []
        if self.base.fp8_scales:
            raise CheckpointError(
                f"{self.base.dir / 'config.json'}: the base model is FP8-quantized; "
                "an adapter is applied to unquantized weights only: apply it to the bfloat16 base model"
            )
        targets = self.adapter.config.get("target_modules")
        modules = {k[: -len(".weight")] for k in base_keys if k.endswith(".weight")}
        if not _targets_match(targets, modules):
            problems.append(
                f"{file}: target_modules {_shown(targets)} match no module of {self.base.name} "
                f"(it has e.g. {', '.join(sorted(modules)[:3])}); the adapter was made for another architecture "
                f"(check base_model_name_or_path: {printable(repr(self.adapter.config.get('base_model_name_or_path')))})"
            )
        arch = architecture_for(self.base.config)
        known = bool(arch.model_types)
        for target, module in list(self.adapter.modules.items()):
            shown = printable(target)
            if target not in base_keys:
                problems.append(
                    f"{file}: the adapter changes {shown}, which {self.base.name} does not have; "
                    "the adapter was trained on another architecture (check base_model_name_or_path: "
                    f"{printable(repr(self.adapter.config.get('base_model_name_or_path')))})"
                )
                continue
            info = self.info(target)
            if not info.dtype.is_floating_point or info.dtype.itemsize == 1:
                problems.append(
                    f"{file}: {shown} is {info.dtype} in {self.base.name}, not a float of 16 bits or more (a "
                    "quantized model); apply the adapter to the unquantized base model"
                )
                continue
            shape = info.shape
            a = self.adapter.shape(module.a)
            b = self.adapter.shape(module.b)
            if not module.embedding:
                # As PEFT: the layer decides, not the config: GPT-2's Conv1D layers store (in, out)
                # and take the transposed update, nn.Linear layers never do.
                if known:
                    conv1d = arch.fan_in_fan_out and arch.layer_of(target) is not None
                else:
                    conv1d = (
                        module.transpose if len(shape) != 2 or shape[0] == shape[1] else shape == (a[1], b[0])
                    )
                if conv1d != module.transpose:
                    module = replace(module, transpose=conv1d)
                    self.adapter.modules[target] = module
            delta = (a[1], b[0]) if module.embedding or module.transpose else (b[0], a[1])
            if delta != shape:
                problems.append(
                    f"{file}: {shown}: factors A {a} and B {b} give a {delta} change, but the "
                    f"base's tensor is {shape} in {self.base.name}; the adapter was made for a model of "
                    "another size"
                )
        for target, stored in self.adapter.replaced.items():
            if target not in base_keys:
                continue
            have, want = self.adapter.shape(stored), self.base.info(target).shape
            # only a matrix's first dimension may differ (an embedding resized for added tokens)
            if len(have) != len(want) or have[1:] != want[1:] or (len(want) < 2 and have != want):
                problems.append(
                    f"{file}: {printable(stored)} has shape {have}, but {printable(target)} is {want} in "
                    f"{self.base.name}; the adapter was made for a model of another size"
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
