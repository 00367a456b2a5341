"""The Python API: merge and validate, as the CLI does."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergesmith import _output, defaults
from mergesmith.config import MergeConfig, load_config
from mergesmith.errors import ConfigError
from mergesmith.execute import execute
from mergesmith.plan import DEFAULT_SHARD, Plan, build_plan

__all__ = ["check_device", "merge", "validate"]


def check_device(device: str | torch.device) -> torch.device:
    """The torch device to compute on, refused early when it does not exist here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r}: no CUDA device is available here (torch.cuda.is_available() is False); "
            "use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def _config(config: MergeConfig | str | Path | Mapping[str, Any]) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else load_config(config)


def validate(
    config: MergeConfig | str | Path | Mapping[str, Any], *, max_shard_size: int | str = DEFAULT_SHARD
) -> Plan:
    """Check a config and its inputs from headers alone; return the plan or raise every problem."""
    return build_plan(_config(config), max_shard_size=max_shard_size)


def merge(
    config: MergeConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD,
    device: str | torch.device = defaults.DEVICE,
    seed: int | None = None,
    progress: bool | None = None,
    full_digests: bool = False,
    on_nonfinite: str = defaults.ON_NONFINITE,
    before: Callable[[Plan], None] | None = None,
    threads: int | None = None,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    resume: bool = False,
    workers: int = defaults.WORKERS,
    executor: str = defaults.EXECUTOR,
    ray_address: str | None = None,
    tune_memory: bool = False,
) -> Plan:
    """Merge the models a config describes into ``out_dir``; return the plan that was run.

    ``config`` is a YAML file path, YAML text, a mapping, or a :class:`MergeConfig`. The output
    appears only once it is complete; an existing non-empty ``out_dir`` is replaced only with
    ``force``. Nothing is written inside an input model's directory. ``full_digests`` records the
    sha256 of every local input file in the model card, at the cost of reading the inputs twice.
    A merged tensor with NaN or infinities (or overflowing a float16 output) stops the merge and
    names the inputs that hold them; ``on_nonfinite="warn"`` writes it anyway, with a warning on
    stderr and in the model card. Two merges into the same ``out_dir`` at once are refused.
    ``before`` is called with the validated plan just before the first tensor is merged.
    ``threads``: torch's threads for the merge (default: the cores other work leaves idle,
    see ``mergesmith._threads``); the previous setting is restored afterwards.
    ``copy_tokenizer=False`` leaves the tokenizer files out unless the config's tokenizer_source
    asks for a tokenizer, and ``write_model_card=False`` leaves README.md out (as mergekit's
    ``--no-copy-tokenizer`` and ``--no-write-model-card`` do).

    Every finished shard is recorded in the staging directory; ``resume=True`` takes over the
    staging directory a killed merge into ``out_dir`` left and keeps its finished shards when the
    plan is the same (see docs/scale.md). ``workers=N`` merges the shards in N local processes,
    each with ``threads // N`` torch threads; ``executor="ray"`` runs them as Ray tasks on the
    cluster at ``ray_address`` (default: a local one), one per shard with ``threads`` CPUs each
    (default 1). The output is the same byte for byte however it is run.

    ``tune_memory=True`` sets the C allocator of this process (and of the workers) to keep
    freed blocks for the next tensor (``mergesmith._memory.tune``), as ``mergesmith merge`` does:
    faster, but a setting of the whole process that stays after the merge; off by default.
    """
    from mergesmith._threads import positive_threads, using_threads
    from mergesmith.execute import EXECUTORS

    if on_nonfinite not in ("error", "warn"):
        raise ConfigError(f"on_nonfinite must be 'error' or 'warn', not {on_nonfinite!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number of at least 1, not {workers!r}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if workers > 1 and executor == "ray":
        raise ConfigError(
            "workers (--workers) is for local processes; with executor ray (--executor ray) each shard "
            "is a Ray task of threads (--threads) CPUs"
        )
    if ray_address is not None and executor != "ray":
        raise ConfigError("ray_address (--ray-address) is for executor ray (--executor ray)")
    total = positive_threads(threads)
    per_worker = (threads or 1) if executor == "ray" else max(1, total // workers)
    dev = check_device(device)
    cfg = _config(config)
    if seed is not None:
        from dataclasses import replace

        cfg = replace(cfg, seed=seed)
    plan = build_plan(cfg, max_shard_size=max_shard_size)
    out = Path(out_dir)
    inputs = [d for m in plan.models for d in m.dirs]
    seen = _output.check_output(out, inputs, force)
    if before is not None:
        before(plan)
    with (
        using_threads(threads),
        _output.staged_output(out, inputs, force=force, seen=seen, resume=resume) as stage,
    ):
        execute(
            plan,
            stage,
            device=dev,
            progress=progress,
            full_digests=full_digests,
            on_nonfinite=on_nonfinite,
            copy_tokenizer=copy_tokenizer,
            write_model_card=write_model_card,
            workers=workers,
            threads=per_worker,
            executor=executor,
            ray_address=ray_address,
            tune_memory=tune_memory,
        )
    return plan
