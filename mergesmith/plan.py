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
from typing import Any, TypeVar

import torch

from mergesmith import _yaml, defaults
from mergesmith._json import read_json
from mergesmith._text import printable
from mergesmith.architecture import Architecture, architecture_for
from mergesmith.compat import VOCAB_SIZE_KEYS, Compatibility, Problems, set_path
from mergesmith.config import MergeConfig, ModelRef
from mergesmith.errors import CompatibilityError, ConfigError
from mergesmith.layout import Layout, Slot
from mergesmith.methods import Method
from mergesmith.models import open_models
from mergesmith.parameters import REQUIRED, resolve
from mergesmith.sources import ModelSource
from mergesmith.vocab import Alignment, RowMap, align_vocabularies, row_map

__all__ = [
    "InputRef",
    "Job",
    "Plan",
    "build_plan",
    "describe_job",
    "open_models",
    "pack",
    "parse_size",
    "whole_model_jobs",
]

P = TypeVar("P")
M = TypeVar("M")

DEFAULT_SHARD = defaults.SHARD_SIZE
COPY = "copy"


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
    # the method that merges the tensor and ``params`` and ``model_params`` built into its parameter
    # classes (what the method reads); None and () for a copied tensor
    merger: Method[Any, Any] | None = None
    built_params: Any = None
    built_model_params: tuple[Any, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize

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
    models: list[ModelSource]
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
            built, built_models = _build(self.method, shared, per_model)
            resolved[out_name] = dataclasses.replace(
                job,
                params=shared,
                model_params=tuple(per_model),
                built_params=built,
                built_model_params=built_models,
            )
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
    if isinstance(v, tuple):  # a list of model names
        return "[" + ", ".join(map(str, v)) + "]"
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
    return [j for j in jobs if j.method == method.name and trim(j.built_params)]


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
    plan.shards = pack([job.nbytes for job in plan.jobs], plan.shard_limit)
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
    """The glue of planning: the layout's slots made into jobs, their inputs checked
    (:mod:`mergesmith.compat`), their vocabulary rows matched (:mod:`mergesmith.vocab`) and their
    parameters resolved; then the output's config.json."""

    def __init__(
        self,
        config: MergeConfig,
        method: Method[Any, Any],
        refs: list[ModelRef],
        models: list[ModelSource],
        reference: int,
        arch: Architecture,
    ) -> None:
        self.config = config
        self.method = method
        self.refs = refs
        self.models = models
        self.reference = reference
        self.arch = arch
        self.problem = Problems()
        self.compat = Compatibility(refs, models, self.problem)
        self.layout = Layout(
            config, method, refs, models, reference, arch, self.compat, self.problem, self.make_job
        )
        self._alignment: Alignment | bool | None = False  # False: not worked out yet
        self.sources: dict[str, _ParamSource] = {}
        self.compute_dtype = getattr(torch, config.dtype) if config.dtype else None
        out_name = config.out_dtype or config.dtype
        self.out_dtype: torch.dtype | None = getattr(torch, out_name) if out_name else None

    def index(self, ref: ModelRef) -> int:
        return self.refs.index(ref)

    def build(self) -> Plan:
        self.compat.check_configs(self.config, self.reference)
        jobs, layers = self.layout.plan()
        self.reference = self.layout.reference
        out_config = json.loads(json.dumps(self.models[self.reference].config))
        # the only quantized inputs read are FP8 ones, dequantized as read: the output is not quantized
        for cfg in (out_config, out_config.get("text_config")):
            if isinstance(cfg, dict):
                cfg.pop("quantization_config", None)
        if self.refs[self.reference].architecture:  # as mergekit, the override is what is written
            out_config["architectures"] = [self.refs[self.reference].architecture]
        if layers is not None:
            self.layout.renumber_config(out_config, layers)
        for key, stacked in self.layout.module_layers.items():
            set_path(out_config, key, len(stacked))
            self.layout.renumber_lists(out_config, key.rpartition(".")[0], stacked)
        alignment = self._alignment if isinstance(self._alignment, Alignment) else None
        if alignment is not None:
            for key in VOCAB_SIZE_KEYS:
                set_path(out_config, key, alignment.size)
        for text in _density_problems(self.method, self.refs, jobs):
            self.problem(text, config=True)
        if self.problem.models:
            raise CompatibilityError(self.problem.models + self.problem.config)
        if self.problem.config:
            raise ConfigError(self.problem.config, self.config.source)
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
            tokenizer_model=self.tokenizer_model(self.config, self.reference),
            arch=self.arch,
            jobs=jobs,
            out_config=out_config,
            compute_dtype=self.compute_dtype,
            vocab=alignment,
            sources={name: source for name, source in self.sources.items() if name in planned},
        )

    def tokenizer_model(self, config: MergeConfig, reference: int) -> int | None:
        """The model whose tokenizer the output takes (``config``'s tokenizer_source; without one,
        or with base or union, the base model, else ``reference``)."""
        source = config.tokenizer_source
        if source is None or source in ("base", "union"):
            base = config.base_model
            return self.index(base) if base is not None and base in self.refs else reference
        for i, ref in enumerate(self.refs):
            if source in (str(ref), ref.path):
                return i
        raise ConfigError(
            f"tokenizer_source {_yaml.shown(source)} is not one of the input models ({', '.join(map(str, self.refs))}); "
            "use base or one of them",
            config.source,
        )

    def alignment(self, slot: Slot) -> Alignment | None:
        """Matching of vocabulary rows by token, when tokenizer_source asks for it and rows differ
        (worked out once, for the first vocabulary tensor)."""
        if self._alignment is False:
            self._alignment = None
            if slot.config.tokenizer_source is not None:
                rows: list[int] = []
                for i, model in enumerate(self.models):
                    name = next(
                        (n for n in slot.arch.vocab_weights if self.compat.lookup(slot.arch, i, n)), None
                    )
                    found = self.compat.lookup(slot.arch, i, name) if name else None
                    rows.append(model.info(found).shape[0] if found else 0)
                self._alignment = align_vocabularies(
                    slot.config,
                    self.refs,
                    self.models,
                    rows,
                    lambda: self.tokenizer_model(slot.config, slot.reference),
                    self.problem,
                )
        return self._alignment if isinstance(self._alignment, Alignment) else None

    def make_job(self, slot: Slot) -> Job | None:
        """The job of one slot, or None where its inputs do not fit (the problems recorded)."""
        out_name, base, inputs, arch = slot.out_name, slot.base, slot.inputs, slot.arch
        ref_model_idx, ref_name = base if base is not None else inputs[0]
        ref_found = self.compat.lookup(arch, ref_model_idx, ref_name)
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
                slot.layer,
                slot.t,
                ref_info.dtype,
            )
        base_ref = InputRef(ref_model_idx, ref_found) if base is not None else None
        alignment = self.alignment(slot) if ref_name in arch.vocab_weights else None
        shape = ref_info.shape if alignment is None else (alignment.size, *ref_info.shape[1:])
        in_refs: list[InputRef] = []
        for m, name in inputs:
            found = self.compat.check_input(
                arch, slot.reference, m, name, ref_info, out_name, rows_align=alignment is not None
            )
            if found is not None:
                in_refs.append(InputRef(m, found))
        if len(in_refs) != len(inputs):
            return None
        rows = None
        if alignment is not None:
            models = tuple(r.model for r in ([base_ref] if base_ref is not None else []) + in_refs)
            # the base model's rows are the default where it has a token, whether or not the
            # method merges against it (mergekit's rule)
            base_cfg = slot.config.base_model
            base_at = None
            if base_ref is not None:
                base_at = 0
            elif base_cfg is not None and base_cfg in self.refs and self.index(base_cfg) in models:
                base_at = models.index(self.index(base_cfg))
            rows = row_map(alignment, models, base_at, out_name, self.refs, self.problem)
        source = _ParamSource(
            tuple(slot.shared_scopes),
            tuple((m, name, tuple(scopes)) for (m, name), scopes in zip(inputs, slot.model_scopes)),
        )

        def problem(text: str, key: str) -> None:
            self.problem(text, key, config=True)

        shared, per_model = _resolve_params(self.method, self.refs, out_name, slot.t, source, problem)
        self.sources[out_name] = source
        built, built_models = _build(self.method, shared, per_model)
        return Job(
            name=out_name,
            shape=shape,
            method=self.method.name,
            base=base_ref,
            inputs=tuple(in_refs),
            params=shared,
            model_params=tuple(per_model),
            layer=slot.layer,
            t=slot.t,
            out_dtype=out_dtype,
            rows=rows,
            merger=self.method,
            built_params=built,
            built_model_params=built_models,
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
        trouble = check(*_build(method, shared, per_model))
        if trouble:
            problem(f"{out_name}: {trouble}", f"check:{trouble}")
    check_names = method.check_names
    if check_names is not None and all(v is not REQUIRED for v in shared.values()):
        names = [refs[m].name for m, _, _ in source.inputs]
        trouble = check_names(method.build_params(shared), names, [r.name for r in refs])
        if trouble:
            problem(f"{out_name}: {trouble}", f"check:{trouble}")
    return shared, per_model


def _build(
    method: Method[P, M], shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]
) -> tuple[P, tuple[M, ...]]:
    """A job's parameters built into ``method``'s parameter classes (a value left unresolved is
    kept as it is: such a plan is refused before it runs)."""
    return method.build_params(shared), tuple(method.build_model_params(mp) for mp in per_model)


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


def pack(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indices of tensors of these byte sizes, in order, cut into shards of at most ``limit``
    bytes (a larger tensor alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(sizes):
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards
