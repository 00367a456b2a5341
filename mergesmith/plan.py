"""From a validated config to a plan: the list of per-tensor jobs a merge will run.

Planning reads only headers and ``config.json`` files. Every problem it finds (missing tensors,
shape mismatches, different architectures, unresolved parameters) is gathered and reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesmith import _hub, _yaml, defaults
from mergesmith._json import read_json
from mergesmith._text import printable
from mergesmith.architecture import (
    Architecture,
    architecture_for,
    compatibility_keys,
    layer_count_keys,
    per_layer_keys,
)
from mergesmith.config import MergeConfig, ModelRef, SliceDef
from mergesmith.errors import CheckpointError, CompatibilityError, ConfigError
from mergesmith.methods import Method
from mergesmith.parameters import REQUIRED, is_condition_list, resolve
from mergesmith.sources import Checkpoint, TensorInfo
from mergesmith.vocab import Fill, Key, Permute, RowMap, Vocab, align, read_vocab, union_keys

__all__ = ["InputRef", "Job", "Plan", "build_plan", "parse_size"]

DEFAULT_SHARD = defaults.SHARD_SIZE
COPY = "copy"
ALIGN_HINT = (
    "Set tokenizer_source (base, union or one model's name) to match embedding rows by token, or "
    "merge models that share one tokenizer"
)


@dataclass(frozen=True)
class Alignment:
    """Embedding rows matched by token: the output's row keys and each model's row for them."""

    keys: list[Key]
    vocabs: list[Vocab | None]  # per model
    maps: list[torch.Tensor]  # per model: its row for each output row, -1 where it lacks the token
    union: bool  # the output tokenizer gains tokens (a union, or tokenizer.tokens it lacks)
    rows: int = 0  # output rows, padding included (tokenizer.pad_to_multiple_of); 0: len(keys)
    fills: dict[int, Fill] | None = None  # with a tokenizer: section: its tokens' default rows

    @property
    def size(self) -> int:
        return self.rows or len(self.keys)


@dataclass(frozen=True)
class InputRef:
    """One input tensor: which model (index into ``Plan.models``) and its name there."""

    model: int
    name: str


@dataclass(frozen=True)
class Job:
    """How to make one output tensor."""

    name: str
    shape: tuple[int, ...]
    method: str
    base: InputRef | None
    inputs: tuple[InputRef, ...]
    params: Mapping[str, Any]
    model_params: tuple[Mapping[str, Any], ...]
    layer: int | None
    t: float
    out_dtype: torch.dtype
    rows: RowMap | None = None  # vocabulary tensors whose rows are matched by token

    @property
    def nbytes(self) -> int:
        n = self.out_dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def all_inputs(self) -> tuple[InputRef, ...]:
        return ((self.base,) if self.base is not None else ()) + self.inputs


@dataclass(frozen=True)
class _ParamSource:
    """Where a job's parameters are resolved: the scopes of the output tensor's merge-wide
    parameters, and per input model its tensor's name and the scopes of its parameters."""

    shared: tuple[Mapping[str, Any], ...]
    inputs: tuple[tuple[int, str, tuple[Mapping[str, Any], ...]], ...]


@dataclass
class Plan:
    """Everything a merge needs to run, decided from headers alone."""

    config: MergeConfig
    method: Method[Any, Any]
    refs: list[ModelRef]
    models: list[Checkpoint]
    reference: int
    tokenizer_model: int | None
    arch: Architecture
    jobs: list[Job]
    out_config: dict[str, Any]
    compute_dtype: torch.dtype | None
    shards: list[list[int]] = field(default_factory=list)
    vocab: Alignment | None = None
    shard_limit: int = DEFAULT_SHARD  # the largest shard asked for, which packed ``shards``
    # per job name, in the order planned: where its parameters were resolved (none for copied tensors)
    sources: dict[str, _ParamSource] = field(default_factory=dict, repr=False)

    def with_parameters(self, config: MergeConfig) -> Plan:
        """This plan with the parameter values of ``config``, a config that differs from the plan's
        in its parameters' numbers only: the models, their headers and tokenizers and every job's
        inputs are kept, each job's parameters are resolved again and checked as build_plan checks
        them (a ConfigError naming every problem). A config that differs in anything else is a
        ValueError: it needs build_plan."""
        if _layout(config) != _layout(self.config):
            raise ValueError("the config differs from the plan's in more than its parameter values")
        new_scopes = {id(old): new for old, new in zip(_scopes(self.config), _scopes(config))}
        problems: list[str] = []
        seen: set[str] = set()

        def problem(text: str, key: str) -> None:
            if key not in seen:
                seen.add(key)
                problems.append(text)

        by_name = {job.name: job for job in self.jobs}
        sources: dict[str, _ParamSource] = {}
        resolved: dict[str, Job] = {}
        for out_name, old in self.sources.items():  # in the order planned, as problems are found
            source = _ParamSource(
                tuple(new_scopes[id(s)] for s in old.shared),
                tuple((m, name, tuple(new_scopes[id(s)] for s in scopes)) for m, name, scopes in old.inputs),
            )
            job = by_name[out_name]
            shared, per_model = _resolve_params(self.method, self.refs, out_name, job.t, source, problem)
            resolved[out_name] = dataclasses.replace(job, params=shared, model_params=tuple(per_model))
            sources[out_name] = source
        jobs = [resolved.get(job.name, job) for job in self.jobs]
        problems += _density_problems(self.method, self.refs, jobs)
        if problems:
            raise ConfigError(problems, config.source)
        return dataclasses.replace(self, config=config, jobs=jobs, sources=sources)

    @property
    def read_bytes(self) -> int:
        seen: set[tuple[int, str]] = set()
        total = 0
        for job in self.jobs:
            for ref in job.all_inputs():
                if (ref.model, ref.name) not in seen:
                    seen.add((ref.model, ref.name))
                    total += self.models[ref.model].info(ref.name).nbytes
        return total

    @property
    def write_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    def __repr__(self) -> str:
        models = ", ".join(map(str, self.refs))
        return (
            f"<Plan {self.method.name} of {len(self.refs)} model{'s' if len(self.refs) != 1 else ''} "
            f"({models}): {len(self.jobs)} tensors in {len(self.shards)} shard"
            f"{'s' if len(self.shards) != 1 else ''}, {self.write_bytes / 1e6:.1f} MB>"
        )

    def whole_model_jobs(self) -> list[Job]:
        """The jobs whose method trims each model over its whole task vector."""
        return whole_model_jobs(self.method, self.jobs)

    def whole_model_densities(self) -> dict[int, float]:
        """For a method trimming over whole models: each trimmed model's density (else empty)."""
        return {m: values.pop() for m, values in _densities(self.whole_model_jobs()).items()}

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def describe(self) -> str:
        """A human-readable listing of the plan: inputs, then each output tensor."""
        lines = [f"method: {self.method.name}", "models:"]
        for i, (ref, ckpt) in enumerate(zip(self.refs, self.models)):
            role = " (base)" if self.config.base_model == ref else ""
            lines.append(f"  [{i}] {ref}{role}: {ckpt.dir} ({len(ckpt.keys())} tensors)")
        lines.append(
            f"{len(self.jobs)} output tensors in {len(self.shards)} shard(s); "
            f"reads {_gb(self.read_bytes)}, writes {_gb(self.write_bytes)}"
        )
        for job in self.jobs:
            lines.append("  " + describe_job(job, self.refs))
        return "\n".join(lines)


