"""What a merge is about to combine: lineage, task-vector sizes and conflicts, read in one pass.

For each model merged into a base, its task vector is ``d = theta - theta_base``. Read tensor by
tensor, as a merge reads them, each input tensor once:

- lineage: per layer, ``|d| / |theta_base|`` (Frobenius norms over the layer's tensors); tensors
  the fine-tune left bit-identical; a verdict when the task vector is as large as the weights
  themselves (``UNRELATED`` of their norm), which fine-tuning does not do;
- conflicts, per pair of models, whole model and per layer: the cosine similarity of their task
  vectors, and among the entries both keep after trimming each tensor to its top ``density``
  magnitudes (what TIES keeps), the share with opposite signs; per model, the share of its task
  vector's energy that trimming drops (DARE drops ``1 - density`` of it in expectation);
- the cost of the merge: bytes to read and write, the largest job's working memory, and the time
  at the read speed this pass measured.
"""

from __future__ import annotations

import functools
import io
import json
import math
import sys
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergesmith import _memory, _output, _safetensors, defaults
from mergesmith.api import _config
from mergesmith.errors import ConfigError
from mergesmith.execute import read_inputs, to_compute
from mergesmith.plan import Job, Plan, build_plan
from mergesmith.vocab import read_vocab

__all__ = [
    "SAMPLE",
    "UNRELATED",
    "Diagnosis",
    "diagnose",
    "measured_jobs",
    "quick_summary",
    "untouched_all",
    "write_diagnosis",
]

UNRELATED = 0.5  # a task vector this large against the base's weights is not a fine-tune
DEFAULT_DENSITY = defaults.DENSITY
SAMPLE = defaults.SAMPLE  # entries per tensor the figures are computed on; smaller tensors are used whole
PENDING = 8  # tensors whose (sampled) entries wait for the figures' thread at most
CHUNK_BYTES = _safetensors.SAMPLE_CHUNK_BYTES  # a sampled tensor is read in pieces of this size


@dataclass
class Diagnosis:
    base: str
    models: list[str]
    layers: list[str]  # "embed", "0", "1", ..., "other"
    relative_norm: dict[str, float]  # model -> |d| / |base| over the whole model
    layer_norm: dict[str, dict[str, float]]  # model -> layer -> |d| / |base|
    untouched: dict[str, int]  # model -> tensors identical to the base's
    tensors: int
    cosine: dict[str, float]  # "a | b" -> cosine of the whole task vectors
    layer_cosine: dict[str, dict[str, float]]  # "a | b" -> layer -> cosine
    sign_conflict: dict[str, float]  # "a | b" -> share of opposite signs among entries both keep
    layer_sign_conflict: dict[str, dict[str, float]]
    density: dict[str, float]  # model -> the density used for trimming
    dropped_energy: dict[str, float]  # model -> share of |d|^2 that trimming to density drops
    vocabulary: dict[str, dict[str, Any]]  # model (base included) -> tokens, adds, lacks, aligned, filled
    vocab_rows: int | None  # output embedding rows where rows are matched by token
    read_bytes: int
    write_bytes: int
    peak_job_bytes: int
    read_seconds: float
    measured_bytes: int  # the bytes this pass read (read_bytes, or the probe's)
    sample: int  # entries per tensor the figures come from (0: every entry)
    probe: str | None = None  # the one tensor a quick diagnosis read
    verdicts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """What the terminal shows: one line per model and per pair, the vocabulary, the cost."""
        lines = [
            f"base: {self.base}" + (f"; measured on {self.probe}, one tensor per model" if self.probe else "")
        ]
        for m in self.models:
            unchanged = "" if self.probe else f"; {self.untouched[m]}/{self.tensors} tensors unchanged"
            lines.append(
                f"  {m}: task vector {self.relative_norm[m]:.2%} of the base's norm{unchanged}; "
                f"trimming to density {self.density[m]:g} drops {self.dropped_energy[m]:.1%} of its energy"
            )
        for pair, cos in self.cosine.items():
            lines.append(
                f"  {pair}: cosine {cos:+.3f}, opposite signs on {self.sign_conflict[pair]:.1%} of the entries both keep"
            )
        lines += self.vocabulary_lines()
        speed = self.measured_bytes / self.read_seconds if self.read_seconds > 0 else 0.0
        estimate = (
            f"; at the {speed / 1e9:.2f} GB/s read here, reading takes {self.read_bytes / speed:.1f} s"
            if speed
            else ""
        )
        lines.append(
            f"cost: reads {_size(self.read_bytes)}, writes {_size(self.write_bytes)}, largest job "
            f"{_size(self.peak_job_bytes)} of float32 inputs{estimate}"
        )
        lines += [f"warning: {v}" for v in self.verdicts]
        return "\n".join(lines)

    def vocabulary_lines(self) -> list[str]:
        known = {m: v for m, v in self.vocabulary.items() if v["tokens"] is not None}
        if not known:
            return ["vocabulary: no tokenizer files to compare"]
        if self.vocab_rows is None and all(
            not v.get("adds") and not v.get("lacks") and not v.get("moved") for v in known.values()
        ):
            return [
                f"vocabulary: the models share the base's {self.vocabulary[self.base]['tokens']} tokens"
                if self.vocabulary[self.base]["tokens"] is not None
                else "vocabulary: the models share one tokenizer"
            ]
        lines = [
            "vocabulary"
            + (f": {self.vocab_rows} output rows matched by token" if self.vocab_rows is not None else "")
            + ":"
        ]
        for m, v in self.vocabulary.items():
            if v["tokens"] is None:
                lines.append(f"  {m}: no tokenizer")
                continue
            text = f"  {m}: {v['tokens']} tokens"
            if "adds" in v:
                examples = ", ".join(repr(t) for t in v["added_examples"])
                text += f", adds {v['adds']} the base lacks" + (
                    f" ({examples}{', ...' if v['adds'] > 5 else ''})" if examples else ""
                )
                text += f", lacks {v['lacks']} of the base's, {v['moved']} at other ids"
            if "aligned" in v:
                text += (
                    f"; {v['aligned']} of its rows move to their token's output row, "
                    f"{v['filled']} output rows it lacks come from the others"
                )
            lines.append(text)
        return lines


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _layer_key(plan: Plan, job: Job) -> str:
    """The layer a job's figures are summed under: its index, preceded by its module's name where
    the model has several layer stacks (``visual.blocks 3``, ``model.layers 3``)."""
    if job.layer is not None:
        if len(plan.arch.parts) > 1:
            return f"{plan.arch.module_of(job.name)} {job.layer}"
        return str(job.layer)
    return "embed" if "embed" in job.name or job.name.endswith("wte.weight") else "other"


