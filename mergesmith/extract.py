"""Extract a LoRA adapter from a fine-tuned model and its base, one tensor at a time.

For each weight matrix of the layer stack, the task matrix ``D = W_ft - W_base`` is factored by
a truncated SVD ``D ≈ U_r S_r V_r^T``; the adapter stores ``B = U_r S_r`` and ``A = V_r^T`` with
``lora_alpha = r`` for every module, so its scaling is 1 and ``B @ A`` is the best rank-r
approximation of ``D`` (Eckart-Young). The rank is fixed (``rank``) or, per module, the smallest
reaching a fraction ``energy`` of ``||D||_F^2``. Other tensors (embeddings, norms, biases) are
skipped or, with ``save_others``, stored whole as ``modules_to_save``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesmith import _hub, _output
from mergesmith._safetensors import ShardWriter
from mergesmith._text import printable
from mergesmith.architecture import architecture_for
from mergesmith.errors import CheckpointError, CompatibilityError, ConfigError, MethodError
from mergesmith.sources import Checkpoint

__all__ = ["ModuleReport", "extract_lora"]

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ModuleReport:
    """How well the adapter reproduces one module's change."""

    module: str
    rank: int
    relative_error: float  # ||D - B A||_F / ||D||_F (0 when D = 0)


def _rank_for(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, s.numel()))
    assert energy is not None
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    reached = torch.cumsum(power, 0) / total
    return max(1, min(s.numel(), int(torch.searchsorted(reached, torch.tensor(energy * (1 - 1e-12)))) + 1))


def _finite(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """Tensor ``name`` of ``ckpt``, refused when it holds NaN or infinities."""
    tensor = ckpt.get(name)
    if not bool(torch.isfinite(tensor.float().sum())):
        bad = int((~torch.isfinite(tensor.float())).sum())
        if bad:
            raise CheckpointError(
                f"{ckpt.name}: tensor {printable(name)} holds {bad} NaN or infinite values, which no adapter "
                "can reproduce; repair or replace that model"
            )
    return tensor


def extract_lora(
    base: str | Path,
    model: str | Path,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    save_others: bool = False,
    force: bool = False,
) -> list[ModuleReport]:
    """Write a PEFT LoRA adapter to ``out_dir`` that turns ``base`` into (an approximation of) ``model``."""
    if (rank is None) == (energy is None):
        raise ConfigError("give either a rank or an energy fraction, not both")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be at least 1, found {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], found {energy}")
    base_ckpt = Checkpoint(_hub.resolve(str(base)), name=str(base))
    tuned = Checkpoint(_hub.resolve(str(model)), name=str(model))
    arch = architecture_for(base_ckpt.config, keys=base_ckpt.keys())
    base_keys = set(base_ckpt.keys())
    names = tuned.keys()
    problems = []
    for name in names:
        if name not in base_keys:
            problems.append(
                f"{printable(name)}: in {tuned.name} but not in {base_ckpt.name}; extract from the model's own base"
            )
        elif tuned.info(name).shape != base_ckpt.info(name).shape:
            problems.append(
                f"{printable(name)}: shape {tuned.info(name).shape} in {tuned.name}, but {base_ckpt.info(name).shape} in "
                f"{base_ckpt.name}; extract from the model's own base"
            )
    if problems:
        raise CompatibilityError(problems)
    out = Path(out_dir)
    seen = _output.check_output(out, [base_ckpt.dir, tuned.dir], force)
    transpose = bool(arch.fan_in_fan_out)
    factors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    plans: list[tuple[str, str]] = []  # (tensor name, kind)
    for name in names:
        info = tuned.info(name)
        if not info.dtype.is_floating_point:
            continue
        matrix = len(info.shape) == 2 and arch.layer_of(name) is not None and name.endswith(".weight")
        if matrix:
            plans.append((name, "lora"))
        elif save_others:
            plans.append((name, "whole"))
    reports: list[ModuleReport] = []
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    others: list[str] = []
    for name, kind in plans:
        module = name[: -len(".weight")] if name.endswith(".weight") else name.rpartition(".")[0]
        if kind == "whole":
            tensors[f"{_PREFIX}{name}"] = _finite(tuned, name)
            if module not in others:
                others.append(module)
            continue
        delta = _finite(tuned, name).float() - _finite(base_ckpt, name).float()
        if not bool(torch.isfinite(delta).all()):
            raise MethodError(
                f"{name}: the difference between {tuned.name} and {base_ckpt.name} overflows float32; "
                "extract from the model's own base"
            )
        if transpose:
            delta = delta.T
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = _rank_for(s, rank, energy)
        total = float(torch.linalg.vector_norm(s))
        dropped = float(torch.linalg.vector_norm(s[r:]))
        reports.append(ModuleReport(module, r, dropped / total if total > 0 else 0.0))
        ranks[module] = r
        b = (u[:, :r] * s[:r]).contiguous()
        a = vh[:r].contiguous()
        dtype = tuned.info(name).dtype
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.to(dtype)
        del u, s, vh, delta
    for key, t in tensors.items():
        factors[key] = (t.dtype, tuple(t.shape))
    top = max(ranks.values(), default=1) if rank is None else rank
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": top,
        "lora_alpha": top,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
        "target_modules": sorted(ranks),
        "modules_to_save": others or None,
        "fan_in_fan_out": transpose,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    with _output.staged_output(
        out, [base_ckpt.dir, tuned.dir], force=force, kind="lora extract", seen=seen
    ) as stage:
        writer = ShardWriter(stage / "adapter_model.safetensors", factors)
        with writer.aborting():
            for key, t in tensors.items():
                writer.write(key, t)
            writer.close()
        _output.write_file(stage / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        report = [{"module": r.module, "rank": r.rank, "relative_error": r.relative_error} for r in reports]
        _output.write_file(stage / "extraction_report.json", json.dumps(report, indent=2) + "\n")
        worst = max((r.relative_error for r in reports), default=0.0)
        mean = math.fsum(r.relative_error for r in reports) / max(1, len(reports))
        _output.write_file(
            stage / "README.md",
            "---\nlibrary_name: peft\ntags:\n- mergesmith\n- lora-extraction\n---\n\n"
            f"# LoRA adapter extracted with mergesmith\n\nBase: `{base}`; fine-tuned model: `{model}`.\n"
            f"{len(reports)} modules, rank {rank if rank is not None else f'by energy {energy}'}; relative "
            f"Frobenius error per module: mean {mean:.3g}, worst {worst:.3g} (extraction_report.json).\n",
        )
    return reports