def describe_job(job: Job, refs: Sequence[ModelRef]) -> str:
    shape = "x".join(map(str, job.shape)) or "scalar"
    layer = f" layer {job.layer} (t={job.t:.3g})" if job.layer is not None else ""
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
    per = []
    for ref, mp in zip(job.inputs, job.model_params):
        if mp:
            per.append(f"{refs[ref.model]}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in mp.items()))
    parts = [p for p in (params, "; ".join(per)) if p]
    return f"{job.name} [{shape} {str(job.out_dtype).replace('torch.', '')}] {job.method}{layer}" + (
        f" ({'; '.join(parts)})" if parts else ""
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def parse_size(text: str | int) -> int:
    """Parse a size such as ``5GB``, ``500MB``, ``2GiB`` or a number of bytes: a finite number of
    at least one byte, else a ConfigError."""
    fix = "write it like 5GB, 500MB or 2GiB"
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"cannot read size {_yaml.shown(text)}: it is not a number of bytes or text; {fix}")
    if isinstance(text, int):
        if text < 1:
            raise ConfigError(f"size {_yaml.shown(text)} must be at least one byte; {fix}")
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    number, mult = s, 1
    for unit, size in units.items():
        if s.endswith(unit):
            number, mult = s[: -len(unit)], size
            break
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"cannot read size {_yaml.shown(text)}; {fix}") from None
    if not math.isfinite(value * mult):
        raise ConfigError(f"size {_yaml.shown(text)} is not a finite number; {fix}")
    if value * mult < 1:
        raise ConfigError(f"size {_yaml.shown(text)} must be at least one byte; {fix}")
    return int(value * mult)


def whole_model_jobs(method: Method[Any, Any], jobs: Sequence[Job]) -> list[Job]:
    """The jobs of ``method`` whose parameters make it trim over whole models."""
    trim = method.whole_model_trim
    if trim is None:
        return []
    return [j for j in jobs if j.method == method.name and trim(method.build_params(j.params))]


def _density_problems(method: Method[Any, Any], refs: Sequence[ModelRef], jobs: Sequence[Job]) -> list[str]:
    """A method that trims over the whole model needs one density per model."""
    return [
        f"{refs[model]}: density varies across tensors ({', '.join(map(str, sorted(values)))}), "
        f"but {method.name} trims over the whole model here and needs one density per "
        "model; give it a single value"
        for model, values in _densities(whole_model_jobs(method, jobs)).items()
        if len(values) > 1
    ]


def _densities(jobs: Sequence[Job]) -> dict[int, set[float]]:
    """Every density each model is given across ``jobs``."""
    seen: dict[int, set[float]] = {}
    for job in jobs:
        for ref, mp in zip(job.inputs, job.model_params):
            seen.setdefault(ref.model, set()).add(float(mp.get("density", 1.0)))
    return seen


# -- building -------------------------------------------------------------------------------------


def open_models(refs: Sequence[ModelRef]) -> list[Checkpoint]:
    """Resolve and open every referenced model, reporting every failure together."""
    models: list[Checkpoint] = []
    problems: list[str] = []
    for ref in refs:
        try:
            directory = _hub.resolve(ref.path, ref.revision)
            model = Checkpoint(directory, name=str(ref))
            if ref.lora:
                from mergesmith.lora import AdaptedCheckpoint, read_adapter

                adapter = read_adapter(_hub.resolve(ref.lora))
                model = AdaptedCheckpoint(model, adapter, name=str(ref))
            models.append(model)
        except CheckpointError as exc:
            problems += exc.problems
    if problems:
        raise CheckpointError(problems)
    return models


