"""Plan and write a mixture of experts: the inputs are opened and checked from their headers, the
router rows computed, then every output tensor is read, built and written one at a time."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergesmith import _output, defaults
from mergesmith._safetensors import ShardWriter
from mergesmith.config import DTYPES, ModelRef
from mergesmith.errors import ConfigError, MergesmithError
from mergesmith.moe import gates
from mergesmith.moe.config import Expert, MoEConfig, read_moe_config
from mergesmith.moe.layout import (
    LAYOUTS,
    SOURCE_MLP,
    Layout,
    choose,
    deepseek_config,
    glm4_moe_config,
    out_config,
)
from mergesmith.sources import ModelSource

if TYPE_CHECKING:
    from mergesmith.plan import Job, Plan

__all__ = [
    "MoEPlan",
    "OutTensor",
    "by_line",
    "model_card",
    "moe",
    "pack",
    "plan_moe",
    "trunk_config",
    "write",
]

MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
DEFAULT_SHARD = 5 * 1000**3
COPIED = ("generation_config.json",)


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    layer: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class MoEPlan:
    """Everything :func:`moe` writes, known before any weight is read."""

    config: MoEConfig
    layout: Layout
    base: ModelSource
    experts: list[ModelSource]  # one per config expert, in order
    shared: list[ModelSource]
    dtype: torch.dtype
    layers: int
    hidden: int
    out_config: dict[str, Any]
    tensors: list[OutTensor] = field(default_factory=list)
    trunk: Plan | None = None  # with base_merge: the merge of the experts' tensors outside their MLPs
    trunk_thresholds: dict[int, float] | None = None  # its whole-model thresholds, where it trims so
    router: torch.Tensor | None = None  # (layers, routed + gated shared experts, hidden), once computed

    @property
    def inputs(self) -> list[Path]:
        dirs = {d.resolve(): d for m in [self.base, *self.experts, *self.shared] for d in m.dirs}
        return list(dirs.values())


def plan_moe(config: MoEConfig | str | Path, *, seed: int = defaults.SEED) -> MoEPlan:
    """Open and check every model from its headers; every problem is reported at once, each
    with the config line it comes from."""
    cfg, problems = (config, []) if isinstance(config, MoEConfig) else read_moe_config(config)
    opened: dict[str, ModelSource] = {}

    def open_ref(ref: ModelRef, where: str) -> ModelSource | None:
        key = str(ref)
        if key in opened:
            return opened[key]
        from mergesmith.models import open_models

        try:
            opened[key] = open_models([ref])[0]
        except MergesmithError as exc:
            for p in getattr(exc, "problems", [str(exc)]):
                problems.append(f"{where}: {p}")
            return None
        return opened[key]

    if cfg.base.lora:
        problems.append(
            f"{cfg.line('base_model')}base_model: {cfg.base}: the base runs the gate prompts and gives "
            "attention and embeddings, and cannot carry a LoRA adapter; give the adapter to an expert, "
            "or merge it into the base first"
        )
    base = open_ref(cfg.base, f"{cfg.line('base_model')}base_model") if cfg.base.path else None
    routed = [
        open_ref(e.source, f"line {e.line}: experts[{i}].source_model") for i, e in enumerate(cfg.experts)
    ]
    shared = [
        open_ref(e.source, f"line {e.line}: shared_experts[{i}].source_model")
        for i, e in enumerate(cfg.shared_experts)
    ]
    if base is None:
        raise ConfigError(by_line(problems), cfg.source)
    model_type = str(base.config.get("model_type", ""))
    # the architecture is chosen from a config read without problems (a misspelt one is reported)
    layout = _layout(cfg, model_type, problems) if not problems else None
    layers, hidden = _sizes(base, problems)
    named = [(f"experts[{i}]", e, m) for i, (e, m) in enumerate(zip(cfg.experts, routed))]
    named += [(f"shared_experts[{i}]", e, m) for i, (e, m) in enumerate(zip(cfg.shared_experts, shared))]
    if layers:  # else config.json and the tensors disagree, reported above
        _check_base_mlp(base, layers, problems)
    for label, expert, model in named:
        if model is not None and layers:
            _check_expert(base, model, f"line {expert.line}: {label} ({model.name})", layers, problems)
    if cfg.gate_mode in ("hidden", "cheap_embed") and not _has_tokenizer(base.dir):
        problems.append(
            f"{cfg.line('base_model')}base_model: {base.dir} has no tokenizer files (tokenizer.json, "
            f"tokenizer.model or vocab.json); gate_mode {cfg.gate_mode} tokenizes the prompts with the "
            "base's tokenizer: add it, or use gate_mode random"
        )
    if layout is not None and layout.name == "qwen2_moe":
        _check_head_dim(base, problems)
    if layout is not None:
        _check_biases(base, layout, problems)
    dtype = _out_dtype(cfg, base)
    trunk = _trunk_plan(cfg, problems) if cfg.base_merge is not None and not problems else None
    if problems:
        raise ConfigError(by_line(problems), cfg.source)
    assert layout is not None
    assert all(m is not None for m in routed) and all(m is not None for m in shared)
    plan = MoEPlan(
        cfg,
        layout,
        base,
        [m for m in routed if m is not None],
        [m for m in shared if m is not None],
        dtype,
        layers,
        hidden,
        _out_config(cfg, layout, base.config, _dtype_name(dtype), _attention_biased(base)),
        trunk=trunk,
    )
    plan.tensors = _tensors(plan, _noise_stream(plan, seed))
    return plan


def trunk_config(cfg: MoEConfig) -> str:
    """The merge config of ``base_merge``: the experts merged onto the base by its method."""
    assert cfg.base_merge is not None
    method, params = cfg.base_merge
    models = "".join(f"  - model: {json.dumps(str(e.source))}\n" for e in cfg.experts)
    return (
        f"merge_method: {json.dumps(method)}\nbase_model: {json.dumps(str(cfg.base))}\nmodels:\n{models}"
        f"parameters: {json.dumps(_plain(params))}\ndtype: float32\n"
    )


def _plain(value: Any) -> Any:
    """YAML-read parameters as plain JSON values (mappings and lists of the reader's own types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _trunk_plan(cfg: MoEConfig, problems: list[str]) -> Plan | None:
    """The merge plan of ``base_merge``, its problems reported as the config's."""
    from mergesmith.api import validate

    try:
        return validate(trunk_config(cfg))
    except MergesmithError as exc:
        for p in getattr(exc, "problems", None) or [str(exc)]:
            problems.append(f"{cfg.line('base_merge')}base_merge: {p}")
        return None


def _out_config(
    cfg: MoEConfig, layout: Layout, base: dict[str, Any], dtype: str, biased: bool
) -> dict[str, Any]:
    experts, per_token = len(cfg.experts), cfg.experts_per_token
    if layout.name == "deepseek":
        return deepseek_config(base, experts, len(cfg.shared_experts), per_token, dtype)
    if layout.name == "glm4_moe":
        return glm4_moe_config(base, experts, len(cfg.shared_experts), per_token, dtype, biased)
    return out_config(layout, base, experts, per_token, dtype)


def by_line(problems: list[str]) -> list[str]:
    """Problems in the order of the config lines they name (those naming none last)."""

    def line(p: str) -> int:
        m = re.match(r"line (\d+):", p)
        return int(m.group(1)) if m else 1 << 30

    return sorted(problems, key=line)


def _layout(cfg: MoEConfig, model_type: str, problems: list[str]) -> Layout | None:
    where = cfg.line("architecture") or cfg.line("base_model")
    name = cfg.architecture
    if name is None:
        prompts = any(e.positive_prompts for e in cfg.shared_experts)
        name = choose(model_type, len(cfg.shared_experts), prompts, cfg.gate_mode)
        if name is None:
            problems.append(
                f"{where}no output architecture takes a {model_type or 'model without a model_type'} base "
                f"with {len(cfg.shared_experts)} shared expert(s): mixtral takes llama or mistral models "
                "and no shared expert, deepseek llama or mistral models and at most one shared expert "
                "without prompts, qwen2_moe llama, mistral or qwen2 models and one shared expert, "
                "qwen3_moe qwen3 models and no shared expert, glm4_moe llama, mistral or qwen2 models "
                "and one or more shared experts without prompts"
            )
            return None
    layout = LAYOUTS[name]
    if model_type not in layout.inputs:
        problems.append(
            f"{where}architecture {name} is built from {' or '.join(layout.inputs)} models, and the base "
            f"is {model_type or 'a model without a model_type'}; choose an architecture for it"
        )
        return None
    if layout.shared[0] and not cfg.shared_experts:
        problems.append(
            f"{where}architecture {name} has {layout.shared[0]} shared expert(s) and the config lists none; "
            "add shared_experts: [{source_model: PATH, positive_prompts: [...]}]"
        )
    gated = cfg.gate_mode in ("hidden", "cheap_embed")
    if layout.shared_gated and gated and cfg.shared_experts and not cfg.shared_experts[0].positive_prompts:
        problems.append(
            f"line {cfg.shared_experts[0].line}: shared_experts[0]: {name}'s shared expert has a gate, which "
            f"gate_mode {cfg.gate_mode} makes from prompts; give it positive_prompts"
        )
    return layout


def _sizes(base: ModelSource, problems: list[str]) -> tuple[int, int]:
    layers, hidden = base.config.get("num_hidden_layers"), base.config.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(hidden, int) or "intermediate_size" not in base.config:
        problems.append(
            f"{base.dir}/config.json: needs num_hidden_layers, hidden_size and intermediate_size; "
            "repair config.json"
        )
        return 0, 0
    found = {int(m.group(1)) for k in list(base.keys()) if (m := LAYER.match(k))}
    have = max(found) + 1 if found else 0
    if layers != have:
        problems.append(
            f"{base.dir}/config.json: num_hidden_layers is {layers}, but the tensors of {base.name} hold "
            f"{have} layers (model.layers.N); use the config.json that goes with these weights"
        )
        return 0, 0
    return layers, hidden


def _check_base_mlp(base: ModelSource, layers: int, problems: list[str]) -> None:
    expected = {f"model.layers.{n}.mlp.{p}.weight" for n in range(layers) for p in SOURCE_MLP}
    keys = set(base.keys())
    extra = sorted(k for k in keys if MLP.match(k) and k not in expected)
    if extra:
        problems.append(
            f"base_model {base.name}: MLP tensors other than gate, up and down_proj weights ({extra[0]}"
            f"{' and more' if len(extra) > 1 else ''}); an expert is a bias-free gated MLP: use a base without them"
        )
    missing = sorted(expected - keys)
    if missing:
        problems.append(
            f"base_model {base.name}: no tensor {missing[0]}; expected Llama-style MLP weights in every layer"
        )


def _check_expert(
    base: ModelSource, model: ModelSource, where: str, layers: int, problems: list[str]
) -> None:
    config = model.config  # an adapted model's is its base's
    for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size"):
        if config.get(key) != base.config.get(key):
            problems.append(
                f"{where}: config.json {key} is {config.get(key)!r}, the base's is "
                f"{base.config.get(key)!r}; experts must be fine-tunes of the base model"
            )
            return
    keys, base_keys = set(model.keys()), set(base.keys())
    for n in range(layers):
        for part in SOURCE_MLP:
            name = f"model.layers.{n}.mlp.{part}.weight"
            if name not in keys:
                problems.append(f"{where}: no tensor {name}; experts must be fine-tunes of the base model")
                return
            want = base.info(name).shape if name in base_keys else None
            got = model.info(name).shape
            if want is not None and got != want:
                problems.append(
                    f"{where}: {name} is {list(got)}, the base's is {list(want)}; experts must be "
                    "fine-tunes of the base model (same sizes)"
                )
                return


BIASES = {
    "qwen2_moe": ("q_proj", "k_proj", "v_proj"),
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "glm4_moe": ("q_proj", "k_proj", "v_proj"),
}


def _check_biases(base: ModelSource, layout: Layout, problems: list[str]) -> None:
    """The base's biases must be ones the output class has, or transformers would drop them."""
    kept = BIASES.get(layout.name, ())
    dropped = sorted(
        k
        for k in list(base.keys())
        if k.endswith(".bias") and not any(k.endswith(f".self_attn.{p}.bias") for p in kept)
    )
    if dropped:
        more = f" and {len(dropped) - 1} more" if len(dropped) > 1 else ""
        problems.append(
            f"base_model {base.name}: has biases ({dropped[0]}{more}), which {layout.class_name} does "
            "not have and would drop; use a base without them"
            + (", or architecture qwen2_moe (q, k and v biases)" if layout.name not in BIASES else "")
        )


def _check_head_dim(base: ModelSource, problems: list[str]) -> None:
    cfg = base.config
    head_dim = cfg.get("head_dim")
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if not (isinstance(head_dim, int) and isinstance(heads, int) and isinstance(hidden, int)):
        return
    if head_dim * heads != hidden:
        problems.append(
            f"base_model {base.name}: head_dim {head_dim} x {heads} heads is not hidden_size {hidden}; "
            "qwen2_moe assumes it is: use architecture mixtral"
        )


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _out_dtype(cfg: MoEConfig, base: ModelSource) -> torch.dtype:
    name = cfg.dtype
    if name is None:
        given = base.config.get("dtype") or base.config.get("torch_dtype")
        name = DTYPES.get(str(given).lower()) if given else None
    if name is None:
        return (
            base.info("model.embed_tokens.weight").dtype
            if "model.embed_tokens.weight" in set(base.keys())
            else torch.float32
        )
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gated(cfg: MoEConfig) -> list[Expert]:
    """The experts that get router rows: the routed ones, and as mergekit-moe does, the shared
    ones when they have prompts or the rows are random (which changes the random draw even where
    their rows go unused)."""
    out = list(cfg.experts)
    if any(e.positive_prompts for e in cfg.shared_experts) or cfg.gate_mode.endswith("random"):
        out += list(cfg.shared_experts)
    return out


def _noise_stream(plan: MoEPlan, seed: int) -> torch.Generator:
    """The random stream noise_scale draws from: mergekit-moe's, seeded with ``seed``, after the
    random router rows (if any) were drawn from it."""
    stream = torch.Generator().manual_seed(seed)
    cfg = plan.config
    noisy = any(e.noise_scale is not None for e in (*cfg.experts, *cfg.shared_experts))
    if noisy and cfg.gate_mode in ("random", "uniform_random"):
        shape = (plan.layers, len(_gated(cfg)), plan.hidden)
        drawn = torch.randn if cfg.gate_mode == "random" else torch.rand
        drawn(shape, generator=stream)
    return stream


def _tensors(plan: MoEPlan, noise: torch.Generator) -> list[OutTensor]:
    base, layout, dtype = plan.base, plan.layout, plan.dtype
    out: list[OutTensor] = []

    def copy(model: ModelSource, name: str) -> Callable[[], torch.Tensor]:
        return lambda: model.get(name).to(dtype)

    trunk_jobs = {job.name: job for job in plan.trunk.jobs} if plan.trunk is not None else {}
    for name in list(base.keys()):
        if not MLP.match(name):
            make = _merged(plan, trunk_jobs[name]) if name in trunk_jobs else copy(base, name)
            out.append(OutTensor(name, base.info(name).shape, dtype, make))
    if layout.name == "qwen2_moe" or (layout.name == "glm4_moe" and _attention_biased(base)):
        out += _zero_biases(base, plan.layers, dtype)
    cfg = plan.config
    for n in range(plan.layers):
        routed = len(cfg.experts)
        out.append(OutTensor(layout.gate(n), (routed, plan.hidden), dtype, _router(plan, n, 0, routed), n))
        if layout.router_bias:
            out.append(
                OutTensor(layout.gate_bias(n), (routed,), torch.float32, _zeros(routed, torch.float32), n)
            )
        # in mergekit-moe's order, which is the order noise_scale's noise is drawn in
        joined = layout.shared_joined and bool(plan.shared)
        pairs: list[tuple[int | None, Expert, ModelSource]] = [
            (e, expert, model) for e, (expert, model) in enumerate(zip(cfg.experts, plan.experts))
        ]
        if not joined:  # at most one: Layout.shared
            pairs += [(None, expert, model) for expert, model in zip(cfg.shared_experts, plan.shared)]
        steps = (
            [(part, pair) for part in layout.parts for pair in pairs]
            if layout.part_major
            else [(part, pair) for pair in pairs for part in layout.parts]
        )
        for part, (e, expert, model) in steps:
            src = f"model.layers.{n}.mlp.{part}.weight"
            make = _expert_tensor(model, src, expert, dtype, noise)
            name = layout.expert(n, e, part) if e is not None else layout.shared_expert(n, part)
            out.append(OutTensor(name, model.info(src).shape, dtype, make, n))
        if joined:
            out += _joined_shared(plan, n, noise)
        if layout.shared_gated and plan.shared:
            gate = _router(plan, n, routed, routed + 1)
            out.append(OutTensor(layout.shared_gate(n), (1, plan.hidden), dtype, gate, n))
    return out


def _attention_biased(base: ModelSource) -> bool:
    """Whether the base's attention has q, k or v biases (Qwen2's has all three)."""
    return any(re.search(r"\.self_attn\.[qkv]_proj\.bias$", k) for k in list(base.keys()))


def _joined_shared(plan: MoEPlan, layer: int, noise: torch.Generator) -> list[OutTensor]:
    """The shared experts of one layer as one gated MLP: their gate and up rows stacked, their
    down columns side by side, so the MLP's output is the sum of theirs."""
    out = []
    pairs = list(zip(plan.config.shared_experts, plan.shared))
    for part in SOURCE_MLP:
        src = f"model.layers.{layer}.mlp.{part}.weight"
        makes = [_expert_tensor(model, src, expert, plan.dtype, noise) for expert, model in pairs]
        shapes = [model.info(src).shape for _, model in pairs]
        axis = 1 if part == "down_proj" else 0
        shape = list(shapes[0])
        shape[axis] = sum(s[axis] for s in shapes)

        def make(
            makes: list[Callable[[], torch.Tensor]] = makes, axis: int = axis, shape: list[int] = shape
        ) -> torch.Tensor:
            out = torch.empty(shape, dtype=plan.dtype)  # filled one source at a time
            at = 0
            for m in makes:
                part = m()
                out.narrow(axis, at, part.shape[axis]).copy_(part)
                at += part.shape[axis]
                del part
            return out

        out.append(OutTensor(plan.layout.shared_expert(layer, part), tuple(shape), plan.dtype, make, layer))
    return out


def _merged(plan: MoEPlan, job: Job) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        from mergesmith.execute import merge_job, read_inputs

        trunk = plan.trunk
        assert trunk is not None
        tensors = read_inputs(trunk, job)
        return merge_job(trunk, job, tensors, torch.device("cpu"), plan.trunk_thresholds).to(plan.dtype)

    return make


def _router(plan: MoEPlan, layer: int, start: int, stop: int) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        assert plan.router is not None, "router rows are computed before the tensors are written"
        return plan.router[layer, start:stop, :].to(plan.dtype).contiguous()

    return make


def _expert_tensor(
    model: ModelSource, name: str, expert: Expert, dtype: torch.dtype, noise: torch.Generator
) -> Callable[[], torch.Tensor]:
    """The expert's tensor with its noise_scale (every MLP tensor) and residual_scale (down_proj,
    which writes to the residual stream) applied, in the source's dtype, then cast."""

    def make() -> torch.Tensor:
        t = model.get(name)
        if expert.noise_scale is not None:  # drawn in the tensor's dtype, as mergekit-moe draws it
            t = t + torch.randn(t.shape, dtype=t.dtype, generator=noise) * expert.noise_scale
        if expert.residual_scale is not None and name.endswith("down_proj.weight"):
            t = t * expert.residual_scale
        return t.to(dtype)

    return make


def _zero_biases(base: ModelSource, layers: int, dtype: torch.dtype) -> list[OutTensor]:
    """Qwen2-MoE's attention has q, k and v biases; a base without them gets zeros (no change)."""
    out = []
    keys = set(base.keys())
    for n in range(layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            bias = f"model.layers.{n}.self_attn.{p}.bias"
            weight = f"model.layers.{n}.self_attn.{p}.weight"
            if bias not in keys and weight in keys:
                rows = base.info(weight).shape[0]
                out.append(OutTensor(bias, (rows,), dtype, _zeros(rows, dtype)))
    return out


def _zeros(rows: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: torch.zeros(rows, dtype=dtype)


def pack(tensors: Sequence[OutTensor], limit: int) -> list[list[OutTensor]]:
    """Tensors in order, cut into shards of at most ``limit`` bytes (a larger tensor alone)."""
    from mergesmith.plan import pack as pack_sizes

    return [[tensors[i] for i in shard] for shard in pack_sizes([t.nbytes for t in tensors], limit)]


def moe(
    config: MoEConfig | str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    device: str | torch.device = defaults.DEVICE,
    seed: int = defaults.SEED,
    threads: int | None = None,
    max_shard_size: int | str = DEFAULT_SHARD,
    say: Callable[[str], None] | None = None,
) -> MoEPlan:
    """Build the mixture of experts a mergekit-moe config describes into ``out_dir``: checked
    whole first, the output appearing only once complete (``force`` replaces an earlier
    mergesmith output). ``seed`` seeds the random gates and the experts' noise."""
    from mergesmith._threads import positive_threads, using_threads
    from mergesmith.api import check_device
    from mergesmith.plan import parse_size

    positive_threads(threads)
    dev = check_device(device)
    limit = parse_size(max_shard_size)
    plan = plan_moe(config, seed=seed)
    out = Path(out_dir)
    seen = _output.check_output(out, plan.inputs, force)
    tell = say or (lambda line: None)
    with (
        using_threads(threads),
        _output.staged_output(out, plan.inputs, force=force, seen=seen, kind="moe") as stage,
    ):
        cfg = plan.config
        plan.router = gates.gate_rows(
            cfg.gate_mode,
            _gated(cfg),
            layers=plan.layers,
            hidden=plan.hidden,
            base_dir=str(plan.base.dir),
            embed=lambda: plan.base.get("model.embed_tokens.weight"),
            device=dev,
            seed=seed,
            say=tell,
        )
        alike = gates.degenerate_layers(plan.router) if cfg.gate_mode in ("hidden", "cheap_embed") else []
        if alike:
            tell(
                f"moe: warning: the router rows of layer(s) {', '.join(map(str, alike))} are nearly the "
                "same for every expert (condition number above 5): those layers will route poorly; "
                "give each expert prompts that differ more, especially in their last token"
            )
        if plan.layout.name == "deepseek":
            tell(
                "moe: note: the deepseek output is DeepSeek-MoE's own class, which transformers runs only with "
                "trust_remote_code=True and that model's code from the Hub; architecture: glm4_moe writes a "
                "DeepSeek-style model (shared experts) that transformers runs without it"
            )
        sources = {tuple(d.resolve() for d in m.dirs) for m in plan.experts}
        if len(plan.experts) > 1 and len(sources) == 1:
            tell(
                f"moe: warning: all {len(plan.experts)} experts are the same model ({cfg.experts[0].source}): "
                "every token gets the same MLP whatever the routing, so the model computes what that one "
                "model's MLP computes, at a larger size; this is useful only as a start for training"
            )
        if plan.trunk is not None:
            from mergesmith.execute import whole_model_thresholds

            tell(f"moe: tensors outside the experts' MLPs merged by {plan.trunk.method.name}")
            plan.trunk_thresholds = whole_model_thresholds(plan.trunk, torch.device("cpu"))
        write(plan, stage, limit, tell)
    return plan


def model_card(plan: MoEPlan) -> str:
    """The output's README.md: Hub metadata, its experts and gates, and the config it was built from."""
    from mergesmith._version import __version__
    from mergesmith.card import hub_ids, metadata

    cfg = plan.config
    refs = [cfg.base, *(e.source for e in cfg.experts), *(e.source for e in cfg.shared_experts)]
    lines = [metadata(hub_ids(refs), ("merge", "mergesmith", "moe")), "# Mixture of experts", ""]
    lines.append(
        f"Made with mergesmith {__version__}: a {plan.layout.name} model of {len(cfg.experts)} experts "
        f"({cfg.experts_per_token} per token, gate_mode {cfg.gate_mode}) built from fine-tunes of "
        f"{cfg.base}; each expert is the MLP of the model it names."
    )
    lines += ["", "| expert | model | prompts |", "|---|---|---|"]
    for i, e in enumerate(cfg.experts):
        lines.append(f"| {i} | {e.source} | {len(e.positive_prompts)} |")
    for e in cfg.shared_experts:
        lines.append(f"| shared | {e.source} | {len(e.positive_prompts)} |")
    trunk = f"merged by {cfg.base_merge[0]} (base_merge)" if cfg.base_merge else f"from {cfg.base}"
    lines += ["", f"Attention, norms, embeddings and lm_head: {trunk}."]
    lines += ["", "## Configuration", "", "```yaml", cfg.text.strip(), "```", ""]
    return "\n".join(lines)


def write(plan: MoEPlan, stage: Path, limit: int, say: Callable[[str], None]) -> None:
    """Write the tensors, one at a time, then config.json, the tokenizer and the config."""
    shards = pack(plan.tensors, limit)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    layer_seen = -1
    for shard, name in zip(shards, names):
        writer = ShardWriter(stage / name, {t.name: (t.dtype, t.shape) for t in shard})
        with writer.aborting():
            for t in shard:
                if t.layer is not None and t.layer != layer_seen:
                    layer_seen = t.layer
                    say(f"moe: writing layer {t.layer + 1}/{plan.layers}")
                writer.write(t.name, t.make())
        writer.close()
    try:
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in plan.tensors)},
                "weight_map": {t.name: n for shard, n in zip(shards, names) for t in shard},
            }
            (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (stage / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
        from mergesmith.execute import TOKENIZER_FILES

        for file in (*TOKENIZER_FILES, *COPIED):
            src = plan.base.side_file(file)
            if src is not None:
                shutil.copyfile(src, stage / file)
        if plan.config.text:
            (stage / "mergesmith_moe_config.yml").write_text(plan.config.text)
        (stage / "README.md").write_text(model_card(plan))
    except OSError as exc:
        raise _output.os_error(exc.filename or stage, exc) from None
