"""The merge config: mergekit's YAML schema, parsed and validated whole before any weight is read."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mergesmith import _yaml, chat_templates
from mergesmith._text import printable
from mergesmith.errors import ConfigError, ConfigWarning
from mergesmith.methods import REGISTRY, Method, get_method
from mergesmith.parameters import ParamInfo, check_setting, is_condition_list
from mergesmith.tokenizer_spec import TokenizerSpec, parse_tokenizer

__all__ = [
    "DTYPES",
    "ConfigWarning",
    "MergeConfig",
    "ModelEntry",
    "ModelRef",
    "SliceDef",
    "SliceSource",
    "load_config",
]

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}

CHAT_TEMPLATES = ("auto", *chat_templates.BUILTIN)
MAX_NAME, MAX_PATH = 255, 4096  # bytes of one path component and of a whole path

TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
    "seed",
)


@dataclass(frozen=True)
class ModelRef:
    """A model as written in the config: a local path or a Hub id, with an optional revision."""

    path: str
    revision: str | None = None
    lora: str | None = None  # a PEFT LoRA adapter applied to the model (path or Hub id)
    architecture: str | None = None  # mergekit's override_architecture: used instead of config.json's

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if "+" in text and not _exists(text):
            model, _, adapter = text.partition("+")
            return cls(cls.parse(model).path, cls.parse(model).revision, adapter.strip() or None)
        if "@" in text and not _exists(text):
            path, _, rev = text.rpartition("@")
            return cls(path, rev or None)
        return cls(text)

    @property
    def name(self) -> str:
        """The model as mergekit names it: the path, with @revision when given, without a LoRA."""
        return f"{self.path}@{self.revision}" if self.revision else self.path

    def __str__(self) -> str:
        return f"{self.name}+{self.lora}" if self.lora else self.name


def _exists(text: str) -> bool:
    try:
        return Path(text).exists()
    except (OSError, ValueError):  # a name the file system refuses
        return False


Settings = Mapping[str, Any]


@dataclass(frozen=True)
class ModelEntry:
    ref: ModelRef
    parameters: Settings = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    ref: ModelRef
    layer_range: tuple[int, int]
    parameters: Settings = field(default_factory=dict)


@dataclass(frozen=True)
class SliceDef:
    sources: tuple[SliceSource, ...]
    parameters: Settings = field(default_factory=dict)
    base_model: ModelRef | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config. ``slices`` is None when the config lists whole ``models``."""

    method: str
    base_model: ModelRef | None
    models: tuple[ModelEntry, ...]
    slices: tuple[SliceDef, ...] | None
    parameters: Settings
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    chat_template: str | None
    seed: int
    text: str
    source: str
    tokenizer: TokenizerSpec | None = None  # the tokenizer: section
    warnings: tuple[str, ...] = ()
    # mergekit's modules: the module names the config gives, each with its line (0 when unknown);
    # the one module's models or slices are ``models``/``slices``, its parameters in ``parameters``
    modules: tuple[tuple[str, int], ...] = ()
    # each module's own config (its models or slices, its parameters over the top-level ones), in
    # the config's order; the first is this config's models/slices/parameters
    module_configs: tuple[tuple[str, MergeConfig], ...] = ()

    @property
    def merge_method(self) -> Method[Any, Any]:
        method = get_method(self.method)
        if method is None:  # load_config only builds configs with known methods
            raise ConfigError(f"unknown merge_method {self.method!r}", self.source)
        return method

    def referenced_models(self) -> list[ModelRef]:
        """Every model the config names, base first, each once."""
        refs: list[ModelRef] = []
        if self.base_model is not None:
            refs.append(self.base_model)
        for entry in self.models:
            refs.append(entry.ref)
        for sl in self.slices or ():
            if sl.base_model is not None:
                refs.append(sl.base_model)
            refs += [s.ref for s in sl.sources]
        for _, module in self.module_configs:
            refs += module.referenced_models()
        out: list[ModelRef] = []
        for r in refs:
            if r not in out:
                out.append(r)
        return out