def build_plan(config: MergeConfig, *, max_shard_size: int | str = DEFAULT_SHARD) -> Plan:
    """Open the inputs' headers and plan every output tensor, or raise with every problem found."""
    method = config.merge_method
    refs = config.referenced_models()
    models = open_models(refs)
    reference = 0
    overrides = sorted({r.architecture for r in refs if r.architecture})
    if len(overrides) > 1:
        raise ConfigError(
            f"the models name different override_architecture values ({', '.join(overrides)}); "
            "mergesmith merges models of one architecture: give them all the same one",
            config.source,
        )
    arch = architecture_for(
        models[reference].config, overrides[0] if overrides else None, keys=models[reference].keys()
    )
    _check_modules(config, arch)
    planner = _Planner(config, method, refs, models, reference, arch)
    plan = planner.build()
    plan.shard_limit = parse_size(max_shard_size)
    plan.shards = _pack(plan.jobs, plan.shard_limit)
    from mergesmith.execute import PROCESSOR_FILES, side_files

    for model, names in side_files(plan):  # the files a merge copies must be safe to copy
        for name in names:
            path = model.side_file(name)
            if path is not None and name in PROCESSOR_FILES:
                read_json(path, fix=f"repair {name} or download the model again")
    return plan


def _check_modules(config: MergeConfig, arch: Architecture) -> None:
    """The module names of a ``modules:`` config must be the architecture's (mergekit's names), and
    name every module of it: mergekit writes only the modules named, a checkpoint that does not load."""
    known = ", ".join(arch.modules)
    problems = [
        f"{f'line {line}: ' if line else ''}modules.{printable(name)}: the {arch.name} architecture has no "
        f"module {printable(repr(name))}; its modules: {known}"
        for name, line in config.modules
        if name not in arch.modules
    ]
    named = {name for name, _ in config.modules}
    missing = [m for m in arch.modules if m not in named]
    if not problems and config.modules and missing:
        problems.append(
            f"{f'line {config.modules[0][1]}: ' if config.modules[0][1] else ''}modules: the {arch.name} "
            f"architecture's module{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'are' if len(missing) > 1 else 'is'} not given; name every module ({known}), as the output "
            "holds the tensors of every module"
        )
    if not config.modules and config.slices is not None and len(arch.parts) > 1:
        problems.append(
            f"slices: the {arch.name} architecture has several modules ({known}); give slices per module "
            "under modules:"
        )
    if problems:
        raise ConfigError(problems, config.source)


