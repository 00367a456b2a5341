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

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from mergesmith.methods._steps import trim_to_top

__all__ = ["UNRELATED", "Diagnosis", "diagnose", "write_diagnosis"]

UNRELATED = 0.5  # a task vector this large against the base's weights is not a fine-tune
DEFAULT_DENSITY = 0.2


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
    read_bytes: int
    write_bytes: int
    peak_job_bytes: int
    read_seconds: float
    verdicts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"base: {self.base}"]
        for m in self.models:
            lines.append(
                f"  {m}: task vector {self.relative_norm[m]:.2%} of the base's norm; "
                f"{self.untouched[m]}/{self.tensors} tensors unchanged; trimming to density "
                f"{self.density[m]:g} drops {self.dropped_energy[m]:.1%} of its energy"
            )
        for pair, cos in self.cosine.items():
            lines.append(
                f"  {pair}: cosine {cos:+.3f}, opposite signs on {self.sign_conflict[pair]:.1%} of the entries both keep"
            )
        speed = self.read_bytes / self.read_seconds if self.read_seconds > 0 else 0.0
        lines.append(
            f"cost: reads {self.read_bytes / 1e9:.2f} GB, writes {self.write_bytes / 1e9:.2f} GB, largest job "
            f"{self.peak_job_bytes / 1e6:.1f} MB of float32 inputs; at the {speed / 1e6:.0f} MB/s this pass read, "
            f"reading takes {self.read_seconds:.1f} s"
        )
        lines += [f"warning: {v}" for v in self.verdicts]
        return "\n".join(lines)


def _layer_key(job: Any) -> str:
    if job.layer is not None:
        return str(job.layer)
    return "embed" if "embed" in job.name or job.name.endswith("wte.weight") else "other"


