"""Merge several LoRA adapters of one base into one adapter, without forming any full delta.

The weighted sum of adapters ``Σ_i w_i s_i B_i A_i`` is itself a LoRA update of rank ``Σ_i r_i``:
stacking the factors, ``B = [w_1 s_1 B_1, ..., w_n s_n B_n]`` and ``A = [A_1; ...; A_n]``, gives it
exactly. A smaller rank ``r`` takes the best rank-r approximation of ``B @ A`` from QR
decompositions of the stacked factors: with ``B = Q_B R_B`` and ``A^T = Q_A R_A``, ``B A = Q_B (R_B
R_A^T) Q_A^T``, so the SVD of the small ``k x k`` core ``R_B R_A^T = U S V^T`` gives
``B' = Q_B U_r S_r`` and ``A' = (Q_A V_r)^T``. Memory per module is ``O((out + in) k)``; no
``out x in`` matrix is ever allocated.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith import _hub, _output, defaults
from mergesmith._safetensors import ShardWriter
from mergesmith._text import printable
from mergesmith.errors import CheckpointError, CompatibilityError, ConfigError, MergesmithError, MethodError
from mergesmith.lora import Adapter, read_adapter
from mergesmith.methods import REGISTRY, MergeInputs
from mergesmith.methods.knots import shared_basis

__all__ = ["MergedModule", "basis_methods", "knots_factors", "merge_adapters", "stack_factors", "truncate"]

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class MergedModule:
    """One module of the merged adapter: its rank and the relative error of the truncation."""

    module: str
    rank: int
    relative_error: float  # ||B A - B' A'||_F / ||B A||_F; 0 when nothing was truncated


def stack_factors(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = Σ c_i B_i @ A_i`` for parts ``(B_i, A_i, c_i)``."""
    b = torch.cat([bi.float() * c for bi, _, c in parts], dim=1)
    a = torch.cat([ai.float() for _, ai, _ in parts], dim=0)
    return b, a


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``b @ a`` via QR of each factor and an SVD of the small core."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    r = min(rank, s.numel())
    total = float(torch.linalg.vector_norm(s))
    error = float(torch.linalg.vector_norm(s[r:])) / total if total > 0 else 0.0
    new_b = (qb @ u[:, :r]) * s[:r]
    new_a = (qa @ vh[:r].T).T
    return new_b.contiguous(), new_a.contiguous(), error