class _Planner:
    def __init__(
        self,
        config: MergeConfig,
        method: Method[Any, Any],
        refs: list[ModelRef],
        models: list[Checkpoint],
        reference: int,
        arch: Architecture,
    ) -> None:
        self.config = config
        self.method = method
        self.refs = refs
        self.models = models
        self.reference = reference
        self.arch = arch
        self.whole_arch = arch
        self.only: str | None = None  # the module being planned, where the architecture has several
        self.module_layers: dict[str, list[tuple[int, int]]] = {}  # a sliced module's count key, its layers
        self.problems: list[str] = []
        self.config_problems: list[str] = []
        self.misfits: set[int] = set()  # models whose config.json already disagrees
        self._seen_problems: set[str] = set()
        self._alignment: Alignment | bool | None = False  # False: not worked out yet
        self._key_cache: dict[int, set[str]] = {}
        self._layer_cache: dict[tuple[str, int], list[int]] = {}
        self.sources: dict[str, _ParamSource] = {}
        self.compute_dtype = getattr(torch, config.dtype) if config.dtype else None
        out_name = config.out_dtype or config.dtype
        self.out_dtype: torch.dtype | None = getattr(torch, out_name) if out_name else None

    def problem(self, text: str, key: str | None = None, *, config: bool = False) -> None:
        """Record a problem once; ``config`` marks one that the config, not the models, must fix."""
        key = key or text
        if key not in self._seen_problems:
            self._seen_problems.add(key)
            (self.config_problems if config else self.problems).append(text)

    def index(self, ref: ModelRef) -> int:
        return self.refs.index(ref)

    def build(self) -> Plan:
        self.check_configs()
        layers = None
        if len(self.arch.parts) > 1:
            jobs = self.plan_modules()
        elif self.config.slices is None:
            jobs = self.plan_models()
        else:
            jobs, layers = self.plan_slices(self.config.slices)
        out_config = json.loads(json.dumps(self.models[self.reference].config))
        # the only quantized inputs read are FP8 ones, dequantized as read: the output is not quantized
        for cfg in (out_config, out_config.get("text_config")):
            if isinstance(cfg, dict):
                cfg.pop("quantization_config", None)
        if self.refs[self.reference].architecture:  # as mergekit, the override is what is written
            out_config["architectures"] = [self.refs[self.reference].architecture]
        if layers is not None:
            self.renumber_config(out_config, layers)
        for key, stacked in self.module_layers.items():
            _set_path(out_config, key, len(stacked))
            self.renumber_lists(out_config, key.rpartition(".")[0], stacked)
        alignment = self._alignment if isinstance(self._alignment, Alignment) else None
        if alignment is not None:
            for key in VOCAB_SIZE_KEYS:
                _set_path(out_config, key, alignment.size)
        self.check_whole_model_density(jobs)
        if self.problems:
            raise CompatibilityError(self.problems + self.config_problems)
        if self.config_problems:
            raise ConfigError(self.config_problems, self.config.source)
        planned = {j.name for j in jobs}
        dtypes = {j.out_dtype for j in jobs if j.out_dtype.is_floating_point}
        if len(dtypes) == 1:
            name = str(dtypes.pop()).replace("torch.", "")
            for key in ("torch_dtype", "dtype"):
                if key in out_config or key == "torch_dtype":
                    out_config[key] = name
        return Plan(
            config=self.config,
            method=self.method,
            refs=self.refs,
            models=self.models,
            reference=self.reference,
            tokenizer_model=self.tokenizer_model(),
            arch=self.arch,
            jobs=jobs,
            out_config=out_config,
            compute_dtype=self.compute_dtype,
            vocab=alignment,
            sources={name: source for name, source in self.sources.items() if name in planned},
        )

    def tokenizer_model(self) -> int | None:
        source = self.config.tokenizer_source
        if source is None or source in ("base", "union"):
            base = self.config.base_model
            return self.index(base) if base is not None and base in self.refs else self.reference
        for i, ref in enumerate(self.refs):
            if source in (str(ref), ref.path):
                return i
        raise ConfigError(
            f"tokenizer_source {_yaml.shown(source)} is not one of the input models ({', '.join(map(str, self.refs))}); "
            "use base or one of them",
            self.config.source,
        )

    # -- checks ---------------------------------------------------------------------------------

    def check_configs(self) -> None:
        ref_model = self.models[self.reference]
        ref_cfg = ref_model.config
        keys = list(compatibility_keys())
        if self.config.slices is None:
            keys += layer_count_keys()
        for i, model in enumerate(self.models):
            if i == self.reference or not model.config or not ref_cfg:
                continue
            for key in keys:
                a, b = ref_cfg.get(key), model.config.get(key)
                if a is not None and b is not None and a != b:
                    what = "architectures" if key == "model_type" else "sizes"
                    self.misfits.add(i)
                    self.problem(
                        f"{key}: {self.refs[i]} ({model.dir / 'config.json'}) has {b!r}, but "
                        f"{self.refs[self.reference]} has {a!r}: these models have different {what} and "
                        "cannot be merged tensor by tensor; merge only fine-tunes of one base model"
                    )
            for key in VOCAB_SIZE_KEYS:  # a vision-language model keeps it in its text_config
                a, b = (
                    _get_path(ref_cfg, key.rpartition(".")[0]).get("vocab_size"),
                    _get_path(model.config, key.rpartition(".")[0]).get("vocab_size"),
                )
                if a is not None and b is not None and a != b and self.config.tokenizer_source is None:
                    self.problem(
                        f"{key}: {self.refs[i]} has {b}, but {self.refs[self.reference]} has {a}: the "
                        "vocabularies differ (added tokens?); merging embeddings row by row would mix "
                        f"unrelated tokens. {ALIGN_HINT}",
                        key="vocab-size",
                    )
        if self.config.tokenizer_source is None:
            self.check_same_tokens()

    def check_same_tokens(self) -> None:
        """Without tokenizer_source, the models' tokenizers must give every token the same id."""
        vocabs = [(i, read_vocab(m.dir)) for i, m in enumerate(self.models)]
        known = [(i, v) for i, v in vocabs if v is not None]
        for i, v in known[1:]:
            j, first = known[0]
            moved = [t for t, k in first.ids.items() if v.ids.get(t, k) != k]
            if moved:
                t = moved[0]
                self.problem(
                    f"tokenizers differ: {t!r} is token {first.ids[t]} in {self.refs[j]} ({first.file}) but "
                    f"{v.ids[t]} in {self.refs[i]} ({v.file}), and {len(moved) - 1} more; merging embeddings "
                    f"row by row would mix unrelated tokens. {ALIGN_HINT}",
                    key="vocab-size",
                )
                return

    def alignment(self) -> Alignment | None:
        """Matching of vocabulary rows by token, when tokenizer_source asks for it and rows differ."""
        if self._alignment is not False:
            return self._alignment if isinstance(self._alignment, Alignment) else None
        self._alignment = None
        source = self.config.tokenizer_source
        if source is None:
            return None
        rows: list[int] = []
        for i, model in enumerate(self.models):
            name = next((n for n in self.arch.vocab_weights if self.lookup(i, n)), None)
            found = self.lookup(i, name) if name else None
            rows.append(model.info(found).shape[0] if found else 0)
        vocabs = [read_vocab(m.dir) for m in self.models]
        missing = [self.refs[i] for i, v in enumerate(vocabs) if v is None and rows[i]]
        if missing:
            self.problem(
                f"tokenizer_source {_yaml.shown(source)}: {', '.join(map(str, missing))} has no tokenizer.json or vocab.json, "
                "so its embedding rows cannot be matched by token; add its tokenizer files or remove "
                "tokenizer_source",
                key="vocab-missing",
            )
            return None
        keys = [v.keys(r) if v is not None else [] for v, r in zip(vocabs, rows)]
        spec = self.config.tokenizer
        if spec is None and all(k == keys[0] for k in keys):
            return None
        chosen = self.tokenizer_model()
        assert chosen is not None
        extra = []
        if spec is not None:
            known = set(keys[chosen])
            extra = [
                t
                for t in spec.tokens
                if t not in known and not (source == "union" and any(t in k for k in keys))
            ]
        if source == "union" or extra:
            first = vocabs[chosen]
            if first is None or first.file.name != "tokenizer.json":
                self.problem(
                    (
                        f"tokenizer_source union: {self.refs[chosen]} has no tokenizer.json to extend with the "
                        "other models' tokens; use tokenizer_source: base or one model's name"
                    )
                    if source == "union"
                    else (
                        f"tokenizer.tokens: {self.refs[chosen]} has no tokenizer.json to add "
                        f"{_yaml.shown(extra[0])} to; list only tokens its tokenizer has"
                    ),
                    key="vocab-missing",
                )
                return None
        if source == "union":
            out_keys = union_keys(keys[chosen], [k for i, k in enumerate(keys) if i != chosen])
        else:
            out_keys = keys[chosen]
        if spec is None:
            self._alignment = Alignment(out_keys, vocabs, align(out_keys, keys), source == "union")
            return self._alignment
        # a tokenizer: section: the output holds only the tokens (no padding rows past them), then
        # the configured tokens the chosen vocabulary lacks, then padding to the multiple asked for
        while out_keys and not isinstance(out_keys[-1], str):
            out_keys = out_keys[:-1]
        out_keys = [*out_keys, *extra]
        size = len(out_keys)
        pad = spec.pad_to_multiple_of
        if pad and size % pad:
            size += pad - size % pad
        if all(k == out_keys for k in keys) and size == len(out_keys) and not spec.tokens:
            return None
        maps = align(out_keys, keys)
        fills = self.token_fills(out_keys, vocabs, maps, rows)
        self._alignment = Alignment(
            out_keys, vocabs, maps, source == "union" or bool(extra), rows=size, fills=fills
        )
        return self._alignment

    def token_fills(
        self, out_keys: list[Key], vocabs: list[Vocab | None], maps: list[torch.Tensor], rows: list[int]
    ) -> dict[int, Fill]:
        """The default row of each token the tokenizer: section configures, by output row (a
        source that names no input model or token is recorded as a config problem and left out)."""
        spec = self.config.tokenizer
        assert spec is not None
        where = {k: i for i, k in enumerate(out_keys)}
        fills: dict[int, Fill] = {}
        for token, entry in spec.tokens.items():
            out_row = where[token]
            src = entry.source
            assert src is not None
            path = f"tokenizer.tokens.{printable(token)}.source"
            if src.kind == "zero":
                fills[out_row] = Fill(None, 0, entry.force)
                continue
            assert src.model is not None
            model = next((i for i, r in enumerate(self.refs) if src.model in (str(r), r.path)), None)
            if model is None:
                self.problem(
                    f"{path}: {_yaml.shown(src.model)} is not one of the input models "
                    f"({', '.join(map(str, self.refs))}); name one of them",
                    config=True,
                )
                continue
            vocab = vocabs[model]
            if src.kind == "model":
                row = int(maps[model][out_row])
                needed = entry.force or any(int(m[out_row]) < 0 for m in maps)
                if row < 0 and needed:
                    self.problem(
                        f"{path}: {self.refs[model]} has no token {_yaml.shown(token)}; name a model "
                        "that has it, or use {kind: model_token, model: ..., token: ...}",
                        config=True,
                    )
                    continue
            elif src.token is not None:
                row = vocab.ids.get(src.token, -1) if vocab is not None else -1
                if row < 0 or row >= rows[model]:
                    self.problem(
                        f"{path}.token: {self.refs[model]} has no token {_yaml.shown(src.token)}; "
                        "name a token of its tokenizer",
                        config=True,
                    )
                    continue
            else:
                assert src.token_id is not None
                row = src.token_id
                if row >= rows[model]:
                    self.problem(
                        f"{path}.token_id: {row} is past the {rows[model]} embedding rows of "
                        f"{self.refs[model]}; give a row number below {rows[model]}",
                        config=True,
                    )
                    continue
            fills[out_row] = Fill(model, row, entry.force)
        return fills

    def lookup(self, model: int, name: str) -> str | None:
        """The name under which ``model`` stores tensor ``name`` (tied weights resolved), or None."""
        keys = self._keys(model)
        if name in keys:
            return name
        alias = self.arch.tied.get(name)
        if alias is not None and alias in keys:
            return alias
        return None

    def _keys(self, model: int) -> set[str]:
        if model not in self._key_cache:
            self._key_cache[model] = set(self.models[model].keys())
        return self._key_cache[model]

    def tensor_layers(self, model: int) -> list[int]:
        """The layer indices ``model``'s tensors hold, sorted."""
        key = (self.arch.name, model)  # a module's layer stack is its own
        if key not in self._layer_cache:
            found = {self.arch.layer_of(n) for n in self._keys(model)}
            self._layer_cache[key] = sorted(n for n in found if n is not None)
        return self._layer_cache[key]

    def layer_count(self, model: int) -> int:
        """How many layers ``model``'s tensors hold (one past the highest layer index)."""
        layers = self.tensor_layers(model)
        return layers[-1] + 1 if layers else 0

    def first_missing_layer(self, model: int, start: int, end: int) -> int | None:
        """The first layer in ``[start, end)`` that ``model`` has no tensor of, or None."""
        expected = start
        for layer in self.tensor_layers(model):
            if layer < start:
                continue
            if layer >= end or layer != expected:
                break
            expected += 1
        return expected if expected < end else None

    def check_layer_count(self, model: int, why: str) -> None:
        """Where layer positions matter, config.json's layer count must match the tensors'."""
        declared = self.arch.num_layers(self.models[model].config)
        have = self.layer_count(model)
        if declared is None or declared == have:
            return
        self.problem(
            f"{self.models[model].dir / 'config.json'}: {self.arch.num_layers_key} is {declared}, but the "
            f"tensors of {self.refs[model]} hold {have} layers; {why} are placed by layer, so they would be "
            f"wrong: set {self.arch.num_layers_key} to {have} in config.json, or use the checkpoint that "
            "goes with this config.json",
            key=f"layer-count:{self.arch.name}:{model}",
        )

    def input_ref(
        self, model: int, name: str, ref_info: TensorInfo, out_name: str, rows_align: bool = False
    ) -> InputRef | None:
        found = self.lookup(model, name)
        if found is None:
            self.problem(
                f"{name}: missing from {self.refs[model]} ({self.models[model].dir}), which has the other models' "
                f"layout otherwise; the models are not the same architecture, or {self.refs[model]} is "
                "incomplete",
                key=f"missing:{model}:{name}",
            )
            return None
        info = self.models[model].info(found)
        if info.shape != ref_info.shape and model in self.misfits:
            return None  # already reported once, from config.json
        if rows_align and info.shape[1:] == ref_info.shape[1:]:
            pass  # rows are matched by token
        elif info.shape != ref_info.shape:
            vocab = name in self.arch.vocab_weights and info.shape[1:] == ref_info.shape[1:]
            hint = (
                "the vocabularies differ in size; merge models with the same tokenizer"
                if vocab
                else "these models have different sizes and cannot be merged tensor by tensor"
            )
            self.problem(
                f"{out_name}: shape {info.shape} in {self.refs[model]} ({info.file}), but "
                f"{ref_info.shape} in {self.refs[self.reference]} ({ref_info.file}): {hint}"
            )
            return None
        if not info.dtype.is_floating_point and ref_info.dtype.is_floating_point:
            self.problem(
                f"{name}: {self.refs[model]} stores it as {info.dtype} ({info.file}); expected a floating "
                "point tensor. Quantized checkpoints cannot be merged: use the full-precision weights"
            )
            return None
        return InputRef(model, found)

    # -- modules ---------------------------------------------------------------------------------

    def plan_modules(self) -> list[Job]:
        """An architecture of several modules (a text decoder, a vision tower, ...): each module's
        tensors (by name prefix) merged with that module's models and parameters, gradients over
        that module's layers. A config without ``modules:`` gives every module its models, as
        mergekit does; tensors under no module's prefix go with the first module."""
        whole_arch, whole_config = self.arch, self.config
        given = dict(whole_config.module_configs)
        keys = self.models[self.reference].keys()
        absent = [p for p in whole_arch.parts if not any(n.startswith(p.prefix) for n in keys)]
        if absent:  # a layout the architecture row does not describe: refused, not merged as one lump
            self.problem(
                f"{self.refs[self.reference]} ({self.models[self.reference].dir}): no tensor name starts with "
                f"{', '.join(repr(p.prefix) for p in absent)}, the prefix of its {whole_arch.name} "
                f"module{'s' if len(absent) > 1 else ''} {', '.join(p.name for p in absent)}; its tensors are "
                "named in a layout mergesmith does not know for this architecture, so they cannot be split "
                "into modules"
            )
            return []
        jobs: list[Job] = []
        reference: int | None = None
        try:
            for name in whole_arch.modules:
                config = given.get(name, whole_config)
                self.arch, self.config, self.only = whole_arch.module(name), config, name
                if config.slices is None:
                    module_jobs = self.plan_models()
                elif not self.arch.num_layers_key:
                    module_jobs = []
                    self.problem(
                        f"modules.{name}.slices: no config.json key of {self.refs[self.reference]} is known to "
                        f"hold the layer count of its {name} stack, so a sliced output's config.json could "
                        "not say how many layers it has; merge this module without slices",
                        config=True,
                    )
                else:  # the module's layers stacked as the slices say, its layer count rewritten
                    module_jobs, layers = self.plan_slices(config.slices)
                    self.module_layers[self.arch.num_layers_key] = layers
                jobs += module_jobs
                if reference is None and module_jobs:
                    reference = self.reference
        finally:
            self.arch, self.config, self.only = whole_arch, whole_config, None
        if reference is not None:
            self.reference = reference
        return jobs

    def tensor_names(self, model: int) -> list[str]:
        """The tensors of ``model`` to plan: all, or the current module's where there are several."""
        names = self.models[model].keys()
        if self.only is None:
            return list(names)
        return [n for n in names if self.whole_arch.module_of(n) == self.only]

    # -- models mode ----------------------------------------------------------------------------

    def plan_models(self) -> list[Job]:
        cfg = self.config
        method = self.method
        base = self.index(cfg.base_model) if cfg.base_model is not None and method.base != "unused" else None
        entries = [e for e in cfg.models if base is None or e.ref != cfg.base_model]
        inputs = [self.index(e.ref) for e in entries]
        model_scopes = [[e.parameters, cfg.parameters] for e in entries]
        ref_idx = base if base is not None else inputs[0]
        self.reference = ref_idx
        names = self.tensor_names(ref_idx)
        n_layers = self.layer_count(ref_idx)  # gradients run over the layers the tensors hold
        if _uses_gradients(cfg):
            for m in ([base] if base is not None else []) + inputs:
                self.check_layer_count(m, "gradients")
        jobs = []
        for name in _natural(names, self.arch):
            layer = self.arch.layer_of(name)
            t = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
            job = self.make_job(
                out_name=name,
                base=(base, name) if base is not None else None,
                inputs=[(m, name) for m in inputs],
                model_scopes=model_scopes,
                shared_scopes=[cfg.parameters],
                layer=layer,
                t=t,
                ref_model=ref_idx,
            )
            if job is not None:
                jobs.append(job)
        return jobs

    # -- slices mode ----------------------------------------------------------------------------

    def plan_slices(self, slices: Sequence[SliceDef]) -> tuple[list[Job], list[tuple[int, int]]]:
        """Jobs of the stacked slices, and for each output layer the (model, layer) it comes from."""
        cfg = self.config
        out_layers = 0
        layer_sources: list[tuple[int, int]] = []
        layer_jobs: list[Job] = []
        edge_jobs: dict[str, list[Job]] = {"pre": [], "post": []}
        for si, sl in enumerate(slices):
            group_base = sl.base_model or cfg.base_model
            base_src = (
                next((s for s in sl.sources if s.ref == group_base), None)
                if self.method.base != "unused"
                else None
            )
            others = [s for s in sl.sources if s is not base_src]
            ref_src = base_src or others[0]
            ref_idx = self.index(ref_src.ref)
            if si == 0:
                self.reference = ref_idx if base_src is None else self.reference
            usable = True
            for j, s in enumerate(sl.sources):
                m = self.index(s.ref)
                self.check_layer_count(m, "slices")
                first, end = s.layer_range
                have = self.layer_count(m)
                if end > have:  # checked before any list as long as the range is built
                    self.problem(
                        f"slices[{si}].sources[{j}]: layer_range [{first}, {end}] of {s.ref} goes past its "
                        f"layers: its tensors hold {have}{f' (0 to {have - 1})' if have else ''}; use a layer_range within "
                        f"[0, {have}]",
                        config=True,
                    )
                    usable = False
                    continue
                missing = self.first_missing_layer(m, first, end)
                if missing is not None:
                    self.problem(f"slices[{si}]: {s.ref} has no layer {missing}")
                    usable = False
            if not usable:
                continue
            n = ref_src.layer_range[1] - ref_src.layer_range[0]
            model_scopes = [[s.parameters, sl.parameters, cfg.parameters] for s in others]
            shared = [sl.parameters, cfg.parameters]
            names = self.tensor_names(ref_idx)
            by_layer: dict[int, list[str]] = {}
            for name in _natural(names, self.arch):
                layer = self.arch.layer_of(name)
                if layer is not None:
                    by_layer.setdefault(layer, []).append(name)
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                src_layer = ref_src.layer_range[0] + offset
                for name in by_layer.get(src_layer, []):
                    job = self.make_job(
                        out_name=self.arch.with_layer(name, out_layers + offset),
                        base=(
                            self.index(base_src.ref),
                            self.arch.with_layer(name, base_src.layer_range[0] + offset),
                        )
                        if base_src is not None
                        else None,
                        inputs=[
                            (self.index(s.ref), self.arch.with_layer(name, s.layer_range[0] + offset))
                            for s in others
                        ],
                        model_scopes=model_scopes,
                        shared_scopes=shared,
                        layer=out_layers + offset,
                        t=t,
                        ref_model=ref_idx,
                    )
                    if job is not None:
                        layer_jobs.append(job)
            if si in (0, len(slices) - 1):
                for name in _natural(names, self.arch):
                    if self.arch.layer_of(name) is not None:
                        continue
                    edge = "pre" if self.arch.is_pre(name) else "post"
                    if (edge == "pre" and si != 0) or (edge == "post" and si != len(slices) - 1):
                        continue
                    job = self.make_job(
                        out_name=name,
                        base=(self.index(base_src.ref), name) if base_src is not None else None,
                        inputs=[(self.index(s.ref), name) for s in others],
                        model_scopes=model_scopes,
                        shared_scopes=shared,
                        layer=None,
                        t=0.0,
                        ref_model=ref_idx,
                    )
                    if job is not None:
                        edge_jobs[edge].append(job)
            out_layers += n
            layer_sources += [(ref_idx, ref_src.layer_range[0] + offset) for offset in range(n)]
        return edge_jobs["pre"] + layer_jobs + edge_jobs["post"], layer_sources

    def check_whole_model_density(self, jobs: Sequence[Job]) -> None:
        """A method that trims over the whole model needs one density per model."""
        for text in _density_problems(self.method, self.refs, jobs):
            self.problem(text, config=True)

    def renumber_config(self, out_config: dict[str, Any], layers: list[tuple[int, int]]) -> None:
        """Set the layer count of a stacked model's config, and rebuild its per-layer lists
        (such as ``layer_types``) from the layers each output layer comes from."""
        for key in layer_count_keys():
            if key in out_config:
                out_config[key] = len(layers)
        self.renumber_lists(out_config, "", layers)

    def renumber_lists(self, out_config: dict[str, Any], section: str, layers: list[tuple[int, int]]) -> None:
        """Rebuild the per-layer lists of a config section (``text_config``; "" for the top level)
        from the layers each output layer comes from."""
        out_section = _get_path(out_config, section)
        for key in per_layer_keys():
            if not isinstance(out_section.get(key), list):
                continue
            values = []
            for model, layer in layers:
                source = _get_path(self.models[model].config, section).get(key)
                if not isinstance(source, list) or layer >= len(source):
                    shown = f"{section}.{key}" if section else key
                    self.problem(
                        f"config.json: {shown} of {self.refs[model]} has no entry for layer {layer}; "
                        "its per-layer settings cannot be carried over"
                    )
                    return
                values.append(source[layer])
            out_section[key] = values

    # -- one job --------------------------------------------------------------------------------

    def make_job(
        self,
        *,
        out_name: str,
        base: tuple[int, str] | None,
        inputs: list[tuple[int, str]],
        model_scopes: list[list[Mapping[str, Any]]],
        shared_scopes: list[Mapping[str, Any]],
        layer: int | None,
        t: float,
        ref_model: int,
    ) -> Job | None:
        ref_model_idx, ref_name = base if base is not None else inputs[0]
        ref_found = self.lookup(ref_model_idx, ref_name)
        if ref_found is None:
            self.problem(
                f"{ref_name}: missing from {self.refs[ref_model_idx]} ({self.models[ref_model_idx].dir})"
            )
            return None
        ref_info = self.models[ref_model_idx].info(ref_found)
        out_dtype = (
            self.out_dtype if (self.out_dtype and ref_info.dtype.is_floating_point) else ref_info.dtype
        )
        if not ref_info.dtype.is_floating_point:
            return Job(
                out_name,
                ref_info.shape,
                COPY,
                None,
                (InputRef(ref_model_idx, ref_found),),
                {},
                ({},),
                layer,
                t,
                ref_info.dtype,
            )
        base_ref = InputRef(ref_model_idx, ref_found) if base is not None else None
        alignment = self.alignment() if ref_name in self.arch.vocab_weights else None
        shape = ref_info.shape if alignment is None else (alignment.size, *ref_info.shape[1:])
        in_refs: list[InputRef] = []
        for m, name in inputs:
            r = self.input_ref(m, name, ref_info, out_name, rows_align=alignment is not None)
            if r is not None:
                in_refs.append(r)
        if len(in_refs) != len(inputs):
            return None
        rows = None
        if alignment is not None:
            every = ([base_ref] if base_ref is not None else []) + in_refs
            permute = None
            if alignment.fills is not None:
                held = {r.model for r in every}
                outside = sorted({f.model for f in alignment.fills.values() if f.model is not None} - held)
                for m in outside:
                    self.problem(
                        f"{out_name}: tokenizer.tokens takes rows from {self.refs[m]}, which is not among "
                        "this tensor's inputs; name a model that this slice merges",
                        key=f"fill-outside:{m}",
                        config=True,
                    )
                models = tuple(r.model for r in every)
                # the base model's rows are the default where it has a token, whether or not the
                # method merges against it (mergekit's rule)
                base_cfg = self.config.base_model
                base_at = None
                if base_ref is not None:
                    base_at = 0
                elif base_cfg is not None and base_cfg in self.refs and self.index(base_cfg) in models:
                    base_at = models.index(self.index(base_cfg))
                permute = Permute(models, base_at, len(alignment.keys), alignment.fills)
            rows = RowMap(alignment.size, tuple(alignment.maps[r.model] for r in every), permute)
        source = _ParamSource(
            tuple(shared_scopes),
            tuple((m, name, tuple(scopes)) for (m, name), scopes in zip(inputs, model_scopes)),
        )

        def problem(text: str, key: str) -> None:
            self.problem(text, key, config=True)

        shared, per_model = _resolve_params(self.method, self.refs, out_name, t, source, problem)
        self.sources[out_name] = source
        return Job(
            name=out_name,
            shape=shape,
            method=self.method.name,
            base=base_ref,
            inputs=tuple(in_refs),
            params=shared,
            model_params=tuple(per_model),
            layer=layer,
            t=t,
            out_dtype=out_dtype,
            rows=rows,
        )


