"""Run a plan: read the inputs of one tensor, merge, write, free; then the side files."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from mergesmith import _memory, _output, card, chat_templates, defaults, vocab, whole_model
from mergesmith._json import read_json
from mergesmith._text import printable
from mergesmith.errors import CheckpointError, ConfigError, MergesmithError, MethodError
from mergesmith.methods import MergeInputs
from mergesmith.plan import COPY, Job, Plan
from mergesmith.sources import ModelSource

__all__ = [
    "EXECUTORS",
    "PROCESSOR_FILES",
    "TOKENIZER_FILES",
    "InputStream",
    "execute",
    "input_chat_template",
    "merge_job",
    "read_inputs",
    "side_files",
    "to_compute",
    "whole_model_thresholds",
]

# a multimodal model's processor files (transformers' PROCESSOR_NAME, IMAGE_PROCESSOR_NAME and
# FEATURE_EXTRACTOR_NAME, VIDEO_PROCESSOR_NAME, AUDIO_TOKENIZER_NAME, the processor's chat template),
# copied with the tokenizer: a processor wraps it
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "audio_tokenizer_config.json",
    "chat_template.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    *PROCESSOR_FILES,
)
COPIED_FROM_REFERENCE = ("generation_config.json",)

CHAT_TEMPLATES = chat_templates.BUILTIN


def read_inputs(plan: Plan, job: Job) -> list[torch.Tensor]:
    """Read a job's input tensors (base first) as stored. Runs on the reader thread."""
    return [plan.models[ref.model].get(ref.name) for ref in job.all_inputs()]


