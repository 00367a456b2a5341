"""mergekit-moe's config schema, read and checked whole before any weight is read.

::

    base_model: PATH            # attention, norms, embeddings and lm_head come from it
    gate_mode: hidden           # hidden | cheap_embed | random | uniform_random
    dtype: bfloat16             # optional; default the base's
    experts_per_token: 2        # experts each token is routed to
    architecture: mixtral       # optional: mixtral | qwen2_moe (qwen) | qwen3_moe (qwen3) | deepseek
                                #           | glm4_moe (DeepSeek-V3-style, several shared experts)
    experts:                    # each: source_model, positive_prompts, negative_prompts,
      - source_model: PATH      #       noise_scale, residual_scale
        positive_prompts: [...]
    shared_experts: [...]       # same fields; qwen2_moe takes exactly one, glm4_moe one or more
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith import _yaml
from mergesmith._text import printable
from mergesmith.config import DTYPES, ModelRef
from mergesmith.errors import ConfigError
from mergesmith.moe.layout import MAX_SHARED

__all__ = ["ARCHITECTURES", "GATE_MODES", "Expert", "MoEConfig", "load_moe_config", "read_moe_config"]

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
ARCHITECTURES = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "qwen3": "qwen3_moe",
    "deepseek": "deepseek",
    "glm4_moe": "glm4_moe",
}
TOP_KEYS = (
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
    "base_merge",
)
BASE_MERGE_KEYS = ("merge_method", "parameters")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


@dataclass(frozen=True)
class Expert:
    """One expert: the model its MLP comes from and the prompts that route to it."""

    source: ModelRef
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None
    line: int = 0  # the line of its source_model

    @property
    def label(self) -> str:
        return Path(self.source.path).name or self.source.path


@dataclass(frozen=True)
class MoEConfig:
    """A checked mixture-of-experts config."""

    base: ModelRef
    experts: tuple[Expert, ...]
    shared_experts: tuple[Expert, ...] = ()
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    architecture: str | None = None  # canonical name; None: chosen from the models
    # the tensors outside the experts' MLPs merged from the experts' (with the base as base model)
    # by this method and parameters, instead of copied from the base
    base_merge: tuple[str, Mapping[str, Any]] | None = None
    source: str = "<config>"
    text: str = ""
    lines: Mapping[str, int] = field(default_factory=dict)  # top-level key -> line

    def line(self, key: str) -> str:
        """``line N: `` for a top-level key, empty when unknown."""
        n = self.lines.get(key)
        return f"line {n}: " if n else ""


def load_moe_config(source: str | Path, *, text: str | None = None) -> MoEConfig:
    """Read a mergekit-moe config file (or ``text``) and check its schema; every problem is
    reported at once in one ConfigError with its line."""
    config, problems = read_moe_config(source, text=text)
    if problems:
        raise ConfigError(problems, config.source)
    return config


def read_moe_config(source: str | Path, *, text: str | None = None) -> tuple[MoEConfig, list[str]]:
    """The config as far as it can be read, and the problems of its schema (each with its line),
    for the caller to report together with the problems of the models it names. A YAML file that
    cannot be read at all, or is no mapping, is a ConfigError at once."""
    where = str(source)
    if text is None:
        text = _yaml.read_file(Path(source))
    doc = _yaml.load(text, where=where)
    if not isinstance(doc, Mapping):
        raise ConfigError(
            f"expected a mapping of keys (base_model, experts, gate_mode, ...), found {_yaml.shown(doc)}",
            where,
        )
    if "merge_method" in doc:
        raise ConfigError(
            f"line {_yaml.line_of(doc, 'merge_method')}: this is a merge config (merge_method:), not a "
            "mixture-of-experts config; run it with mergesmith merge",
            where,
        )
    return _Reader(where, text).run(doc)


class _Reader:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text
        self.problems: list[str] = []

    def add(self, container: Any, key: str | int | None, path: str, message: str) -> None:
        line = _yaml.line_of(container, key) if key is not None else getattr(container, "line", None)
        where = f"line {line}: " if line else ""
        self.problems.append(printable(f"{where}{path}: {message}"))

    def run(self, doc: Mapping[str, Any]) -> tuple[MoEConfig, list[str]]:
        for key in doc:
            if key not in TOP_KEYS:
                self.add(doc, key, key, f"unknown key{_suggest(key, TOP_KEYS)}")
        base = self._ref(doc, "base_model", "base_model", required=True)
        gate_mode = self._choice(doc, "gate_mode", GATE_MODES, "hidden")
        arch_name = self._choice(doc, "architecture", tuple(ARCHITECTURES), None)
        dtype = self._dtype(doc)
        per_token = self._per_token(doc)
        experts = self._experts(doc, "experts", required=True)
        shared = self._experts(doc, "shared_experts", required=False)
        arch = ARCHITECTURES[arch_name] if arch_name is not None else None
        if experts and per_token is not None and per_token > len(experts):
            self.add(
                doc,
                "experts_per_token",
                "experts_per_token",
                f"{per_token} experts per token, but the config lists {len(experts)} expert(s); "
                f"route each token to at most {len(experts)}, or add experts",
            )
        self._prompts(doc, gate_mode, experts, shared)
        self._shared(doc, arch, shared)
        base_merge = self._base_merge(doc)
        config = MoEConfig(
            base=base or ModelRef(""),
            experts=tuple(experts),
            shared_experts=tuple(shared),
            gate_mode=gate_mode or "hidden",
            dtype=dtype,
            experts_per_token=per_token or 2,
            architecture=arch,
            base_merge=base_merge,
            source=self.source,
            text=self.text,
            lines=dict(getattr(doc, "lines", {})),
        )
        return config, self.problems

    def _base_merge(self, doc: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
        value = doc.get("base_merge")
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.add(
                doc,
                "base_merge",
                "base_merge",
                f"expected a mapping with merge_method and parameters, found {_yaml.shown(value)}",
            )
            return None
        for key in value:
            if key not in BASE_MERGE_KEYS:
                self.add(value, key, f"base_merge.{key}", f"unknown key{_suggest(str(key), BASE_MERGE_KEYS)}")
        method, params = value.get("merge_method"), value.get("parameters", {})
        if not isinstance(method, str) or not method:
            self.add(
                value,
                "merge_method" if method is not None else None,
                "base_merge.merge_method",
                f"expected the name of a merge method, found {_yaml.shown(method)}",
            )
            return None
        if not isinstance(params, Mapping):
            self.add(
                value,
                "parameters",
                "base_merge.parameters",
                f"expected a mapping, found {_yaml.shown(params)}",
            )
            return None
        return method, params

    def _ref(self, container: Any, key: str, path: str, *, required: bool) -> ModelRef | None:
        value = container.get(key)
        if value is None:
            if required:
                self.add(container, None, path, f"missing {key}: name a model directory or Hub id")
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(container, key, path, f"expected a model path or Hub id, found {_yaml.shown(value)}")
            return None
        return ModelRef.parse(value.strip())

    def _choice(
        self, doc: Mapping[str, Any], key: str, options: tuple[str, ...], default: str | None
    ) -> str | None:
        value = doc.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in options:
            shown = _suggest(str(value), options)
            self.add(
                doc, key, key, f"unknown value {_yaml.shown(value)}{shown}; use one of {', '.join(options)}"
            )
            return default
        return value.lower()

    def _dtype(self, doc: Mapping[str, Any]) -> str | None:
        value = doc.get("dtype")
        if value is None:
            return None
        if not isinstance(value, str) or value.lower() not in DTYPES:
            self.add(
                doc, "dtype", "dtype", f"unknown dtype {_yaml.shown(value)}; use float32, float16 or bfloat16"
            )
            return None
        return DTYPES[value.lower()]

    def _per_token(self, doc: Mapping[str, Any]) -> int | None:
        value = doc.get("experts_per_token")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.add(
                doc,
                "experts_per_token",
                "experts_per_token",
                f"expected a whole number of at least 1, found {_yaml.shown(value)}",
            )
            return None
        return value

    def _experts(self, doc: Mapping[str, Any], key: str, *, required: bool) -> list[Expert]:
        items = doc.get(key)
        if items is None:
            if required:
                self.add(doc, None, key, f"missing {key}: list the expert models (source_model: PATH)")
            return []
        if not isinstance(items, list) or (required and not items):
            self.add(
                doc,
                key,
                key,
                f"expected a list of experts (source_model: PATH, ...), found {_yaml.shown(items)}",
            )
            return []
        out: list[Expert] = []
        for i, item in enumerate(items):
            path = f"{key}[{i}]"
            if not isinstance(item, Mapping):
                self.add(items, i, path, f"expected a mapping with source_model, found {_yaml.shown(item)}")
                continue
            for k in item:
                if k not in EXPERT_KEYS:
                    self.add(item, k, f"{path}.{k}", f"unknown key{_suggest(k, EXPERT_KEYS)}")
            ref = self._ref(item, "source_model", f"{path}.source_model", required=True)
            positive = self._prompt_list(item, "positive_prompts", path)
            negative = self._prompt_list(item, "negative_prompts", path)
            noise = self._number(item, "noise_scale", path)
            residual = self._number(item, "residual_scale", path)
            if ref is not None:
                line = _yaml.line_of(item, "source_model") or int(getattr(item, "line", 0))
                out.append(Expert(ref, positive, negative, noise, residual, line))
        return out

    def _prompt_list(self, item: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        value = item.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            self.add(
                item, key, f"{path}.{key}", f"expected a list of prompt texts, found {_yaml.shown(value)}"
            )
            return ()
        return tuple(value)

    def _number(self, item: Mapping[str, Any], key: str, path: str) -> float | None:
        import math

        value = item.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.add(item, key, f"{path}.{key}", f"expected a finite number, found {_yaml.shown(value)}")
            return None
        return float(value)

    def _prompts(
        self, doc: Mapping[str, Any], mode: str | None, experts: list[Expert], shared: list[Expert]
    ) -> None:
        if mode not in ("hidden", "cheap_embed"):
            return
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                self.problems.append(
                    f"line {e.line}: experts[{i}]: gate_mode {mode} routes by prompts, and this expert has "
                    "no positive_prompts; give a few prompts of what it should handle"
                )
        if (
            len(experts) > 1
            and all(
                (e.positive_prompts, e.negative_prompts)
                == (experts[0].positive_prompts, experts[0].negative_prompts)
                for e in experts[1:]
            )
            and experts[0].positive_prompts
        ):
            self.add(
                doc,
                "experts",
                "experts",
                "every expert has the same prompts, so every gate row would be the same and routing "
                "would not tell them apart; give each expert prompts of its own",
            )
        with_prompts = [bool(e.positive_prompts) for e in shared]
        if any(with_prompts) and not all(with_prompts):
            self.add(
                doc,
                "shared_experts",
                "shared_experts",
                "some shared experts have positive_prompts and some do not; give prompts to all or none",
            )

    def _shared(self, doc: Mapping[str, Any], arch: str | None, shared: list[Expert]) -> None:
        if not shared or arch is None:
            return
        if arch in ("mixtral", "qwen3_moe"):
            self.add(
                doc,
                "shared_experts",
                "shared_experts",
                f"architecture {arch} has no shared experts; remove shared_experts or use "
                "architecture: qwen2_moe (one shared expert)",
            )
        elif arch == "qwen2_moe" and len(shared) != 1:
            self.add(
                doc,
                "shared_experts",
                "shared_experts",
                f"qwen2_moe has exactly one shared expert, the config lists {len(shared)}; keep one",
            )
        elif arch in ("deepseek", "glm4_moe"):
            if arch == "glm4_moe" and len(shared) > MAX_SHARED:
                self.add(
                    doc,
                    "shared_experts",
                    "shared_experts",
                    f"glm4_moe takes at most {MAX_SHARED} shared experts, the config lists {len(shared)}",
                )
            if arch == "deepseek" and len(shared) > 1:
                self.add(
                    doc,
                    "shared_experts",
                    "shared_experts",
                    f"deepseek takes at most one shared expert, the config lists {len(shared)}; keep one",
                )
            for i, e in enumerate(shared):
                if e.positive_prompts or e.negative_prompts:
                    self.problems.append(
                        f"line {e.line}: shared_experts[{i}]: {arch}'s shared experts have no gate, so "
                        "no prompts; remove them (or use architecture: qwen2_moe, whose shared expert has one)"
                    )


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