def load_config(source: str | Path | Mapping[str, Any], *, name: str | None = None) -> MergeConfig:
    """Parse and validate a config given as a YAML file path, YAML text or a mapping.

    A mapping read by :func:`mergesmith._yaml.load` is validated as read: its problems name the
    lines of the text it was read from. Every problem is collected and raised together as one
    :class:`ConfigError`.
    """
    if isinstance(source, Mapping):
        where = name or "<config>"
        try:
            text = yaml.safe_dump(
                _plain(source) if isinstance(source, _yaml.LinedDict) else dict(source), sort_keys=False
            )
        except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
            raise ConfigError(
                f"{where}: the config mapping holds a value that is not plain data "
                f"({type(exc).__name__}); use only mappings, lists, text, numbers and booleans"
            ) from None
    elif isinstance(source, Path) or ("\n" not in source and not source.lstrip().startswith("{")):
        path = Path(source)
        text = _yaml.read_file(path)
        where = name or str(path)
    else:
        text = source
        where = name or "<config>"
    doc = (
        source
        if isinstance(source, _yaml.LinedDict)
        else _yaml.load(text, where=where, several=f"this is a file of several merges: {_MULTI}")
    )
    _other_tool(doc, where)
    return _Validator(where, text).run(doc)


_MULTI = "run it with mergesmith multi, which runs each merge in turn"