@functools.lru_cache(maxsize=32)
def _sample_index(n: int, sample: int) -> torch.Tensor:
    """``sample`` positions drawn uniformly from ``range(n)`` (seeded by ``n``), sorted for locality."""
    gen = torch.Generator().manual_seed(n)
    return torch.randint(n, (sample,), generator=gen).sort().values


def _pick(raw: list[torch.Tensor], sample: int) -> tuple[list[torch.Tensor], float]:
    """The same ``sample`` entries of each tensor, drawn uniformly, and the factor that scales sums
    over them to the whole tensor; tensors of at most ``sample`` entries whole, factor 1."""
    n = raw[0].numel()
    if sample <= 0 or n <= sample:
        return [t.reshape(-1) for t in raw], 1.0
    index = _sample_index(n, sample)
    return [t.reshape(-1).index_select(0, index) for t in raw], n / sample


def _sampled(
    reader: _safetensors.SampledReader, plan: Plan, job: Job, sample: int
) -> tuple[list[torch.Tensor], float, list[bool]] | None:
    """The same ``sample`` entries of each of a job's input tensors, read in pieces straight from
    their safetensors files, the factor that scales sums over them to the whole tensor, and whether
    each model's bytes equal the base's; None where an input is not stored as it is read, or the
    inputs differ in dtype or shape, or have at most ``sample`` entries."""
    refs = job.all_inputs()
    entries = []
    for ref in refs:
        entry = plan.models[ref.model].entry(ref.name)
        if entry is None:
            return None
        entries.append(entry)
    n = math.prod(entries[0].shape)
    if n <= sample:
        return None
    found = reader.read(entries, [ref.name for ref in refs], _sample_index(n, sample))
    if found is None:
        return None
    picked, equal = found
    return picked, n / sample, equal


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: the stored bytes compare equal (values, where the dtypes differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return a.shape == b.shape and torch.equal(a.double(), b.double())
    return _safetensors.same_bytes(
        a.contiguous().view(-1).view(torch.uint8).numpy(), b.contiguous().view(-1).view(torch.uint8).numpy()
    )


class _Tally:
    """Sums over the tensors read so far, per layer key (sampled sums scaled to whole tensors)."""

    def __init__(self) -> None:
        self.base_sq: dict[str, float] = defaultdict(float)
        self.delta_sq: dict[tuple[int, str], float] = defaultdict(float)
        self.dots: dict[tuple[int, int, str], float] = defaultdict(float)
        self.kept_both: dict[tuple[int, int, str], float] = defaultdict(float)
        self.opposite: dict[tuple[int, int, str], float] = defaultdict(float)
        self.kept_sq: dict[int, float] = defaultdict(float)
        self.untouched: dict[int, int] = defaultdict(int)
        self.densities: dict[int, float] = {}
        self.layers: list[str] = []

    def add(
        self,
        key: str,
        base: torch.Tensor,
        models: list[int],
        tensors: list[torch.Tensor],
        densities: list[float],
        scale: float,
    ) -> None:
        """Add one tensor's figures (its sums scaled by ``scale``) under layer ``key``."""
        if key not in self.layers:
            self.layers.append(key)
        b = base.double().numpy()
        self.base_sq[key] += scale * float(np.einsum("i,i->", b, b))
        # subtracted in the compute dtype, as a merge does, then summed in float64
        deltas = (torch.stack(tensors) - base).double().numpy()
        # einsum rather than BLAS: no thread pool spinning beside the reader for these small products
        gram = np.einsum("ij,kj->ik", deltas, deltas).tolist()
        kept = np.stack([np.where(_top(d, dens), d, 0.0) for d, dens in zip(deltas, densities)])
        kept_sq = np.einsum("ij,ij->i", kept, kept).tolist()
        signs = np.sign(kept)  # 0 where trimming dropped the entry
        agree = np.einsum(
            "ij,kj->ik", signs, signs
        ).tolist()  # among entries both keep: same signs minus opposite ones
        held = np.abs(signs)
        both = np.einsum("ij,kj->ik", held, held).tolist()
        for i, m in enumerate(models):
            self.delta_sq[(m, key)] += scale * gram[i][i]
            self.kept_sq[m] += scale * kept_sq[i]
            self.densities.setdefault(m, densities[i])
        for i, j in combinations(range(len(models)), 2):
            pair = (min(models[i], models[j]), max(models[i], models[j]), key)
            self.dots[pair] += scale * gram[i][j]
            self.kept_both[pair] += scale * both[i][j]
            self.opposite[pair] += scale * (both[i][j] - agree[i][j]) / 2


def _top(d: np.ndarray, density: float) -> np.ndarray:
    """What TIES keeps of ``d``: its ``max(1, floor(density * n))`` largest magnitudes, ties at the
    threshold taken in index order (as :func:`mergesmith.methods._steps.trim_to_top`)."""
    n = d.size
    if density >= 1:
        return np.ones(n, dtype=bool)
    if density <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    k = max(1, int(density * n))
    magnitude = np.abs(d)
    threshold = np.partition(magnitude, n - k)[n - k]
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[np.flatnonzero(magnitude == threshold)[:missing]] = True
    return keep  # type: ignore[no-any-return]


def measured_jobs(plan: Plan) -> list[Job]:
    """The jobs whose inputs can be compared with the base entry by entry."""
    return [j for j in plan.jobs if j.base is not None and j.rows is None]


def _probe(jobs: list[Job]) -> Job:
    """One representative tensor: the largest of the middle layer (else the first job)."""
    layered = sorted({j.layer for j in jobs if j.layer is not None})
    if not layered:
        return jobs[0]
    middle = layered[len(layered) // 2]
    return max((j for j in jobs if j.layer == middle), key=lambda j: math.prod(j.shape))


def diagnose(
    config: Any,
    *,
    density: float | None = None,
    sample: int = SAMPLE,
    quick: bool = False,
    progress: bool = False,
) -> Diagnosis:
    """Read every input tensor of ``config``'s merge once and measure its task vectors.

    The figures of a tensor are computed on ``sample`` of its entries, drawn uniformly, the same
    ones in every model, and scaled to the whole tensor; tensors of at most ``sample`` entries, and
    all of them with ``sample=0``, are used whole. Every byte is still read, to tell tensors the
    fine-tune left bit-identical. ``quick`` reads one tensor per model (the largest of the middle
    layer) instead of all of them: what the merge command prints before it merges. ``progress``
    shows a bar of the bytes read on stderr.
    """
    plan = config if isinstance(config, Plan) else build_plan(_config(config))
    if plan.config.base_model is None:
        raise ConfigError("diagnose compares task vectors against a base: the config needs a base_model")
    base_index = plan.refs.index(plan.config.base_model)
    names = [str(r) for r in plan.refs]
    others = [i for i in range(len(names)) if i != base_index]
    jobs = measured_jobs(plan)
    if not jobs:
        raise ConfigError("no tensor of the config has a base to compare with")
    if quick:
        jobs = [_probe(jobs)]
    tally, read_seconds = _measure(plan, jobs, density, sample, progress)
    layers = tally.layers

    def ratio(num: float, den: float) -> float:
        return math.sqrt(num / den) if den > 0 else math.inf

    total_base = sum(tally.base_sq.values())
    total_sq = {m: sum(tally.delta_sq[(m, k)] for k in layers) for m in others}
    relative = {names[m]: ratio(total_sq[m], total_base) for m in others}
    layer_norm = {
        names[m]: {k: ratio(tally.delta_sq[(m, k)], tally.base_sq[k]) for k in layers} for m in others
    }

    def cos(a: int, b: int, keys: list[str]) -> float:
        num = sum(tally.dots[(a, b, k)] for k in keys)
        den = math.sqrt(sum(tally.delta_sq[(a, k)] for k in keys) * sum(tally.delta_sq[(b, k)] for k in keys))
        return num / den if den > 0 else 0.0

    def conflict(a: int, b: int, keys: list[str]) -> float:
        both = sum(tally.kept_both[(a, b, k)] for k in keys)
        return sum(tally.opposite[(a, b, k)] for k in keys) / both if both else 0.0

    pairs = list(combinations(others, 2))
    label = {(a, b): f"{names[a]} | {names[b]}" for a, b in pairs}
    vocabulary, vocab_rows = _vocabulary(plan, base_index, names)
    diagnosis = Diagnosis(
        base=names[base_index],
        models=[names[m] for m in others],
        layers=layers,
        relative_norm=relative,
        layer_norm=layer_norm,
        untouched={names[m]: tally.untouched[m] for m in others},
        tensors=len(jobs),
        cosine={label[p]: cos(*p, layers) for p in pairs},
        layer_cosine={label[p]: {k: cos(*p, [k]) for k in layers} for p in pairs},
        sign_conflict={label[p]: conflict(*p, layers) for p in pairs},
        layer_sign_conflict={label[p]: {k: conflict(*p, [k]) for k in layers} for p in pairs},
        density={names[m]: tally.densities.get(m, DEFAULT_DENSITY) for m in others},
        dropped_energy={
            names[m]: 1 - tally.kept_sq[m] / total_sq[m] if total_sq[m] > 0 else 0.0 for m in others
        },
        vocabulary=vocabulary,
        vocab_rows=vocab_rows,
        read_bytes=plan.read_bytes,
        write_bytes=plan.write_bytes,
        peak_job_bytes=_peak_job_bytes(plan),
        read_seconds=read_seconds,
        measured_bytes=sum(_input_bytes(plan, j) for j in jobs),
        sample=sample,
        probe=jobs[0].name if quick else None,
    )
    for name in diagnosis.models:
        if relative[name] >= UNRELATED:
            diagnosis.verdicts.append(
                f"{name} was not fine-tuned from {diagnosis.base}: its difference from it is {relative[name]:.0%} of "
                "the base's weights, as large as the weights themselves; merging them averages unrelated "
                "weights. Merge only fine-tunes of one base model"
            )
        elif not quick and untouched_all(diagnosis, name):
            diagnosis.verdicts.append(
                f"{name} is identical to the base {diagnosis.base}: merging it changes nothing"
            )
    return diagnosis


def _measure(
    plan: Plan, jobs: list[Job], density: float | None, sample: int, progress: bool
) -> tuple[_Tally, float]:
    """Read the inputs of ``jobs`` once, in order, and sum their figures; also the seconds spent reading.

    The reading runs here; the figures of each tensor are worked out on a second thread, a few
    tensors behind.
    """
    tally = _Tally()

    def measure(job: Job, picked: list[torch.Tensor], scale: float, equal: list[bool]) -> None:
        values = to_compute(plan, job, picked)
        models = [ref.model for ref in job.inputs]
        dens = [
            density if density is not None else float(mp.get("density", DEFAULT_DENSITY))
            for mp in job.model_params
        ]
        tally.add(_layer_key(plan, job), values[0], models, values[1:], dens, scale)
        for m, e in zip(models, equal):
            tally.untouched[m] += int(e)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the per-tensor arithmetic is small: no intra-op pool beside the reader
    reader = _safetensors.SampledReader(CHUNK_BYTES)
    read_seconds = 0.0
    pending: deque[Future[None]] = deque()
    bar = _progress_bar(plan, jobs) if progress else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergesmith-diagnose") as worker:
        try:
            for job in jobs:
                found = _sampled(reader, plan, job, sample) if sample > 0 else None
                if found is None:  # a small tensor, or not in a safetensors file: read it whole
                    start = time.perf_counter()
                    raw = read_inputs(plan, job)
                    read_seconds += time.perf_counter() - start
                    picked, scale = _pick(raw, sample)
                    equal = [_identical(raw[0], r) for r in raw[1:]]
                    del raw
                else:
                    picked, scale, equal = found
                pending.append(worker.submit(measure, job, picked, scale, equal))
                del picked
                if bar is not None:
                    bar.update(_input_bytes(plan, job))
                if len(pending) > PENDING:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            for task in pending:
                task.cancel()
            reader.close()
            if bar is not None:
                bar.close()
            _memory.release()
            torch.set_num_threads(threads)
    return tally, read_seconds + reader.seconds


def _input_bytes(plan: Plan, job: Job) -> int:
    return sum(plan.models[r.model].info(r.name).nbytes for r in job.all_inputs())


def _progress_bar(plan: Plan, jobs: list[Job]) -> Any:
    """A bar on stderr counting the input bytes read."""
    from tqdm import tqdm

    total = sum(_input_bytes(plan, j) for j in jobs)
    return tqdm(total=total, unit="B", unit_scale=True, desc="diagnosing", file=sys.stderr)


def quick_summary(plan: Plan) -> str | None:
    """The lines the merge command prints before merging: a diagnosis from one tensor per model
    (see :func:`diagnose`), or None for a merge without a base to compare with."""
    if plan.config.base_model is None or not measured_jobs(plan):
        return None
    try:
        found = diagnose(plan, quick=True)
    except ConfigError:
        return None
    return found.summary()


def _peak_job_bytes(plan: Plan) -> int:
    """The float32 bytes of the largest job's inputs: what one merge step holds at once."""
    return max((math.prod(j.shape) * 4 * len(j.all_inputs()) for j in plan.jobs), default=0)


def _vocabulary(
    plan: Plan, base_index: int, names: list[str]
) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Per model: its tokens, those it adds to the base's and lacks from them, and, where the
    config matches embedding rows by token, how many of its rows move and how many it lacks."""
    vocabs = plan.vocab.vocabs if plan.vocab is not None else [read_vocab(m.dir) for m in plan.models]
    base_vocab = vocabs[base_index]
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        v = vocabs[i]
        entry: dict[str, Any] = {"tokens": len(v.ids) if v is not None else None}
        if v is not None and base_vocab is not None and i != base_index:
            added = sorted((t for t in v.ids if t not in base_vocab.ids), key=lambda t: v.ids[t])
            entry["adds"] = len(added)
            entry["added_examples"] = added[:5]
            entry["lacks"] = sum(1 for t in base_vocab.ids if t not in v.ids)
            entry["moved"] = sum(
                1 for t, k in v.ids.items() if t in base_vocab.ids and base_vocab.ids[t] != k
            )
        if plan.vocab is not None:
            rows = plan.vocab.maps[i]
            entry["aligned"] = int(((rows >= 0) & (rows != torch.arange(len(rows)))).sum())
            entry["filled"] = int((rows < 0).sum())
        out[name] = entry
    return out, len(plan.vocab.keys) if plan.vocab is not None else None


def untouched_all(diagnosis: Diagnosis, model: str) -> bool:
    return diagnosis.untouched[model] == diagnosis.tensors


def write_diagnosis(diagnosis: Diagnosis, directory: str | Path, inputs: Sequence[Path] = ()) -> list[Path]:
    """``diagnosis.json``, and ``diagnosis.html`` with its PNG plots beside it (when matplotlib is
    installed); the HTML needs no server. Each file is written whole or not at all (through a
    temporary file renamed into place). A ``directory`` inside one of ``inputs`` (the models'
    directories) is refused."""
    out = Path(directory)
    _output.check_inside(out, inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output.os_error(out, exc, "cannot create the directory") from None
    written = [out / "diagnosis.json"]
    _output.atomic_write(written[0], json.dumps(asdict(diagnosis), indent=2) + "\n")
    plots = _plots(diagnosis, out)
    html = out / "diagnosis.html"
    _output.atomic_write(html, _html(diagnosis, plots))
    return [*written, html, *plots]


def _plots(d: Diagnosis, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []

    def save(fig: Any, name: str) -> Path:
        fig.tight_layout()
        data = io.BytesIO()
        fig.savefig(data, dpi=100, format="png")
        plt.close(fig)
        _output.atomic_write(out / name, data.getvalue())
        return out / name

    def per_layer(series: dict[str, dict[str, float]], ylabel: str, title: str, name: str) -> Path:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for label, values in series.items():
            ax.plot(d.layers, [values[k] for k in d.layers], marker="o", label=label)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        return save(fig, name)

    paths = [per_layer(d.layer_norm, "|θ − θ_base| / |θ_base|", "task vector size per layer", "norms.png")]
    n = len(d.models)
    grid = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for i, j in combinations(range(n), 2):
        grid[i][j] = grid[j][i] = d.cosine[f"{d.models[i]} | {d.models[j]}"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * n, 2 + 0.7 * n))
    image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1)
    short = [Path(m).name or m for m in d.models]
    ax.set_xticks(range(n), short, rotation=30, ha="right")
    ax.set_yticks(range(n), short)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("task vector cosine similarity", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    paths.append(save(fig, "similarity.png"))
    if d.layer_sign_conflict:
        title = "sign conflicts per layer (what TIES resolves)"
        paths.append(
            per_layer(d.layer_sign_conflict, "opposite signs among kept entries", title, "conflicts.png")
        )
    return paths


def _html(d: Diagnosis, plots: list[Path]) -> str:
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(m)}</td><td>{d.relative_norm[m]:.2%}</td><td>{d.untouched[m]}/{d.tensors}</td>"
        f"<td>{d.density[m]:g}</td><td>{d.dropped_energy[m]:.1%}</td></tr>"
        for m in d.models
    )
    pairs = "".join(
        f"<tr><td>{escape(p)}</td><td>{c:+.3f}</td><td>{d.sign_conflict[p]:.1%}</td></tr>"
        for p, c in d.cosine.items()
    )
    warnings = "".join(f"<li class='warn'>{escape(v)}</li>" for v in d.verdicts)
    vocab = "".join(
        f"<tr><td>{escape(m)}</td>"
        + "".join(
            f"<td>{escape(str(v.get(k, '')))}</td>"
            for k in ("tokens", "adds", "lacks", "moved", "aligned", "filled")
        )
        + "</tr>"
        for m, v in d.vocabulary.items()
    )
    vocab_note = "; ".join(escape(line.strip()) for line in d.vocabulary_lines()[:1])
    images = "".join(f"<figure><img src='{p.name}' alt='{p.stem}'></figure>" for p in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mergesmith diagnosis</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}td,th{{padding:.2em .8em;text-align:left}}
.warn{{color:#a00}}img{{max-width:100%}}</style></head><body>
<h1>Diagnosis against {escape(d.base)}</h1>
<ul>{warnings}</ul>
<h2>Models</h2><table><tr><th>model</th><th>task vector / base</th><th>unchanged tensors</th>
<th>density</th><th>energy dropped by trimming</th></tr>{rows}</table>
<h2>Pairs</h2><table><tr><th>pair</th><th>cosine</th><th>opposite signs among kept entries</th></tr>{pairs}</table>
<h2>Vocabulary</h2><p>{vocab_note}</p><table><tr><th>model</th><th>tokens</th><th>adds</th>
<th>lacks</th><th>at other ids</th><th>rows moved</th><th>rows filled</th></tr>{vocab}</table>
<h2>Cost</h2><p>reads {d.read_bytes / 1e9:.3f} GB, writes {d.write_bytes / 1e9:.3f} GB;
largest job {d.peak_job_bytes / 1e6:.1f} MB; reading took {d.read_seconds:.2f} s</p>
{images}
</body></html>
"""