def knots_factors(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    combine: Callable[[list[torch.Tensor]], torch.Tensor],
    shape: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA updates ``s_i B_i A_i`` merged in their shared SVD basis, as factors ``(B, A)``.

    ``[s_1 B_1 ... s_n B_n] = Q R`` by QR; then ``[D_1 ... D_n] = Q [R_1 A_1 ... R_n A_n]`` and the
    shared basis ``D_i = U S V_i^T`` comes from the small ``k x n·in`` matrix on the right.
    ``combine`` merges the ``V_i^T`` (KnOTS); no full delta is ever formed.
    """
    q, r = torch.linalg.qr(torch.cat([b.float() * s for b, _, s in parts], dim=1))
    blocks, start = [], 0
    for b, a, _ in parts:
        blocks.append(r[:, start : start + b.shape[1]] @ a.float())
        start += b.shape[1]
    left, factors = shared_basis(blocks, q, shape)
    if left.shape[1] == 0:
        return left, torch.zeros(0, shape[1])
    return left.contiguous(), combine(factors).contiguous()


def _basis_params(
    method: str, weights: Sequence[float], densities: Sequence[float], params: Mapping[str, Any]
) -> tuple[Any, Any, list[Any]]:
    """The method that merges in the shared basis, its merge-wide parameters and one set of
    per-model parameters for each adapter (its weight and density)."""
    m = REGISTRY["ties" if method == "knots_ties" else method]  # KnOTS-TIES is TIES in this basis
    shared = m.build_params({i.key: params.get(i.key, i.default) for i in m.param_infos})
    per = [
        m.build_model_params(
            {i.key: {"weight": w, "density": d}.get(i.key, i.default) for i in m.model_param_infos}
        )
        for w, d in zip(weights, densities)
    ]
    return m, shared, per


def _basis_trouble(method: str, m: Any, shared: Any, per: Sequence[Any]) -> str | None:
    """Why ``method`` cannot merge these adapters in the shared basis, or None: a trim over whole
    models, or what the method's own plan-time check refuses."""
    if m.whole_model_trim is not None and m.whole_model_trim(shared):
        return f"{method} with these parameters trims over a whole model, which one adapter merge cannot"
    trouble: str | None = m.check(shared, per) if m.check is not None else None
    return trouble


def _in_basis(
    method: str,
    module: str,
    weights: Sequence[float],
    densities: Sequence[float],
    params: Mapping[str, Any],
    seed: int,
) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """A merge of the factors ``V_i^T`` in the shared basis with ``method`` (base: zero update)."""
    m, shared, per = _basis_params(method, weights, densities, params)
    trouble = _basis_trouble(method, m, shared, per)
    if trouble:  # the adapters that change this module are fewer than the method needs
        raise ConfigError(f"{module}: {trouble} ({len(per)} of the adapters change this module)")
    return lambda f: m.merge(MergeInputs(module, torch.zeros_like(f[0]), f, shared, per, seed))


def basis_methods() -> list[str]:
    """Methods that can merge adapters in their shared basis: those built on a base model."""
    return ["knots_ties"] + [
        n for n, m in REGISTRY.items() if m.base == "required" and m.max_models is None and n != "knots_ties"
    ]


def merge_adapters(
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    method: str = defaults.LORA_METHOD,
    densities: Sequence[float] | None = None,
    lambda_: float = defaults.LORA_LAMBDA,
    params: Mapping[str, Any] | None = None,
    seed: int = defaults.SEED,
    force: bool = False,
    on_nonfinite: str = defaults.ON_NONFINITE,
) -> list[MergedModule]:
    """Write one PEFT adapter: the weighted sum of ``adapters`` (``linear``, exact) or their
    KnOTS-TIES merge (``knots_ties``, exact in rank ``Σ r_i``), or its best rank-``rank``
    approximation per module.

    A factor holding NaN or infinities, or a merged factor that overflows float32, stops the
    merge naming the adapter and tensor; ``on_nonfinite="warn"`` writes it anyway and prints a
    warning on stderr (also recorded in the adapter's README)."""
    if on_nonfinite not in ("error", "warn"):
        raise ConfigError(f"on_nonfinite must be 'error' or 'warn', not {on_nonfinite!r}")
    warnings: list[str] | None = [] if on_nonfinite == "warn" else None
    if method != "linear" and method not in basis_methods():
        raise ConfigError(
            f"adapter merge method {method!r} is not available; use linear (exact sum) or one merged in the "
            f"shared basis: {', '.join(basis_methods())}"
        )
    settings: dict[str, Any] = {"lambda": lambda_}
    if method != "linear":
        infos = {i.key: i for i in REGISTRY["ties" if method == "knots_ties" else method].param_infos}
        unknown = sorted(set(params or {}) - set(infos))
        if unknown:
            raise ConfigError(f"{method} has no parameters {unknown}; its parameters: {sorted(infos)}")
        bad = []
        for key, value in (params or {}).items():
            settings[key], problem = infos[key].check_scalar(value)
            if problem:
                bad.append(f"--param {key}={value!r}: {problem}")
        if bad:
            raise ConfigError(bad, f"{method} parameters")
    elif params:
        raise ConfigError(f"linear adapter merges take no --param (found {sorted(params)}); use --weights")
    if densities is not None and len(densities) != len(adapters):
        raise ConfigError(f"{len(densities)} densities for {len(adapters)} adapters; give one per adapter")
    if densities is not None and any(not 0 < d <= 1 for d in densities):
        raise ConfigError(f"densities must lie in (0, 1], found {list(densities)}")
    if not adapters:
        raise ConfigError("give at least one adapter to merge")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(
            f"weights must be finite numbers, found {list(weights)}; give one finite weight per adapter"
        )
    if not math.isfinite(lambda_):
        raise ConfigError(f"lambda must be a finite number, found {lambda_}")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be at least 1, found {rank}")
    if method != "linear":  # the method's own checks, as a merge config's get them at plan time
        m, shared, per = _basis_params(method, weights, densities or [1.0] * len(adapters), settings)
        trouble = _basis_trouble(method, m, shared, per)
        if trouble:
            raise ConfigError(trouble)
    read: list[Adapter] = []
    problems = []
    for p in adapters:
        try:
            read.append(read_adapter(_hub.resolve(str(p))))
        except CheckpointError as exc:
            problems.extend(
                exc.problems if exc.source is None else [f"{exc.source}: {q}" for q in exc.problems]
            )
        except MergesmithError as exc:
            problems.append(str(exc))
    if problems:
        raise CheckpointError(problems)
    for ad in read:
        if ad.replaced:
            problems.append(
                f"{ad.file}: stores whole tensors ({printable(', '.join(sorted(ad.replaced)))}) as modules_to_save, which "
                "one LoRA adapter cannot sum; merge these adapters into a full model with a config instead"
            )
    modules = sorted({m for ad in read for m in ad.modules})
    shapes: dict[str, tuple[int, int]] = {}
    for ad in read:
        for target, mod in ad.modules.items():
            out_features = ad.shape(mod.b)[0]
            in_features = ad.shape(mod.a)[1]
            if mod.embedding or mod.transpose:
                out_features, in_features = in_features, out_features
            seen = shapes.setdefault(target, (out_features, in_features))
            if (
                seen != (out_features, in_features)
                or mod.embedding
                or mod.transpose != bool(read[0].config.get("fan_in_fan_out"))
            ):
                problems.append(
                    f"{ad.file}: {printable(target)} does not fit the other adapters (shape {(out_features, in_features)} vs "
                    f"{seen}, or an embedding / fan_in_fan_out layout); merge adapters of one base model"
                )
    if problems:
        raise CompatibilityError(problems)
    out = Path(out_dir)
    present = _output.check_output(out, [ad.dir for ad in read], force)
    transpose = bool(read[0].config.get("fan_in_fan_out", False))
    tensors: dict[str, torch.Tensor] = {}
    reports: list[MergedModule] = []
    ranks: dict[str, int] = {}
    for target in modules:
        parts = []
        members = []
        tainted = False  # a factor of this module holds NaN/Inf (already warned about)
        for i, (ad, w) in enumerate(zip(read, weights)):
            found = ad.modules.get(target)
            if found is not None and w != 0:
                scale = w * found.scaling if method == "linear" else found.scaling
                b_i, a_i = ad.tensor(found.b), ad.tensor(found.a)
                for name, t in ((found.b, b_i), (found.a, a_i)):
                    where = f"{ad.file}: {printable(name)}"
                    tainted |= _check_finite(t, where, "repair or replace that adapter", warnings)
                    if tainted and method != "linear":
                        raise MethodError(
                            f"{where} holds NaN or infinite values, which the {method} merge (an SVD of the "
                            "factors) cannot take, even with --on-nonfinite warn; repair or replace that adapter"
                        )
                parts.append((b_i, a_i, scale))
                members.append(i)
        module = target[: -len(".weight")]
        if not parts:
            continue
        if method != "linear":
            combine = _in_basis(
                method,
                target,
                [weights[i] for i in members],
                [densities[i] if densities is not None else 1.0 for i in members],
                settings,
                seed,
            )
            b, a = knots_factors(parts, combine, shapes[target])
        else:
            b, a = stack_factors(parts)
            if lambda_ != 1:
                a = a * lambda_
        if b.shape[1] == 0:  # nothing left of this module's updates
            continue
        error = 0.0
        finite = not tainted and bool(torch.isfinite(b).all() and torch.isfinite(a).all())
        if rank is not None and rank < b.shape[1] and finite:  # an SVD takes finite factors only
            b, a, error = truncate(b, a, rank)
        for kind, t in (("B", b), ("A", a)) if not tainted else ():
            _check_finite(
                t,
                f"{module}: merged factor {kind}",
                f"the weights {list(weights)} (lambda {lambda_:g}) overflow float32; use smaller weights",
                warnings,
            )
        ranks[module] = b.shape[1]
        reports.append(MergedModule(module, b.shape[1], error))
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b
    top = max(ranks.values(), default=1)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": read[0].config.get("base_model_name_or_path"),
        "r": top,
        "lora_alpha": top,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": transpose,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": read[0].config.get("task_type"),
        "inference_mode": True,
    }
    with _output.staged_output(
        out, [ad.dir for ad in read], force=force, kind="lora merge", seen=present
    ) as stage:
        writer = ShardWriter(
            stage / "adapter_model.safetensors", {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        )
        with writer.aborting():
            for key, t in tensors.items():
                writer.write(key, t)
            writer.close()
        _output.write_file(stage / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        _output.write_file(
            stage / "merge_report.json",
            json.dumps(
                [{"module": r.module, "rank": r.rank, "relative_error": r.relative_error} for r in reports],
                indent=2,
            )
            + "\n",
        )
        if warnings:
            inputs_note = (
                "\n\nWritten with `--on-nonfinite warn`; these tensors were written as they came out:\n\n"
            )
            inputs_note += "\n".join(f"- {w}" for w in warnings)
        else:
            inputs_note = ""
        inputs = "\n".join(f"- `{p}` × {w:g}" for p, w in zip(adapters, weights))
        worst = max((r.relative_error for r in reports), default=0.0)
        mean = math.fsum(r.relative_error for r in reports) / max(1, len(reports))
        how = "exact" if rank is None else f"truncated to rank {rank} by SVD of the stacked factors"
        _output.write_file(
            stage / "README.md",
            "---\nlibrary_name: peft\ntags:\n- mergesmith\n- lora-merge\n---\n\n# Merged LoRA adapter\n\n"
            f"{'The weighted sum' if method == 'linear' else f'The {method} merge (in the shared SVD basis)'} of these adapters' "
            f"updates, {how}:\n\n{inputs}\n\n"
            f"Relative Frobenius error per module: mean {mean:.3g}, worst {worst:.3g} (merge_report.json).\n"
            f"{inputs_note}",
        )
    for message in warnings or ():
        print(f"warning: {printable(message)}", file=sys.stderr)
    return reports


def _check_finite(tensor: torch.Tensor, where: str, cause: str, warnings: list[str] | None) -> bool:
    """Refuse (or, with ``warnings``, record and return True for) a tensor holding NaN or infinities."""
    if bool(torch.isfinite(tensor.float().sum())):
        return False
    bad = int((~torch.isfinite(tensor.float())).sum())
    if not bad:
        return False
    message = f"{where} holds {bad} NaN or infinite values; {cause}"
    if warnings is None:
        raise MethodError(message + " (or merge anyway with --on-nonfinite warn)")
    warnings.append(message)
    return True