def _plain(value: Any) -> Any:
    """A document read by :mod:`mergesmith._yaml` as plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _other_tool(doc: Any, where: str) -> None:
    """Refuse, naming the right command, a config written for another mergekit tool."""
    if isinstance(doc, list) and doc and all(isinstance(d, Mapping) and "merge_method" in d for d in doc):
        raise ConfigError(f"the file is a list of {len(doc)} merge configs, not one: {_MULTI}", where)
    if not isinstance(doc, Mapping) or "merge_method" in doc:
        return
    moe = [k for k in ("experts", "gate_mode") if k in doc]
    evolve = [k for k in ("genome", "tasks") if k in doc]
    if moe:
        line = _yaml.line_of(doc, moe[0])
        raise ConfigError(
            f"line {line}: this is a mergekit-moe config (it has {' and '.join(moe)}:), which builds a "
            "mixture-of-experts model; merge and validate take a merge config (merge_method: ...). "
            "Build it with mergesmith moe CONFIG OUT_DIR",
            where,
        )
    if evolve:
        line = _yaml.line_of(doc, evolve[0])
        raise ConfigError(
            f"line {line}: this is a mergekit-evolve config (it has {' and '.join(evolve)}:); "
            "mergesmith's search over merge parameters is mergesmith tune, which takes a merge config "
            "whose searched values are written {search: [low, high]} (see docs/cli.md, section tune)",
            where,
        )


class _Validator:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.prefix = ""  # where models and slices are, for messages: "" or "modules.NAME."

    def warn(self, container: Any, key: str | int | None, path: str, message: str) -> None:
        line = _yaml.line_of(container, key) if key is not None else getattr(container, "line", None)
        where = f"line {line}: " if line else ""
        self.warnings.append(printable(f"{where}{path}: {message}"))

    def add(self, container: Any, key: str | int | None, path: str, message: str) -> None:
        line = _yaml.line_of(container, key) if key is not None else getattr(container, "line", None)
        where = f"line {line}: " if line else ""
        path = printable(path if len(path) <= 200 else path[:200] + "...")
        message = printable(message)
        self.problems.append(f"{where}{path}: {message}" if path else f"{where}{message}")

    def run(self, doc: Any) -> MergeConfig:
        if not isinstance(doc, Mapping):
            raise ConfigError("expected a mapping of keys (merge_method, models, ...)", self.source)
        for key in doc:
            if key not in TOP_KEYS:
                self.add(doc, key, key, f"unknown key{_suggest(key, TOP_KEYS)}")
        tokenizer = parse_tokenizer(self.add, doc)
        if doc.get("tokenizer_source") and doc.get("tokenizer") is not None:
            self.add(
                doc,
                "tokenizer_source",
                "tokenizer_source",
                "give either tokenizer_source or a tokenizer: section, not both; "
                "move the value to tokenizer.source",
            )

        method = self._method(doc)
        base = self._ref(doc, "base_model", "base_model") if doc.get("base_model") is not None else None
        dtype = self._dtype(doc, "dtype")
        out_dtype = self._dtype(doc, "out_dtype")
        params = self._settings(doc, "parameters", "parameters", method, scope="top")
        modules: list[tuple[str, int]] = []
        others: list[tuple[str, Mapping[str, Any], dict[str, Any]]] = []
        if doc.get("modules") is not None:
            doc, params, modules, others = self._modules(doc, method, params)
        first_prefix = self.prefix
        models: list[ModelEntry] = []
        slices: list[SliceDef] | None = None
        has_models, has_slices = bool(doc.get("models")), bool(doc.get("slices"))
        if has_models and has_slices:
            self.add(doc, "slices", f"{self.prefix}slices", "give either models or slices, not both")
        elif has_slices:
            slices = self._slices(doc, method, base)
        elif has_models:
            models = self._models(doc, method, base)
        elif method is not None and doc.get("modules") is None:  # a modules: problem is recorded
            self.add(doc, "merge_method", "", "the config lists no models: add a models: list")

        tokenizer_source = self._tokenizer_source(doc)
        if tokenizer is None and tokenizer_source is not None:  # as mergekit: tokenizer: {source: ...}
            tokenizer = TokenizerSpec(tokenizer_source)
        chat_template = doc.get("chat_template")
        if chat_template is not None and (
            not isinstance(chat_template, str)
            or (chat_template not in CHAT_TEMPLATES and not chat_templates.is_inline(chat_template))
        ):
            self.add(
                doc,
                "chat_template",
                "chat_template",
                f"expected {', '.join(CHAT_TEMPLATES)} or a Jinja template text (with a {{ and 20 characters "
                f"or more), found {_yaml.shown(chat_template)}",
            )
        seed = doc.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            self.add(doc, "seed", "seed", f"expected a whole number >= 0, found {_yaml.shown(seed)}")
            seed = 0
        if method is not None and not self.problems:
            self._check_model_counts(doc, method, base, models, slices)
        parts: list[tuple[str, list[ModelEntry], list[SliceDef] | None, dict[str, Any]]] = []
        for name, module, own in others:  # the modules after the first, each checked as the first
            self.prefix = f"modules.{name}."
            m_slices = self._slices(module, method, base) if module.get("slices") and method else None
            m_models = self._models(module, method, base) if module.get("models") and method else []
            if method is not None and not self.problems:
                view = _yaml.LinedDict(module)  # the module with its parameters over the top-level ones
                view.lines = {k: _yaml.line_of(module, k) or 0 for k in module}
                view.line = getattr(module, "line", 0)
                view["parameters"] = own
                self._check_model_counts(view, method, base, m_models, m_slices)
            parts.append((name, m_models, m_slices, own))
        self.prefix = first_prefix
        if self.problems:
            raise ConfigError(sorted(self.problems, key=_line_key), self.source)
        if method is None:  # _method() has recorded why
            raise ConfigError("merge_method is missing or unknown", self.source)
        for text in self.warnings:
            warnings.warn(f"{printable(self.source)}: {text}", ConfigWarning, stacklevel=3)
        config = MergeConfig(
            method=method.name,
            base_model=base,
            models=tuple(models),
            slices=tuple(slices) if slices is not None else None,
            parameters=params,
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=tokenizer_source,
            chat_template=chat_template,
            seed=seed,
            text=self.text,
            source=self.source,
            tokenizer=tokenizer,
            warnings=tuple(self.warnings),
            modules=tuple(modules),
        )
        if not modules:
            return config
        module_configs = [(modules[0][0], config)] + [
            (
                name,
                replace(
                    config,
                    models=tuple(m_models),
                    slices=tuple(m_slices) if m_slices is not None else None,
                    parameters=own,
                ),
            )
            for name, m_models, m_slices, own in parts
        ]
        return replace(config, module_configs=tuple(module_configs))

    # -- pieces -------------------------------------------------------------------------------

    def _method(self, doc: Mapping[str, Any]) -> Method[Any, Any] | None:
        name = doc.get("merge_method")
        if name is None:
            self.add(doc, None, "merge_method", f"missing; one of: {', '.join(REGISTRY)}")
            return None
        method = get_method(str(name))
        if method is None:
            self.add(
                doc,
                "merge_method",
                "merge_method",
                f"unknown method {_yaml.shown(name)}{_suggest(str(name), REGISTRY)}; "
                f"known methods: {', '.join(REGISTRY)}",
            )
        return method

    def _ref(self, container: Any, key: str | int, path: str) -> ModelRef | None:
        value = container[key]
        lora: str | None = None
        arch: str | None = None
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"model", "lora", "override_architecture"})
            if unknown:
                self.add(
                    container,
                    key,
                    path,
                    f"unknown keys {_yaml.shown(unknown)} in a model reference; use model, lora and "
                    "override_architecture",
                )
                return None
            if value.get("override_architecture") is not None:
                arch = value["override_architecture"]
                if not isinstance(arch, str) or not arch.strip():
                    self.add(
                        value,
                        "override_architecture",
                        f"{path}.override_architecture",
                        f"expected an architecture class name such as LlamaForCausalLM, found {_yaml.shown(arch)}",
                    )
                    return None
                arch = arch.strip()
            if "lora" in value:
                adapter = value["lora"]
                adapter = adapter.get("path") if isinstance(adapter, Mapping) else adapter
                if not isinstance(adapter, str) or not adapter.strip():
                    self.add(
                        container,
                        key,
                        f"{path}.lora",
                        f"expected a LoRA adapter path or Hub id, found {_yaml.shown(adapter)}",
                    )
                    return None
                lora = adapter.strip()
                if self._bad_name(container, key, f"{path}.lora", lora):
                    return None
            inner = value.get("model")
            if isinstance(inner, Mapping):
                where, revision = inner.get("path"), inner.get("revision")
                if isinstance(where, str) and where.strip():
                    if self._bad_name(container, key, path, where.strip()) or (
                        revision and self._bad_name(container, key, f"{path}.revision", str(revision))
                    ):
                        return None
                    return ModelRef(where.strip(), str(revision) if revision else None, lora, arch)
                inner = where
            value = inner
        if not isinstance(value, str) or not value.strip():
            self.add(container, key, path, f"expected a model path or Hub id, found {_yaml.shown(value)}")
            return None
        if self._bad_name(container, key, path, value.strip()):
            return None
        ref = ModelRef.parse(value.strip())
        return ModelRef(ref.path, ref.revision, lora or ref.lora, arch) if lora or arch else ref

    def _bad_name(self, container: Any, key: str | int, path: str, name: str) -> bool:
        """Record a problem when ``name`` cannot be a path or Hub id: a NUL character, or longer
        than file systems allow. (Other control characters can be in a real directory's name; they
        are escaped wherever the name is printed.)"""
        if "\x00" in name:
            problem = (
                "holds a NUL character, which no path or Hub id can hold; write the path or Hub id plainly"
            )
        elif len(name.encode("utf-8", "surrogatepass")) > MAX_PATH or any(
            len(part.encode("utf-8", "surrogatepass")) > MAX_NAME for part in name.split("/")
        ):
            problem = (
                f"is longer than a path can be ({MAX_NAME} bytes a name, {MAX_PATH} in all); "
                "check the path or Hub id"
            )
        else:
            return False
        self.add(container, key, path, f"model reference {_yaml.shown(name)} {problem}")
        return True

    def _dtype(self, doc: Mapping[str, Any], key: str) -> str | None:
        value = doc.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or value.lower() not in DTYPES:
            self.add(
                doc,
                key,
                key,
                f"unknown dtype {_yaml.shown(value)}; use one of float32, float16, bfloat16, float64",
            )
            return None
        return DTYPES[value.lower()]

    def _settings(
        self, container: Any, key: str, path: str, method: Method[Any, Any] | None, scope: str
    ) -> dict[str, Any]:
        value = container.get(key) if isinstance(container, Mapping) else None
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(container, key, path, "expected a mapping of parameter names to values")
            return {}
        if method is None:
            return dict(value)
        shared = {i.key: i for i in method.param_infos}
        per_model = {i.key: i for i in method.model_param_infos}
        known = shared | per_model if scope != "model" else per_model
        kept: dict[str, Any] = {}
        for name, setting in value.items():
            info: ParamInfo | None = known.get(name)
            where = f"{path}.{name}"
            if info is None:
                if scope == "model" and name in shared:
                    self.add(
                        value,
                        name,
                        where,
                        f"{name} applies to the whole merge, not to one model: move it to the "
                        "top-level parameters",
                    )
                    continue
                if name in _every_parameter():
                    whose = f" for {owner}" if (owner := _owner(container, scope)) else ""
                    self.warn(
                        value,
                        name,
                        where,
                        f"{method.name} does not use {name}, so it has no effect{whose} "
                        "(mergekit accepts and ignores it too); remove it to silence this warning",
                    )
                    continue
                self.add(
                    value,
                    name,
                    where,
                    f"unknown parameter for {method.name}{_suggest(name, known)}; "
                    + _parameters_text(method),
                )
                continue
            kept[name] = setting
            for problem in check_setting(info, setting):
                self.add(value, name, where + problem.split(":", 1)[0], problem.split(":", 1)[1].strip())
        return kept

    def _models(
        self, doc: Mapping[str, Any], method: Method[Any, Any] | None, base: ModelRef | None
    ) -> list[ModelEntry]:
        items = doc["models"]
        if not isinstance(items, list):
            self.add(doc, "models", "models", "expected a list of {model: ..., parameters: ...}")
            return []
        out: list[ModelEntry] = []
        for i, item in enumerate(items):
            path = f"{self.prefix}models[{i}]"
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, Mapping) or "model" not in item:
                self.add(items, i, path, "expected {model: ..., parameters: ...}")
                continue
            for key in item:
                if key not in ("model", "parameters"):
                    self.add(
                        item, key, f"{path}.{key}", f"unknown key{_suggest(key, ('model', 'parameters'))}"
                    )
            ref = self._ref(item, "model", f"{path}.model")
            settings = self._settings(item, "parameters", f"{path}.parameters", method, scope="model")
            if ref is not None:
                if any(e.ref == ref for e in out):
                    self.add(items, i, path, f"{ref} is listed twice")
                out.append(ModelEntry(ref, settings))
        return out

    def _slices(
        self, doc: Mapping[str, Any], method: Method[Any, Any] | None, base: ModelRef | None
    ) -> list[SliceDef]:
        items = doc["slices"]
        if not isinstance(items, list):
            self.add(doc, "slices", "slices", "expected a list of {sources: [...]}")
            return []
        out: list[SliceDef] = []
        for i, item in enumerate(items):
            path = f"{self.prefix}slices[{i}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("sources"), list):
                self.add(items, i, path, "expected {sources: [{model: ..., layer_range: [a, b]}]}")
                continue
            for key in item:
                if key == "residual_weight":
                    self.warn(
                        item,
                        key,
                        f"{path}.{key}",
                        "has no effect: mergekit accepts residual_weight and ignores it, and so does "
                        "mergesmith; remove it to silence this warning",
                    )
                elif key not in ("sources", "parameters", "base_model"):
                    self.add(item, key, f"{path}.{key}", "unknown key")
            sources = []
            lengths = set()
            for j, src in enumerate(item["sources"]):
                spath = f"{path}.sources[{j}]"
                if not isinstance(src, Mapping) or "model" not in src:
                    self.add(item["sources"], j, spath, "expected {model: ..., layer_range: [a, b]}")
                    continue
                for key in src:
                    if key not in ("model", "layer_range", "parameters"):
                        self.add(src, key, f"{spath}.{key}", "unknown key")
                ref = self._ref(src, "model", f"{spath}.model")
                lr = src.get("layer_range")
                if (
                    not isinstance(lr, list)
                    or len(lr) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    or lr[0] < 0
                    or lr[1] <= lr[0]
                ):
                    self.add(
                        src,
                        "layer_range" if "layer_range" in src else None,
                        f"{spath}.layer_range",
                        f"expected [first, end) with 0 <= first < end, found {_yaml.shown(lr)}",
                    )
                    continue
                lengths.add(lr[1] - lr[0])
                settings = self._settings(src, "parameters", f"{spath}.parameters", method, scope="model")
                if ref is not None:
                    sources.append(SliceSource(ref, (lr[0], lr[1]), settings))
            if len(lengths) > 1:
                self.add(
                    items,
                    i,
                    path,
                    f"its sources cover different numbers of layers {sorted(lengths)}; "
                    "every source of a slice needs a layer_range of the same length",
                )
            slice_base = (
                self._ref(item, "base_model", f"{path}.base_model") if item.get("base_model") else None
            )
            settings = self._settings(item, "parameters", f"{path}.parameters", method, scope="slice")
            out.append(SliceDef(tuple(sources), settings, slice_base))
        return out

    def _modules(
        self, doc: Mapping[str, Any], method: Method[Any, Any] | None, params: dict[str, Any]
    ) -> tuple[
        Mapping[str, Any],
        dict[str, Any],
        list[tuple[str, int]],
        list[tuple[str, Mapping[str, Any], dict[str, Any]]],
    ]:
        """mergekit's ``modules: {NAME: {models | slices, parameters}}``. The first module's models
        or slices stand for the config's, its parameters over the top-level ones (a condition list
        that matches no tensor falls through to them, as in mergekit); the other modules come back
        as (name, mapping, parameters) to be checked the same way. Whether the names are the
        architecture's modules is checked once the models are open."""
        block = doc["modules"]
        if doc.get("models") or doc.get("slices"):
            self.add(doc, "modules", "modules", "give one of models, slices or modules, not several")
            return doc, params, [], []
        if not isinstance(block, Mapping) or not block:
            self.add(
                doc,
                "modules",
                "modules",
                "expected a mapping of module names to {models: [...]} or {slices: [...]}",
            )
            return doc, params, [], []
        names: list[tuple[str, int]] = []
        chosen: Mapping[str, Any] | None = None
        others: list[tuple[str, Mapping[str, Any], dict[str, Any]]] = []
        for name, module in block.items():
            names.append((name, _yaml.line_of(block, name) or 0))
            path = f"modules.{name}"
            if not isinstance(module, Mapping):
                self.add(
                    block, name, path, "expected {models: [...]} or {slices: [...]}, with optional parameters"
                )
                continue
            for key in module:
                if key not in ("models", "slices", "parameters", "name"):
                    self.add(
                        module,
                        key,
                        f"{path}.{key}",
                        f"unknown key{_suggest(key, ('models', 'slices', 'parameters'))}",
                    )
            if bool(module.get("models")) == bool(module.get("slices")):
                self.add(block, name, path, "give either models or slices (one of them, not both)")
                continue
            own = self._settings(module, "parameters", f"{path}.parameters", method, scope="top")
            merged = {**params, **{k: _over(v, params.get(k)) for k, v in own.items()}}
            if chosen is None:
                chosen = module
                self.prefix = f"{path}."
                first = merged
            else:
                others.append((str(name), module, merged))
        if chosen is None:
            return doc, params, names, others
        params = first
        rewritten = _yaml.LinedDict({k: v for k, v in doc.items() if k != "modules"})
        rewritten.lines = {k: _yaml.line_of(doc, k) or 0 for k in doc}
        rewritten.line = getattr(doc, "line", 0)
        for key in ("models", "slices"):
            if chosen.get(key):
                rewritten[key] = chosen[key]
                rewritten.lines[key] = _yaml.line_of(chosen, key) or 0
        rewritten["parameters"] = params
        return rewritten, params, names, others

    def _tokenizer_source(self, doc: Mapping[str, Any]) -> str | None:
        value = doc.get("tokenizer_source")
        block = doc.get("tokenizer")
        if value is None and isinstance(block, Mapping):
            value = block.get("source", "union")
            if not isinstance(value, str):  # the tokenizer: section's check reports it
                return None
        if value is None:
            return None
        if not isinstance(value, str):
            self.add(
                doc,
                "tokenizer_source",
                "tokenizer_source",
                f"expected base or a model, found {_yaml.shown(value)}",
            )
            return None
        return value

    def _check_model_counts(
        self,
        doc: Mapping[str, Any],
        method: Method[Any, Any],
        base: ModelRef | None,
        models: list[ModelEntry],
        slices: list[SliceDef] | None,
    ) -> None:
        groups: list[tuple[str, list[ModelRef], ModelRef | None]] = []
        if slices is None:
            groups.append(("models", [m.ref for m in models], base))
        else:
            for i, sl in enumerate(slices):
                groups.append((f"slices[{i}].sources", [s.ref for s in sl.sources], sl.base_model or base))
        for where, refs, group_base in groups:
            base_missing = group_base is not None and group_base not in refs
            if method.base == "required" and slices is not None and base_missing:
                self.add(
                    doc,
                    "slices",
                    where,
                    f"{method.name} needs the base model {group_base} among the slice's sources, "
                    "with the same layer_range as the others",
                )
                continue
            if method.base == "optional":
                others = [r for r in refs if r != group_base]
            elif method.base == "required":
                if group_base is None:
                    self.add(
                        doc,
                        "merge_method",
                        "base_model",
                        f"{method.name} needs a base_model: add base_model: <the model the others were fine-tuned from>",
                    )
                    return
                others = [r for r in refs if r != group_base]
            else:
                others = refs
            n = len(others)
            lo, hi = method.min_models, method.max_models
            if n < lo or (hi is not None and n > hi):
                self.add(
                    doc,
                    "slices" if slices is not None else "models",
                    where,
                    f"{method.name} takes {method.models_text()}; found {n}",
                )
        top = doc.get("parameters") if isinstance(doc.get("parameters"), Mapping) else {}
        for info in method.param_infos:
            if not info.required or info.key in (top or {}):
                continue
            if slices and all(info.key in sl.parameters for sl in slices):
                continue
            self.add(
                doc,
                "merge_method",
                f"parameters.{info.key}",
                f"missing: {method.name} needs {info.key} ({info.doc}); add it under parameters:",
            )
        if slices is None and (method.base != "required" or base is not None):
            self._check_weights(doc, method, models, base if method.base != "unused" else None)

    def _check_weights(
        self,
        doc: Mapping[str, Any],
        method: Method[Any, Any],
        models: list[ModelEntry],
        base: ModelRef | None,
    ) -> None:
        """Required per-model parameters must be given somewhere; scalar weights must not sum to 0."""
        top = doc.get("parameters") if isinstance(doc.get("parameters"), Mapping) else {}
        normalize_info = next((i for i in method.param_infos if i.key == "normalize"), None)
        for info in method.model_param_infos:
            if not info.required:
                continue
            for i, entry in enumerate(models):
                if entry.ref == base:
                    continue
                if info.key not in entry.parameters and info.key not in (top or {}):
                    self.add(
                        doc["models"],
                        i,
                        f"{self.prefix}models[{i}].parameters.{info.key}",
                        f"missing: {method.name} needs a {info.key} for {entry.ref} ({info.doc})",
                    )
        if normalize_info is None or method.base != "unused":
            return
        normalize = (top or {}).get("normalize", normalize_info.default)
        weights = []
        for entry in models:
            w = entry.parameters.get("weight", (top or {}).get("weight"))
            if isinstance(w, (int, float)) and not isinstance(w, bool):
                weights.append(float(w))
            else:
                return
        if normalize is True and weights and sum(weights) == 0:
            self.add(
                doc,
                "models",
                "models",
                "the weights sum to 0 and normalize is true, which divides by "
                "zero: change the weights or set normalize: false",
            )