def diagnose(config: Any, *, density: float | None = None) -> Diagnosis:
    """Read every input tensor of ``config``'s merge once and measure its task vectors."""
    from mergesmith.api import _config
    from mergesmith.errors import ConfigError
    from mergesmith.execute import read_inputs, to_compute
    from mergesmith.plan import build_plan

    plan = build_plan(_config(config))
    if plan.config.base_model is None:
        raise ConfigError("diagnose compares task vectors against a base: the config needs a base_model")
    base_index = plan.refs.index(plan.config.base_model)
    names = [str(r) for r in plan.refs]
    others = [i for i in range(len(names)) if i != base_index]
    base_sq: dict[str, float] = defaultdict(float)
    delta_sq: dict[tuple[int, str], float] = defaultdict(float)
    dots: dict[tuple[int, int, str], float] = defaultdict(float)
    kept_both: dict[tuple[int, int, str], int] = defaultdict(int)
    opposite: dict[tuple[int, int, str], int] = defaultdict(int)
    kept_sq: dict[int, float] = defaultdict(float)
    untouched: dict[int, int] = defaultdict(int)
    densities: dict[int, float] = {}
    layers: list[str] = []
    peak = 0
    seconds = 0.0
    jobs = [j for j in plan.jobs if j.base is not None and j.rows is None]
    for job in jobs:
        key = _layer_key(job)
        if key not in layers:
            layers.append(key)
        start = time.perf_counter()
        raw = read_inputs(plan, job)
        seconds += time.perf_counter() - start
        tensors = to_compute(plan, job, raw)
        peak = max(peak, sum(t.numel() * 4 for t in tensors))
        base = tensors[0]
        base_sq[key] += float(base.double().pow(2).sum())
        trimmed: dict[int, torch.Tensor] = {}
        deltas: dict[int, torch.Tensor] = {}
        for ref, t, mp in zip(job.inputs, tensors[1:], job.model_params):
            m = ref.model
            d = t - base
            deltas[m] = d
            energy = float(d.double().pow(2).sum())
            delta_sq[(m, key)] += energy
            if energy == 0.0:
                untouched[m] += 1
            dens = density if density is not None else float(mp.get("density", DEFAULT_DENSITY))
            densities.setdefault(m, dens)
            kept = trim_to_top(d.clone(), dens)
            trimmed[m] = kept
            kept_sq[m] += float(kept.double().pow(2).sum())
        for a, b in combinations(sorted(deltas), 2):
            dots[(a, b, key)] += float((deltas[a].double() * deltas[b].double()).sum())
            both = (trimmed[a] != 0) & (trimmed[b] != 0)
            kept_both[(a, b, key)] += int(both.sum())
            opposite[(a, b, key)] += int((both & ((trimmed[a] > 0) != (trimmed[b] > 0))).sum())
    if not jobs:
        raise ConfigError("no tensor of the config has a base to compare with")

    def ratio(num: float, den: float) -> float:
        return math.sqrt(num / den) if den > 0 else math.inf

    total_base = sum(base_sq.values())
    relative = {names[m]: ratio(sum(delta_sq[(m, k)] for k in layers), total_base) for m in others}
    layer_norm = {names[m]: {k: ratio(delta_sq[(m, k)], base_sq[k]) for k in layers} for m in others}

    def cos(a: int, b: int, keys: list[str]) -> float:
        num = sum(dots[(a, b, k)] for k in keys)
        den = math.sqrt(sum(delta_sq[(a, k)] for k in keys) * sum(delta_sq[(b, k)] for k in keys))
        return num / den if den > 0 else 0.0

    def conflict(a: int, b: int, keys: list[str]) -> float:
        both = sum(kept_both[(a, b, k)] for k in keys)
        return sum(opposite[(a, b, k)] for k in keys) / both if both else 0.0

    pairs = list(combinations(others, 2))
    label = {(a, b): f"{names[a]} | {names[b]}" for a, b in pairs}
    total_sq = {m: sum(delta_sq[(m, k)] for k in layers) for m in others}
    diagnosis = Diagnosis(
        base=names[base_index],
        models=[names[m] for m in others],
        layers=layers,
        relative_norm=relative,
        layer_norm=layer_norm,
        untouched={names[m]: untouched[m] for m in others},
        tensors=len(jobs),
        cosine={label[p]: cos(*p, layers) for p in pairs},
        layer_cosine={label[p]: {k: cos(*p, [k]) for k in layers} for p in pairs},
        sign_conflict={label[p]: conflict(*p, layers) for p in pairs},
        layer_sign_conflict={label[p]: {k: conflict(*p, [k]) for k in layers} for p in pairs},
        density={names[m]: densities.get(m, DEFAULT_DENSITY) for m in others},
        dropped_energy={names[m]: 1 - kept_sq[m] / total_sq[m] if total_sq[m] > 0 else 0.0 for m in others},
        read_bytes=plan.read_bytes,
        write_bytes=plan.write_bytes,
        peak_job_bytes=peak,
        read_seconds=seconds,
    )
    for name in diagnosis.models:
        if relative[name] >= UNRELATED:
            diagnosis.verdicts.append(
                f"{name} was not fine-tuned from {diagnosis.base}: its difference from it is {relative[name]:.0%} of "
                "the base's weights, as large as the weights themselves; merging them averages unrelated "
                "weights. Merge only fine-tunes of one base model"
            )
        elif untouched_all(diagnosis, name):
            diagnosis.verdicts.append(
                f"{name} is identical to the base {diagnosis.base}: merging it changes nothing"
            )
    return diagnosis


def untouched_all(diagnosis: Diagnosis, model: str) -> bool:
    return diagnosis.untouched[model] == diagnosis.tensors


def write_diagnosis(diagnosis: Diagnosis, directory: str | Path) -> list[Path]:
    """``diagnosis.json``, and ``diagnosis.html`` with its PNG plots beside it (when matplotlib is
    installed); the HTML needs no server."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "diagnosis.json"]
    written[0].write_text(json.dumps(asdict(diagnosis), indent=2) + "\n", encoding="utf-8")
    plots = _plots(diagnosis, out)
    html = out / "diagnosis.html"
    html.write_text(_html(diagnosis, plots), encoding="utf-8")
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
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
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
<h2>Cost</h2><p>reads {d.read_bytes / 1e9:.3f} GB, writes {d.write_bytes / 1e9:.3f} GB;
largest job {d.peak_job_bytes / 1e6:.1f} MB; reading took {d.read_seconds:.2f} s</p>
{images}
</body></html>
"""