class InputStream:
    """Each job's inputs as stored, in job order, read one job ahead on a reader thread.

    With a CUDA ``device``, the reader thread also copies each job's inputs to the device (through
    pinned memory, on a copy stream of its own), so the copy of the next job's inputs overlaps the
    arithmetic of this one; the tensors handed out are then already on the device, and the compute
    stream waits for their copy. Inputs of copied tensors stay on the CPU, where they are written.

    Iterate it inside ``with``: leaving the block early cancels the read in flight.
    """

    def __init__(self, plan: Plan, jobs: Sequence[Job], device: torch.device | None = None) -> None:
        self.plan = plan
        self.jobs = list(jobs)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergesmith-read")
        self._pending: Future[tuple[list[torch.Tensor], Any]] | None = None
        self._device = device if device is not None and device.type == "cuda" else None
        self._copy = torch.cuda.Stream(self._device) if self._device is not None else None  # type: ignore[no-untyped-call]

    def __iter__(self) -> Iterator[tuple[Job, list[torch.Tensor]]]:
        for i, job in enumerate(self.jobs):
            # no local name holds the tensors, so they are freed as soon as the consumer drops them
            yield job, self._take(i)

    def _read(self, job: Job) -> tuple[list[torch.Tensor], Any]:
        """A job's inputs (on the reader thread), and the event their copy to the device records."""
        tensors = read_inputs(self.plan, job)
        if self._copy is None or job.method == COPY:
            return tensors, None
        with torch.cuda.stream(self._copy):
            moved = [t.pin_memory().to(self._device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._copy)
        return moved, event

    def _take(self, i: int) -> list[torch.Tensor]:
        """Job ``i``'s inputs; the read of job ``i + 1`` starts before they are returned."""
        if self._pending is None:
            self._pending = self._reader.submit(self._read, self.jobs[i])
        tensors, copied = self._pending.result()
        self._pending = self._reader.submit(self._read, self.jobs[i + 1]) if i + 1 < len(self.jobs) else None
        if copied is not None:  # the compute stream waits for the copy; their memory is its own after
            compute = torch.cuda.current_stream(self._device)
            compute.wait_event(copied)
            for t in tensors:
                t.record_stream(compute)
        return tensors

    def __enter__(self) -> InputStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._reader.shutdown(wait=True)


def to_compute(plan: Plan, job: Job, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Round inputs to the config's ``dtype`` if set, then widen them to float32 (float64 stays)."""
    if job.method == COPY:
        return tensors
    out = []
    for t in tensors:
        if plan.compute_dtype is not None:
            t = t.to(plan.compute_dtype)
        out.append(t.to(torch.float64 if t.dtype == torch.float64 else torch.float32))
    return out


def merge_job(
    plan: Plan,
    job: Job,
    tensors: list[torch.Tensor],
    device: torch.device,
    thresholds: Mapping[int, float] | None = None,
    warnings: list[str] | None = None,
    reuse: Sequence[MutableMapping[str, Any]] | None = None,
) -> torch.Tensor:
    """Merge one tensor from its inputs as read (:func:`read_inputs`); the list is emptied.

    ``reuse`` (one store per entry of ``job.inputs``) is handed to the method as
    ``MergeInputs.reuse`` when the same inputs are merged repeatedly (tuning trials).

    A result holding NaN or infinities, or overflowing a float16 output, raises a MethodError;
    with a ``warnings`` list the problem is appended there instead and the tensor is kept.
    """
    if job.method == COPY:
        if tensors[0].is_floating_point():
            _check_finite(plan, job, tensors[0], warnings)
        return tensors[0]
    method = job.merger
    if method is None:
        raise MethodError(f"{job.name}: unknown method {job.method!r}")
    raw = [t.to(device) for t in tensors]
    tensors.clear()
    tensors = to_compute(plan, job, raw)
    del raw
    rows = job.rows
    if rows is not None and rows.permute is not None:  # a tokenizer: section: rebuilt, merged whole
        tensors = vocab.permute_rows(rows, tensors)
        rows = None
    base = tensors[0] if job.base is not None else None
    others = tensors[1:] if job.base is not None else tensors
    params = job.built_params
    model_params = job.built_model_params
    trimmed = method.whole_model_trim is not None and method.whole_model_trim(params)
    job_thresholds = [thresholds[r.model] for r in job.inputs] if trimmed and thresholds else None

    def run(base: torch.Tensor | None, others: list[torch.Tensor], members: list[int]) -> torch.Tensor:
        return method.merge(
            MergeInputs(
                tensor_name=job.name,
                base=base,
                tensors=others,
                params=params,
                model_params=[model_params[i] for i in members],
                seed=plan.config.seed,
                thresholds=[job_thresholds[i] for i in members] if job_thresholds is not None else None,
                reuse=[reuse[i] for i in members] if reuse is not None and rows is None else None,
                models=[plan.refs[job.inputs[i].model].name for i in members],
            )
        )

    try:
        if rows is None:
            result = run(base, others, list(range(len(others))))
        else:
            result = vocab.merge_rows(rows, base, others, run, method.min_models)
    except MergesmithError:
        raise
    except Exception as exc:
        models = ", ".join(str(plan.refs[r.model]) for r in job.all_inputs())
        raise MethodError(
            f"{job.name}: {method.name} failed merging the tensors of {models}: {type(exc).__name__}: {exc}"
        ) from exc
    del tensors, base, others
    _check_finite(plan, job, result, warnings)
    if job.out_dtype == torch.float16 and result.numel():
        low, high = torch.aminmax(result.nan_to_num(0.0, 0.0, 0.0))
        peak = max(-float(low), float(high))
        if peak > torch.finfo(torch.float16).max:
            _report(
                f"{job.name}: values up to {peak:.4g} overflow float16 (max 65504) and would be written "
                "as infinities; use out_dtype: bfloat16 or float32",
                warnings,
            )
    return result.to(job.out_dtype)


def _check_finite(plan: Plan, job: Job, result: torch.Tensor, warnings: list[str] | None) -> None:
    # One reduction tells whether anything is non-finite; the count is taken only when it is.
    bad = 0 if bool(torch.isfinite(result.sum())) else int((~torch.isfinite(result)).sum())
    if bad:
        culprits = _nonfinite_inputs(plan, job)
        cause = (
            "non-finite inputs: " + ", ".join(culprits) + "; repair or replace those models"
            if culprits
            else "every input is finite: check the parameters for divisions by zero"
        )
        _report(f"{job.name}: {job.method} produced {bad} NaN or infinite values; {cause}", warnings)


def _report(message: str, warnings: list[str] | None) -> None:
    if warnings is None:
        raise MethodError(message + " (or merge anyway with --on-nonfinite warn)")
    warnings.append(message)


def _nonfinite_inputs(plan: Plan, job: Job) -> list[str]:
    """The inputs of ``job`` holding NaN or infinities, read again (only after a bad result)."""
    found = []
    for ref, tensor in zip(job.all_inputs(), read_inputs(plan, job)):
        count = int((~torch.isfinite(tensor.float())).sum())
        if count:
            found.append(f"{plan.refs[ref.model]}: {ref.name} ({count} values)")
    return found


def whole_model_thresholds(plan: Plan, device: torch.device) -> dict[int, float] | None:
    """Each model's whole-model magnitude threshold, for a method that trims over whole models.

    Two extra read passes over the inputs of the trimmed tensors (see mergesmith.whole_model).
    """
    densities = plan.whole_model_densities()
    if not densities:
        return None
    jobs = plan.whole_model_jobs()

    def task_vectors(job: Job) -> Callable[[], Iterator[tuple[int, torch.Tensor]]]:
        def make() -> Iterator[tuple[int, torch.Tensor]]:
            tensors = to_compute(plan, job, [t.to(device) for t in read_inputs(plan, job)])
            rows = job.rows
            if rows is not None and rows.permute is not None:
                tensors = vocab.permute_rows(rows, tensors)
                rows = None
            base = tensors[0]
            for i, (ref, t) in enumerate(zip(job.inputs, tensors[1:])):
                if rows is None:
                    yield ref.model, t.sub_(base)
                else:  # vocabulary rows: each token's row against the base's row for it
                    yield ref.model, vocab.row_task_vector(rows, base, t, i)
            _memory.release()

        return make

    print(
        f"trimming over whole models: 2 passes over {len(jobs)} tensors to find each model's threshold",
        file=sys.stderr,
    )
    return whole_model.magnitude_thresholds((task_vectors(j) for j in jobs), densities)


EXECUTORS = ("local", "ray")


def execute(
    plan: Plan,
    stage: Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    full_digests: bool = False,
    on_nonfinite: str = defaults.ON_NONFINITE,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    workers: int = defaults.WORKERS,
    threads: int = 1,
    executor: str = defaults.EXECUTOR,
    ray_address: str | None = None,
    tune_memory: bool = False,
) -> list[str]:
    """Write the merged model described by ``plan`` into the directory ``stage``.

    ``full_digests`` records the sha256 of every local input file in the model card (a full
    extra read of the inputs); otherwise local files get a quick digest. ``on_nonfinite="warn"``
    writes tensors with NaN, infinities or float16 overflow and returns the warnings (also
    printed and recorded in the model card); the default raises on the first one.
    ``copy_tokenizer=False`` copies no tokenizer files unless the config sets tokenizer_source;
    ``write_model_card=False`` writes no README.md.

    ``stage`` is empty, or the staging directory of a killed run taken over for ``--resume``:
    its finished shards are kept where they match (:class:`mergesmith.shards.Progress`).
    ``workers`` > 1 merges the shards in that many local processes of ``threads`` torch threads
    each; ``executor="ray"`` runs them as Ray tasks (:mod:`mergesmith.executors`).
    ``tune_memory`` tunes the C allocator of this process and the workers (:mod:`mergesmith._memory`).
    """
    from mergesmith import executors, shards

    if on_nonfinite not in ("error", "warn"):
        raise ValueError(f"on_nonfinite must be 'error' or 'warn', not {on_nonfinite!r}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    dev = torch.device(device)
    if tune_memory:
        _memory.tune()
    fp = shards.fingerprint(plan, dev)
    record = shards.Progress.start(plan, stage, fp)
    todo = record.todo()
    if record.thresholds is None and todo and executor != "ray":  # a Ray task finds them there
        record.thresholds = whole_model_thresholds(plan, dev)
    record.save()
    names = plan.shard_names()
    digests: dict[Path, str] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergesmith-digest") as hasher:
        digest_jobs = {
            p: hasher.submit(card.file_digest, p, full=full_digests)
            for ckpt in plan.models
            for p in ckpt.weight_files
        }
        if todo:
            task = shards.task_for(
                plan,
                stage,
                fp,
                device=dev,
                thresholds=record.thresholds,
                on_nonfinite=on_nonfinite,
                threads=threads,
                tune_memory=tune_memory,
            )
            if executor == "ray":
                executors.run_ray(task, todo, record, ray_address)
            elif workers > 1:
                executors.run_local(task, todo, record, workers)
            else:
                bar = _progress_bar(plan, progress, todo)
                try:
                    shards.run_shards(
                        plan,
                        stage,
                        todo,
                        record.record,
                        device=dev,
                        thresholds=record.thresholds,
                        on_nonfinite=on_nonfinite,
                        tensor_done=bar.update if bar is not None else None,
                    )
                finally:
                    if bar is not None:
                        bar.close()
        for path, fut in digest_jobs.items():
            digests[path] = fut.result()
    warnings = record.warnings()
    record.remove()
    for message in warnings:
        print(f"warning: {printable(message)}", file=sys.stderr)
    try:
        _write_side_files(
            plan,
            stage,
            names,
            digests,
            warnings,
            copy_tokenizer=copy_tokenizer or plan.config.tokenizer_source is not None,
            write_model_card=write_model_card,
        )
    except OSError as exc:
        raise _output.os_error(exc.filename or stage, exc) from None
    return warnings


def side_files(plan: Plan) -> list[tuple[ModelSource, tuple[str, ...]]]:
    """The input files copied into the output: each model with the names copied from it."""
    out: list[tuple[ModelSource, tuple[str, ...]]] = [(plan.models[plan.reference], COPIED_FROM_REFERENCE)]
    if plan.tokenizer_model is not None:
        out.append((plan.models[plan.tokenizer_model], TOKENIZER_FILES))
    return out


def input_chat_template(directory: Path) -> str | None:
    """A model's chat template as transformers loads it: chat_template.jinja, else a processor's
    chat_template.json, else the tokenizer_config.json entry (the ``default`` one of a list of
    named templates); None without one."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    processor = directory / "chat_template.json"
    if processor.is_file():
        data = read_json(processor, fix="repair chat_template.json or download the model again")
        value = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(value, str) and value:
            return value
    cfg_file = directory / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    data = read_json(cfg_file, fix="repair tokenizer_config.json or download the model again")
    value = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(value, list):
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _write_side_files(
    plan: Plan,
    stage: Path,
    names: list[str],
    digests: dict[Path, str],
    warnings: list[str],
    *,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
) -> None:
    if len(names) > 1:
        index = {
            "metadata": {"total_size": plan.write_bytes},
            "weight_map": {
                plan.jobs[i].name: names[s] for s, members in enumerate(plan.shards) for i in members
            },
        }
        (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if plan.out_config:
        (stage / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
    for model, files in side_files(plan):
        if files is TOKENIZER_FILES and not copy_tokenizer:
            continue
        for name in files:
            src = model.side_file(name)
            if src is not None:
                shutil.copyfile(src, stage / name)
    if plan.vocab is not None and plan.vocab.union and plan.tokenizer_model is not None:
        reference = plan.vocab.vocabs[plan.tokenizer_model]
        if reference is not None and reference.file.name == "tokenizer.json":
            known = [v for v in plan.vocab.vocabs if v is not None]
            vocab.union_tokenizer(reference.file, known, plan.vocab.keys, stage)
    template = plan.config.chat_template
    if template == "auto":
        template = chat_templates.most_common([t for m in plan.models if (t := input_chat_template(m.dir))])
    if template:
        (stage / "chat_template.jinja").write_text(CHAT_TEMPLATES.get(template, template))
        (stage / "chat_template.json").unlink(missing_ok=True)  # a processor would load it instead
        tok_cfg = stage / "tokenizer_config.json"
        if tok_cfg.is_file():
            data = read_json(tok_cfg, fix="repair tokenizer_config.json or download the model again")
            if not isinstance(data, dict):
                source = plan.models[plan.tokenizer_model or 0].dir / tok_cfg.name
                raise CheckpointError(
                    f"{source}: expected a JSON object of settings, found a {type(data).__name__}; "
                    "repair tokenizer_config.json or download the model again"
                )
            data.pop("chat_template", None)
            tok_cfg.write_text(json.dumps(data, indent=2) + "\n")
    if write_model_card:
        (stage / "README.md").write_text(card.model_card(plan, digests, warnings))
    (stage / "mergesmith_config.yml").write_text(plan.config.text)


class _Bar:
    """Progress on stderr: output bytes written, with the count of tensors done beside them."""

    def __init__(self, total: int, jobs: int) -> None:
        from tqdm import tqdm

        self.jobs = jobs
        self.done = 0
        self.tqdm = tqdm(total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr)
        self.tqdm.set_postfix_str(f"0/{jobs} tensors", refresh=False)

    def update(self, n: int) -> None:
        self.done += 1
        self.tqdm.set_postfix_str(f"{self.done}/{self.jobs} tensors", refresh=False)
        self.tqdm.update(n)

    def close(self) -> None:
        self.tqdm.close()


def _progress_bar(plan: Plan, progress: bool | None, shard_ids: Sequence[int]) -> _Bar | None:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    jobs = [plan.jobs[i] for s in shard_ids for i in plan.shards[s]]
    return _Bar(sum(j.nbytes for j in jobs), len(jobs))