def _over(setting: Any, below: Any) -> Any:
    """``setting`` in place of ``below``, the setting of the scope under it; a condition list
    without a catch-all falls through to ``below`` for the tensors it does not match."""
    if below is None or not is_condition_list(setting):
        return setting
    if any(isinstance(c, Mapping) and c.get("filter") in (None, "*") for c in setting):
        return setting
    return [*setting, *(below if is_condition_list(below) else [{"value": below}])]


def _every_parameter() -> set[str]:
    """Every parameter name some method takes: mergekit accepts any of them anywhere."""
    names: set[str] = set()
    for method in REGISTRY.values():
        names |= {i.key for i in method.param_infos} | {i.key for i in method.model_param_infos}
    return names


def _owner(container: Any, scope: str) -> str | None:
    """The model a per-model setting belongs to, as written, for a message."""
    if scope != "model" or not isinstance(container, Mapping):
        return None
    model = container.get("model")
    if isinstance(model, Mapping):
        model = model.get("model")
        model = model.get("path") if isinstance(model, Mapping) else model
    return str(model) if isinstance(model, str) else None


def _parameters_text(method: Method[Any, Any]) -> str:
    per_model = ", ".join(i.key for i in method.model_param_infos) or "none"
    shared = ", ".join(i.key for i in method.param_infos) or "none"
    return (
        f"its per-model parameters: {per_model}; its merge-wide parameters (top-level parameters:): {shared}"
    )


def _line_key(problem: str) -> int:
    if problem.startswith("line "):
        number = problem[5:].split(":", 1)[0]
        if number.isdigit():
            return int(number)
    return 0


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