def _resolve_params(
    method: Method[Any, Any],
    refs: Sequence[ModelRef],
    out_name: str,
    t: float,
    source: _ParamSource,
    problem: Callable[[str, str], None],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A job's merge-wide and per-model parameters, each problem given to ``problem`` (text, key)."""
    shared = {}
    for info in method.param_infos:
        value = resolve(info, source.shared, out_name, t)
        if value is REQUIRED:
            problem(
                f"{out_name}: no value of {info.key} applies ({method.name} needs {info.key}: "
                f"{info.doc}); give a default entry without a filter",
                f"required-shared:{info.key}",
            )
        shared[info.key] = value
    per_model: list[dict[str, Any]] = []
    for m, name, scopes in source.inputs:
        values = {}
        for info in method.model_param_infos:
            value = resolve(info, scopes, name, t)
            if value is REQUIRED:
                problem(
                    f"{refs[m]}: no {info.key} for tensor {name} ({method.name} needs "
                    f"{info.key}: {info.doc}); give it under the model's parameters or a filter that "
                    "matches this tensor",
                    f"required:{m}:{info.key}",
                )
            values[info.key] = value
        per_model.append(values)
    check = method.check
    resolved = all(v is not REQUIRED for mp in [shared, *per_model] for v in mp.values())
    if check is not None and resolved:
        trouble = check(method.build_params(shared), [method.build_model_params(mp) for mp in per_model])
        if trouble:
            problem(f"{out_name}: {trouble}", f"check:{trouble}")
    return shared, per_model


def _scopes(config: MergeConfig) -> Iterator[Mapping[str, Any]]:
    """Every parameter scope of ``config`` (its modules' included), in a fixed order."""
    yield config.parameters
    for entry in config.models:
        yield entry.parameters
    for sl in config.slices or ():
        yield sl.parameters
        for s in sl.sources:
            yield s.parameters
    for _, module in config.module_configs:
        yield from _scopes(module)


def _layout(config: MergeConfig) -> MergeConfig:
    """``config`` with its parameters' numbers, its text, source, warnings and lines left out: two
    configs of one layout differ in parameter values only."""

    def form(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: form(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [form(v) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return 0
        return value

    replace = dataclasses.replace
    return replace(
        config,
        parameters=form(config.parameters),
        models=tuple(replace(e, parameters=form(e.parameters)) for e in config.models),
        slices=None
        if config.slices is None
        else tuple(
            replace(
                sl,
                parameters=form(sl.parameters),
                sources=tuple(replace(s, parameters=form(s.parameters)) for s in sl.sources),
            )
            for sl in config.slices
        ),
        text="",
        source="",
        warnings=(),
        modules=tuple((name, 0) for name, _ in config.modules),
        module_configs=tuple((name, _layout(module)) for name, module in config.module_configs),
    )


def _uses_gradients(config: MergeConfig) -> bool:
    """Whether any parameter of ``config`` is a gradient (a value that varies over the layers)."""
    scopes: list[Mapping[str, Any]] = [config.parameters, *(e.parameters for e in config.models)]
    for sl in config.slices or ():
        scopes += [sl.parameters, *(s.parameters for s in sl.sources)]
    for scope in scopes:
        for setting in scope.values():
            values = [setting]
            if isinstance(setting, list) and is_condition_list(setting):
                values = [c.get("value") for c in setting if isinstance(c, Mapping)]
            if any(isinstance(v, list) and not is_condition_list(v) for v in values):
                return True
    return False


# where config.json holds the vocabulary size: the top level, or a vision-language model's text_config
VOCAB_SIZE_KEYS = ("vocab_size", "text_config.vocab_size")


def _get_path(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The nested section at a dotted path (``text_config``); "" is the config itself; {} if absent."""
    for key in path.split(".") if path else ():
        inner = config.get(key)
        if not isinstance(inner, dict):
            return {}
        config = inner
    return config


def _set_path(config: dict[str, Any], path: str, value: int) -> None:
    """Set a dotted key path (``vision_config.num_hidden_layers``) where the config has it."""
    *parents, last = path.split(".")
    for key in parents:
        inner = config.get(key)
        if not isinstance(inner, dict):
            return
        config = inner
    if last in config:
        config[last] = value


def _natural(names: Sequence[str], arch: Architecture) -> list[str]:
    """Embeddings first, then layers in numeric order, then everything else."""

    def key(name: str) -> tuple[int, int, str]:
        layer = arch.layer_of(name)
        if layer is not None:
            return (1, layer, name)
        return (0 if arch.is_pre(name) else 2, 0, name)

    return sorted(names, key=key)


def _pack(jobs: Sequence[Job], limit: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, job in enumerate(jobs):
        if shards[-1] and size + job.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += job.nbytes
    return shards
