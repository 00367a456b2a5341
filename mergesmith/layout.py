"""The layout of a merge: which output tensors it makes and from which input tensors, in the order
written. A config's ``models:`` merge every tensor of the models; its ``slices:`` stack layer ranges;
an architecture of several modules plans each module with its own config. Each output tensor is
described as a :class:`Slot` and handed to the planner's ``make``, which checks its inputs and
resolves its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mergesmith.architecture import Architecture, layer_count_keys, per_layer_keys
from mergesmith.compat import Compatibility, Problems, get_path
from mergesmith.config import MergeConfig, ModelRef, SliceDef
from mergesmith.methods import Method
from mergesmith.parameters import is_condition_list
from mergesmith.sources import ModelSource

__all__ = ["Layout", "Slot", "natural", "uses_gradients"]

J = TypeVar("J")


@dataclass(frozen=True)
class Slot:
    """One output tensor to plan: its input tensors (model index, name), the scopes its merge-wide
    and per-model parameters are resolved in, its layer and position ``t`` in the layer stack, and
    the config, architecture and reference model it is planned under (a module's, with several)."""

    out_name: str
    base: tuple[int, str] | None
    inputs: list[tuple[int, str]]
    model_scopes: list[list[Mapping[str, Any]]]
    shared_scopes: list[Mapping[str, Any]]
    layer: int | None
    t: float
    config: MergeConfig
    arch: Architecture
    reference: int


class Layout(Generic[J]):
    """The slots of a merge, in the order written, each made into a job by ``make`` (None: left
    out, its problems recorded). ``reference`` ends as the model the output's config.json comes
    from; ``module_layers`` holds, for each sliced module, its layer count key and the (model,
    layer) each of its output layers comes from."""

    def __init__(
        self,
        config: MergeConfig,
        method: Method[Any, Any],
        refs: list[ModelRef],
        models: list[ModelSource],
        reference: int,
        arch: Architecture,
        compat: Compatibility,
        problem: Problems,
        make: Callable[[Slot], J | None],
    ) -> None:
        self.config = config
        self.method = method
        self.refs = refs
        self.models = models
        self.reference = reference
        self.arch = arch
        self.whole_arch = arch
        self.compat = compat
        self.problem = problem
        self.make = make
        self.only: str | None = None  # the module being planned, where the architecture has several
        self.module_layers: dict[str, list[tuple[int, int]]] = {}  # a sliced module's count key, its layers

    def index(self, ref: ModelRef) -> int:
        return self.refs.index(ref)

    def plan(self) -> tuple[list[J], list[tuple[int, int]] | None]:
        """Every job, and with top-level slices the (model, layer) each output layer comes from."""
        if len(self.arch.parts) > 1:
            return self.plan_modules(), None
        if self.config.slices is None:
            return self.plan_models(), None
        return self.plan_slices(self.config.slices)

    def job(
        self,
        *,
        out_name: str,
        base: tuple[int, str] | None,
        inputs: list[tuple[int, str]],
        model_scopes: list[list[Mapping[str, Any]]],
        shared_scopes: list[Mapping[str, Any]],
        layer: int | None,
        t: float,
    ) -> J | None:
        slot = Slot(
            out_name,
            base,
            inputs,
            model_scopes,
            shared_scopes,
            layer,
            t,
            self.config,
            self.arch,
            self.reference,
        )
        return self.make(slot)

    # -- modules ---------------------------------------------------------------------------------

    def plan_modules(self) -> list[J]:
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
        jobs: list[J] = []
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

    def plan_models(self) -> list[J]:
        cfg = self.config
        method = self.method
        base = self.index(cfg.base_model) if cfg.base_model is not None and method.base != "unused" else None
        entries = [e for e in cfg.models if base is None or e.ref != cfg.base_model]
        inputs = [self.index(e.ref) for e in entries]
        model_scopes = [[e.parameters, cfg.parameters] for e in entries]
        ref_idx = base if base is not None else inputs[0]
        self.reference = ref_idx
        names = self.tensor_names(ref_idx)
        # gradients run over the layers the tensors hold; extra layers stored after the decoder
        # layers (multi-token prediction) take the gradient's last value
        n_layers = self.compat.layer_count(self.arch, ref_idx)
        extra = self.compat.extra_layers(self.arch, ref_idx)
        if extra and self.compat.declared_layers(self.arch, ref_idx) == n_layers - extra:
            n_layers -= extra
        if uses_gradients(cfg):
            for m in ([base] if base is not None else []) + inputs:
                self.compat.check_layer_count(self.arch, m, "gradients")
        jobs = []
        for name in natural(names, self.arch):
            layer = self.arch.layer_of(name)
            t = 0.0 if layer is None else (min(1.0, layer / (n_layers - 1)) if n_layers > 1 else 1.0)
            job = self.job(
                out_name=name,
                base=(base, name) if base is not None else None,
                inputs=[(m, name) for m in inputs],
                model_scopes=model_scopes,
                shared_scopes=[cfg.parameters],
                layer=layer,
                t=t,
            )
            if job is not None:
                jobs.append(job)
        return jobs

    # -- slices mode ----------------------------------------------------------------------------

    def plan_slices(self, slices: Sequence[SliceDef]) -> tuple[list[J], list[tuple[int, int]]]:
        """Jobs of the stacked slices, and for each output layer the (model, layer) it comes from."""
        cfg = self.config
        out_layers = 0
        layer_sources: list[tuple[int, int]] = []
        layer_jobs: list[J] = []
        edge_jobs: dict[str, list[J]] = {"pre": [], "post": []}
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
                self.compat.check_layer_count(self.arch, m, "slices")
                first, end = s.layer_range
                have = self.compat.layer_count(self.arch, m)
                if end > have:  # checked before any list as long as the range is built
                    self.problem(
                        f"slices[{si}].sources[{j}]: layer_range [{first}, {end}] of {s.ref} goes past its "
                        f"layers: its tensors hold {have}{f' (0 to {have - 1})' if have else ''}; use a layer_range within "
                        f"[0, {have}]",
                        config=True,
                    )
                    usable = False
                    continue
                missing = self.compat.first_missing_layer(self.arch, m, first, end)
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
            for name in natural(names, self.arch):
                layer = self.arch.layer_of(name)
                if layer is not None:
                    by_layer.setdefault(layer, []).append(name)
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                src_layer = ref_src.layer_range[0] + offset
                for name in by_layer.get(src_layer, []):
                    job = self.job(
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
                    )
                    if job is not None:
                        layer_jobs.append(job)
            if si in (0, len(slices) - 1):
                for name in natural(names, self.arch):
                    if self.arch.layer_of(name) is not None:
                        continue
                    edge = "pre" if self.arch.is_pre(name) else "post"
                    if (edge == "pre" and si != 0) or (edge == "post" and si != len(slices) - 1):
                        continue
                    job = self.job(
                        out_name=name,
                        base=(self.index(base_src.ref), name) if base_src is not None else None,
                        inputs=[(self.index(s.ref), name) for s in others],
                        model_scopes=model_scopes,
                        shared_scopes=shared,
                        layer=None,
                        t=0.0,
                    )
                    if job is not None:
                        edge_jobs[edge].append(job)
            out_layers += n
            layer_sources += [(ref_idx, ref_src.layer_range[0] + offset) for offset in range(n)]
        return edge_jobs["pre"] + layer_jobs + edge_jobs["post"], layer_sources

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
        out_section = get_path(out_config, section)
        for key in per_layer_keys():
            if not isinstance(out_section.get(key), list):
                continue
            values = []
            for model, layer in layers:
                source = get_path(self.models[model].config, section).get(key)
                if not isinstance(source, list) or layer >= len(source):
                    shown = f"{section}.{key}" if section else key
                    self.problem(
                        f"config.json: {shown} of {self.refs[model]} has no entry for layer {layer}; "
                        "its per-layer settings cannot be carried over"
                    )
                    return
                values.append(source[layer])
            out_section[key] = values


def natural(names: Sequence[str], arch: Architecture) -> list[str]:
    """Embeddings first, then layers in numeric order, then everything else."""

    def key(name: str) -> tuple[int, int, str]:
        layer = arch.layer_of(name)
        if layer is not None:
            return (1, layer, name)
        return (0 if arch.is_pre(name) else 2, 0, name)

    return sorted(names, key=key)


def uses_gradients(config: MergeConfig) -> bool:
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
