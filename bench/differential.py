"""Differential test: run the same merge configs through mergekit and mergesmith and compare the outputs.

The script builds tiny fp32 Llama checkpoints (a base and three fine-tunes, each the base plus
``0.02 * noise``), writes one mergekit-schema YAML config per case, runs both tools on it as
subprocesses and compares the merged tensors.

Deterministic cases are compared entry by entry: per output tensor ``||a - b||_inf`` and
``||a - b||_inf / max(||a||_inf, tiny)`` with ``a`` the mergekit output; the table shows the
largest of each over all tensors, how many tensors were compared, and whether both outputs hold the
same tensor names, shapes and dtypes.

DARE and DELLA cases at density < 1 draw different random bits in each tool, so their outputs cannot match.
They are compared by distribution instead: per tensor, the fraction of entries that differ from the
base, and the L1 norm, mean and standard deviation of the merged task vector ``merged - base``,
side by side with relative differences. (DARE at density 1.0 keeps everything and is compared
exactly.)

mergekit is never imported here: it runs from its own virtualenv (``--mergekit-venv``, default
``/tmp/mkvenv``); the script skips with a message when it is not installed there. mergesmith runs
as ``python -m mergesmith.cli merge`` with this repository's ``.venv`` interpreter (or the current
one). Everything is written under ``bench-out/``; the tables also go to
``bench-out/differential.md``.

    .venv/bin/python bench/differential.py [--mergekit-venv /tmp/mkvenv] [--only linear slerp ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO / "bench-out"
TINY = 1e-30
EXACT_TOLERANCE = 1e-6
NOISE_SCALE = 0.02
SEED = 0

MODEL_SHAPE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
FINETUNE_SEEDS = {"ft1": 101, "ft2": 202, "ft3": 303}

State = dict[str, torch.Tensor]


# -- checkpoints ----------------------------------------------------------------------------------


def make_checkpoints(root: Path) -> dict[str, Path]:
    """A tiny fp32 Llama base and three fine-tunes (base + 0.02 * noise), saved as safetensors."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {name: root / name for name in ("base", *FINETUNE_SEEDS)}
    marker = root / "shape-v2.json"
    cached = marker.is_file() and json.loads(marker.read_text()) == MODEL_SHAPE
    if cached and all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(SEED)
    config = LlamaConfig(**MODEL_SHAPE, dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    base = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in model.state_dict().items()}
    states: dict[str, State] = {"base": base}
    for name, seed in FINETUNE_SEEDS.items():
        gen = torch.Generator().manual_seed(seed)
        states[name] = {
            k: (v + NOISE_SCALE * torch.randn(v.shape, generator=gen, dtype=v.dtype)).contiguous()
            for k, v in base.items()
        }
    for name, state in states.items():
        paths[name].mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(paths[name]))
        save_file(state, str(paths[name] / "model.safetensors"), metadata={"format": "pt"})
    marker.write_text(json.dumps(MODEL_SHAPE))
    return paths


def load_dir(directory: Path) -> State:
    """Every tensor stored in the ``*.safetensors`` files of a model directory."""
    from safetensors.torch import load_file

    out: State = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# -- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One merge config; ``config`` names models by label (base, ft1, ...) until written out."""

    name: str
    config: dict[str, Any]
    random: bool = False
    note: str = ""

    @property
    def method(self) -> str:
        return str(self.config["merge_method"])


def _models(labels: Sequence[str], **params: Sequence[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, label in enumerate(labels):
        entry: dict[str, Any] = {"model": label}
        settings = {key: values[i] for key, values in params.items() if values[i] is not None}
        if settings:
            entry["parameters"] = settings
        out.append(entry)
    return out


SLERP_GRADIENT: list[dict[str, Any]] = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
FTS = ("ft1", "ft2", "ft3")


def _slerp_slices(t: Any) -> dict[str, Any]:
    return {
        "merge_method": "slerp",
        "base_model": "base",
        "slices": [
            {
                "sources": [
                    {"model": "base", "layer_range": [0, 4]},
                    {"model": "ft1", "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {"t": t},
        "dtype": "float32",
    }


def _slerp_models(t: Any) -> dict[str, Any]:
    return {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "ft1"}],
        "parameters": {"t": t},
        "dtype": "float32",
    }


def _task(method: str, models: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": "base"}, *models],
    }
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = "float32"
    return cfg


CASES: list[Case] = [
    Case(
        "linear",
        {"merge_method": "linear", "models": _models(FTS, weight=[0.5, 0.3, 0.2]), "dtype": "float32"},
    ),
    Case(
        "linear normalize=false",
        {
            "merge_method": "linear",
            "models": _models(FTS, weight=[0.5, 0.3, 0.2]),
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
    ),
    Case(
        "linear w=1,.6,.4",
        {"merge_method": "linear", "models": _models(FTS, weight=[1.0, 0.6, 0.4]), "dtype": "float32"},
    ),
    Case(
        "linear w=1,.6,.4 normalize=false",
        {
            "merge_method": "linear",
            "models": _models(FTS, weight=[1.0, 0.6, 0.4]),
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
    ),
    Case("slerp models t=0.3", _slerp_models(0.3)),
    Case("slerp models t=gradient", _slerp_models(SLERP_GRADIENT)),
    Case("slerp slices t=0.3", _slerp_slices(0.3)),
    Case("slerp slices t=gradient", _slerp_slices(SLERP_GRADIENT)),
    Case(
        "task_arithmetic w=.7,-.3,.5 lambda=.8",
        _task("task_arithmetic", _models(FTS, weight=[0.7, -0.3, 0.5]), **{"lambda": 0.8}),
    ),
    Case(
        "task_arithmetic normalize=true",
        _task("task_arithmetic", _models(FTS, weight=[0.7, -0.3, 0.5]), normalize=True),
    ),
    Case("ties density=.5 weight=1", _task("ties", _models(FTS, density=[0.5] * 3, weight=[1.0] * 3))),
    Case(
        "ties density/weight gradients",
        _task(
            "ties",
            _models(
                FTS,
                density=[[1.0, 0.7, 0.3], [0.5, 0.9], [0.2, 0.4, 0.6, 0.8]],
                weight=[[0.2, 1.0], [1.0, 0.5, 0.2], 0.6],
            ),
        ),
    ),
    Case(
        "dare_linear density=1", _task("dare_linear", _models(FTS, density=[1.0] * 3, weight=[0.6, 0.3, 0.4]))
    ),
    Case("dare_ties density=1", _task("dare_ties", _models(FTS, density=[1.0] * 3, weight=[0.6, 0.3, 0.4]))),
    Case(
        "dare_linear density=.5",
        _task("dare_linear", _models(FTS, density=[0.5] * 3, weight=[0.6, 0.3, 0.4])),
        random=True,
    ),
    Case(
        "dare_linear density=.5 one model",
        _task("dare_linear", _models(["ft1"], density=[0.5], weight=[1.0])),
        random=True,
        note="One model with weight 1: the merged task vector is ft1's dropped and L1-rescaled task vector, "
        "so its L1 norm per tensor equals that of ft1 - base in both tools whatever the random bits "
        "(the l1 row's per-tensor max rel diff should be fp32 rounding), and about half the entries change.",
    ),
    Case(
        "dare_ties density=.5",
        _task("dare_ties", _models(FTS, density=[0.5] * 3, weight=[0.6, 0.3, 0.4])),
        random=True,
    ),
    Case(
        "breadcrumbs density=.6 gamma=.05",
        _task("breadcrumbs", _models(FTS, density=[0.6] * 3, gamma=[0.05] * 3, weight=[0.6, 0.3, 0.4])),
    ),
    Case(
        "breadcrumbs default gamma, density+gamma>1, rescale normalize",
        _task(
            "breadcrumbs",
            _models(FTS, density=[0.3, 0.9, 0.97], gamma=[None, 0.2, 0.1], weight=[0.6, 0.3, 0.4]),
            rescale=True,
            normalize=True,
        ),
    ),
    Case(
        "breadcrumbs_ties density=.5 gamma=.1",
        _task("breadcrumbs_ties", _models(FTS, density=[0.5] * 3, gamma=[0.1] * 3, weight=[1.0] * 3)),
    ),
    Case(
        "breadcrumbs_ties gradients normalize lambda",
        _task(
            "breadcrumbs_ties",
            _models(
                FTS,
                density=[[0.9, 0.4], 0.6, [0.2, 0.5, 0.8]],
                gamma=[0.02, [0.0, 0.2], None],
                weight=[[0.2, 1.0], 0.5, 0.7],
            ),
            normalize=True,
            **{"lambda": 0.8},
        ),
    ),
    Case(
        "passthrough stack ft1 [0,3) + ft2 [1,4)",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "ft1", "layer_range": [0, 3]}]},
                {"sources": [{"model": "ft2", "layer_range": [1, 4]}]},
            ],
            "dtype": "float32",
        },
    ),
    Case(
        "passthrough scale o_proj=0",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "ft1", "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {
                            "model": "ft1",
                            "layer_range": [1, 4],
                            "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
                        }
                    ]
                },
            ],
            "dtype": "float32",
        },
    ),
    Case("della density=1", _task("della", _models(FTS, density=[1.0] * 3, weight=[0.6, 0.3, 0.4]))),
    Case(
        "della_linear density=1",
        _task("della_linear", _models(FTS, density=[1.0] * 3, weight=[0.6, 0.3, 0.4])),
    ),
    Case(
        "della density=.5 epsilon=.15",
        _task("della", _models(FTS, density=[0.5] * 3, weight=[0.6, 0.3, 0.4])),
        random=True,
    ),
    Case(
        "della_linear density=.4 epsilon=.3",
        _task("della_linear", _models(FTS, density=[0.4] * 3, epsilon=[0.3] * 3, weight=[0.6, 0.3, 0.4])),
        random=True,
    ),
    Case(
        "della_linear density=.5 one model",
        _task("della_linear", _models(["ft1"], density=[0.5], epsilon=[0.2], weight=[1.0])),
        random=True,
        note="One model with weight 1: the merged task vector is ft1's dropped and L1-rescaled task vector, "
        "so its L1 norm per tensor equals that of ft1 - base in both tools whatever the random bits, "
        "and about half the entries change.",
    ),
    Case("sce", _task("sce", _models(FTS))),
    Case("sce select_topk=.3", _task("sce", _models(FTS), select_topk=0.3)),
    Case("sce select_topk=.7 two models", _task("sce", _models(["ft1", "ft2"]), select_topk=0.7)),
    Case("model_stock", _task("model_stock", _models(FTS))),
    Case("model_stock two models", _task("model_stock", _models(["ft1", "ft2"]))),
    Case("model_stock filter_wise", _task("model_stock", _models(FTS), filter_wise=True)),
    Case(
        "model_stock base=ft1 (correlated task vectors)",
        {
            "merge_method": "model_stock",
            "base_model": "ft1",
            "models": _models(["base", "ft2", "ft3"]),
            "parameters": {"filter_wise": True},
            "dtype": "float32",
        },
        note="With ft1 as the base the task vectors share -noise1, so their cosines are about 0.5.",
    ),
    Case(
        "nuslerp no base w=.3,.7",
        {"merge_method": "nuslerp", "models": _models(["ft1", "ft2"], weight=[0.3, 0.7]), "dtype": "float32"},
    ),
    Case("nuslerp base w=.3,.7", _task("nuslerp", _models(["ft1", "ft2"], weight=[0.3, 0.7]))),
    Case(
        "nuslerp base rows",
        _task("nuslerp", _models(["ft1", "ft2"], weight=[1.0, 0.5]), nuslerp_flatten=False),
    ),
    Case(
        "nuslerp base row_wise",
        _task(
            "nuslerp",
            _models(["ft1", "ft2"], weight=[[0.2, 1.0], 0.6]),
            nuslerp_flatten=False,
            nuslerp_row_wise=True,
        ),
    ),
    Case(
        "multislerp no base w=.2,.3,.5",
        {"merge_method": "multislerp", "models": _models(FTS, weight=[0.2, 0.3, 0.5]), "dtype": "float32"},
    ),
    Case("multislerp base", _task("multislerp", _models(FTS, weight=[0.2, 0.3, 0.5]))),
    Case(
        "multislerp base normalize_weights=false",
        _task("multislerp", _models(FTS, weight=[0.5, [0.2, 1.0], 0.4]), normalize_weights=False),
    ),
    Case(
        "karcher no base",
        {"merge_method": "karcher", "models": _models(FTS), "dtype": "float32"},
    ),
    Case("karcher base listed", _task("karcher", _models(["ft1", "ft2"]))),
    Case(
        "karcher max_iter=30 tol=1e-8",
        {
            "merge_method": "karcher",
            "models": _models(FTS),
            "parameters": {"max_iter": 30, "tol": 1e-8},
            "dtype": "float32",
        },
        note="tol below the float32 noise of the step length: both tools iterate to the noise floor.",
    ),
    Case(
        "karcher base_model not listed",
        {"merge_method": "karcher", "base_model": "base", "models": _models(FTS), "dtype": "float32"},
        note="mergekit adds a base_model missing from models to the inputs; karcher averages it in.",
    ),
    Case("nearswap t=.01", _task("nearswap", _models(["ft1"]), t=0.01)),
    Case("nearswap t=gradient", _task("nearswap", _models(["ft2"]), t=[0.001, 0.05])),
    Case("arcee_fusion", _task("arcee_fusion", _models(["ft1"]))),
    Case(
        "ram",
        _task("ram", _models(FTS)),
        note="Dense task vectors: every model counts everywhere (the mean).",
    ),
    Case(
        "ram epsilon=.02",
        _task("ram", _models(FTS), epsilon=0.02),
        note="epsilon near the noise scale: entries are changed by 0 to 3 models.",
    ),
    Case("ramplus_tl", _task("ramplus_tl", _models(FTS), epsilon=0.02)),
    Case(
        "ramplus_tl r=.5 alpha=gradient",
        _task("ramplus_tl", _models(["ft1", "ft2"]), r=0.5, alpha=[0.5, 3.0], epsilon=0.03),
    ),
]


def resolve_labels(value: Any, paths: Mapping[str, Path]) -> Any:
    """The config with model labels replaced by absolute checkpoint paths."""
    if isinstance(value, dict):
        return {
            k: (
                str(paths[v])
                if k in ("model", "base_model") and isinstance(v, str)
                else resolve_labels(v, paths)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [resolve_labels(v, paths) for v in value]
    return value


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# -- running the tools ----------------------------------------------------------------------------


@dataclass
class RunResult:
    ok: bool
    seconds: float
    log: str


def run_tool(argv: list[str], out_dir: Path, log_file: Path) -> RunResult:
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False)
    took = time.perf_counter() - start
    log = f"$ {' '.join(argv)}\n[rc={proc.returncode}]\n{proc.stdout}\n{proc.stderr}"
    log_file.write_text(log)
    return RunResult(proc.returncode == 0 and out_dir.is_dir(), took, log)


def mergekit_argv(venv: Path, cfg: Path, out: Path, seed: int) -> list[str]:
    return [
        str(venv / "bin" / "mergekit-yaml"),
        str(cfg),
        str(out),
        "--allow-crimes",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--random-seed",
        str(seed),
        "--quiet",
    ]


def mergesmith_argv(python: Path, cfg: Path, out: Path, seed: int) -> list[str]:
    return [
        str(python),
        "-m",
        "mergesmith.cli",
        "merge",
        str(cfg),
        str(out),
        "--force",
        "--no-progress",
        "--seed",
        str(seed),
    ]


def mergekit_available(venv: Path) -> str | None:
    """None when mergekit runs from ``venv``, else why not."""
    exe = venv / "bin" / "mergekit-yaml"
    py = venv / "bin" / "python"
    if not exe.is_file() or not py.is_file():
        return f"{exe} not found"
    probe = subprocess.run(
        [str(py), "-c", "import mergekit.merge"], capture_output=True, text=True, timeout=300, check=False
    )
    if probe.returncode != 0:
        return f"`import mergekit.merge` fails in {venv}: {probe.stderr.strip().splitlines()[-1:]}"
    return None


# -- comparing ------------------------------------------------------------------------------------


@dataclass
class TensorDiff:
    name: str
    abs_err: float
    rel_err: float
    ref_max: float


@dataclass
class ExactResult:
    case: Case
    diffs: list[TensorDiff]
    only_mergekit: list[str]
    only_mergesmith: list[str]
    mismatched: list[str]  # same name, different shape or dtype

    @property
    def sets_match(self) -> bool:
        return not (self.only_mergekit or self.only_mergesmith or self.mismatched)

    @property
    def max_rel(self) -> float:
        return max((d.rel_err for d in self.diffs), default=math.nan)

    @property
    def max_abs(self) -> float:
        return max((d.abs_err for d in self.diffs), default=math.nan)

    @property
    def worst(self) -> TensorDiff | None:
        return max(self.diffs, key=lambda d: d.rel_err, default=None)


def compare_exact(case: Case, ref: State, got: State) -> ExactResult:
    """Entry-by-entry comparison of every tensor both outputs hold (``ref`` is mergekit's)."""
    common = sorted(set(ref) & set(got))
    mismatched = [n for n in common if ref[n].shape != got[n].shape or ref[n].dtype != got[n].dtype]
    diffs = []
    for name in common:
        if name in mismatched:
            continue
        a, b = ref[name].double(), got[name].double()
        ref_max = float(a.abs().max()) if a.numel() else 0.0
        err = float((a - b).abs().max()) if a.numel() else 0.0
        diffs.append(TensorDiff(name, err, err / max(ref_max, TINY), ref_max))
    return ExactResult(case, diffs, sorted(set(ref) - set(got)), sorted(set(got) - set(ref)), mismatched)


STATS = ("frac_changed", "l1", "mean", "std")


def task_vector_stats(merged: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    tv = merged.double() - base.double()
    return {
        "frac_changed": float((merged != base).double().mean()),
        "l1": float(tv.abs().sum()),
        "mean": float(tv.mean()),
        "std": float(tv.std(unbiased=False)),
        "numel": float(tv.numel()),
    }


def pooled_stats(merged: State, base: State, names: Iterable[str]) -> dict[str, float]:
    """The same statistics over all the named tensors' entries pooled together."""
    tvs = [(merged[n].double() - base[n].double()).reshape(-1) for n in names]
    changed = [(merged[n] != base[n]).reshape(-1) for n in names]
    tv = torch.cat(tvs)
    return {
        "frac_changed": float(torch.cat(changed).double().mean()),
        "l1": float(tv.abs().sum()),
        "mean": float(tv.mean()),
        "std": float(tv.std(unbiased=False)),
    }


def rel_diff(stat: str, a: float, b: float, std: float) -> float:
    """|a - b| relative to |a|; for the mean (about 0) relative to the task vector's std instead."""
    scale = std if stat == "mean" else abs(a)
    return abs(a - b) / max(scale, TINY)


@dataclass
class DistResult:
    case: Case
    pooled: dict[str, tuple[float, float]]
    per_tensor: dict[str, dict[str, tuple[float, float]]]
    expected_frac: float | None
    exact: ExactResult = field(repr=False)
    rank_bins: tuple[list[float], list[float], list[float]] | None = None  # mergekit, mergesmith, expected

    @property
    def entries(self) -> int:
        return int(sum(stats["numel"][0] for stats in self.per_tensor.values()))

    def per_tensor_rel(self, stat: str) -> list[tuple[float, str]]:
        out = []
        for name, stats in self.per_tensor.items():
            a, b = stats[stat]
            out.append((rel_diff(stat, a, b, stats["std"][0]), name))
        return sorted(out)


RANK_BINS = 4


def rank_profile(merged: State, base: State, source: State, names: Iterable[str]) -> list[float]:
    """Fraction of entries changed from the base, in RANK_BINS equal bins of the magnitude rank of
    ``source - base`` within its row (rows along dimension 1; a 1-D tensor is one row), smallest
    magnitudes first, pooled over the named tensors."""
    changed, total = [0] * RANK_BINS, [0] * RANK_BINS
    for n in names:
        tv = source[n].double() - base[n].double()
        moved = merged[n] != base[n]
        if tv.dim() < 2:
            tv, moved = tv.reshape(1, -1), moved.reshape(1, -1)
        else:
            tv, moved = (
                tv.movedim(1, -1).reshape(-1, tv.shape[1]),
                moved.movedim(1, -1).reshape(-1, tv.shape[1]),
            )
        cols = tv.shape[1]
        if cols < 2:
            continue
        bins = tv.abs().argsort(dim=1).argsort(dim=1) * RANK_BINS // cols
        for b in range(RANK_BINS):
            sel = bins == b
            changed[b] += int(moved[sel].sum())
            total[b] += int(sel.sum())
    return [c / max(t, 1) for c, t in zip(changed, total)]


def della_rank_bins(
    case: Case, ref: State, got: State, base: State, source: State
) -> tuple[list[float], list[float], list[float]]:
    """Keep rate by magnitude-rank bin for a one-model DELLA case, both tools and the formula's mean."""
    params = next(m for m in case.config["models"] if m["model"] != "base").get("parameters", {})
    density, epsilon = float(params.get("density", 1.0)), float(params.get("epsilon", 0.15))
    names = [n for n in ref if n in got and n in base and n in source]
    expected = [density - epsilon + 2 * epsilon * (b + 0.5) / RANK_BINS for b in range(RANK_BINS)]
    return rank_profile(ref, base, source, names), rank_profile(got, base, source, names), expected


def compare_distribution(case: Case, ref: State, got: State, base: State) -> DistResult:
    exact = compare_exact(case, ref, got)
    names = [d.name for d in exact.diffs if d.name in base]
    per_tensor = {}
    for n in names:
        sa, sb = task_vector_stats(ref[n], base[n]), task_vector_stats(got[n], base[n])
        per_tensor[n] = {s: (sa[s], sb[s]) for s in (*STATS, "numel")}
    pa, pb = pooled_stats(ref, base, names), pooled_stats(got, base, names)
    expected = None
    if case.method in ("dare_linear", "della_linear"):
        keep_none = 1.0
        for m in case.config["models"]:
            density = m.get("parameters", {}).get("density")
            if isinstance(density, float):
                keep_none *= 1 - density
        expected = 1 - keep_none
    return DistResult(case, {s: (pa[s], pb[s]) for s in STATS}, per_tensor, expected, exact)


# -- reporting ------------------------------------------------------------------------------------


def _g(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.{digits}e}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4) else f"{x:.{digits + 1}g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, padded so that it also reads as plain text."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def exact_table(results: Sequence[ExactResult], failures: Mapping[str, str]) -> str:
    rows = []
    for r in results:
        worst = r.worst
        verdict = "ok" if r.max_rel <= EXACT_TOLERANCE and r.sets_match else "DIFFERS"
        rows.append(
            [
                r.case.name,
                r.case.method,
                _g(r.max_rel),
                _g(r.max_abs),
                str(len(r.diffs)),
                "yes" if r.sets_match else "NO",
                worst.name if worst is not None and r.max_rel > EXACT_TOLERANCE else "",
                verdict,
            ]
        )
    for name, why in failures.items():
        rows.append([name, "", "-", "-", "0", "-", why, "FAILED"])
    return table(
        ["config", "method", "max rel err", "max abs err", "tensors", "same set", "worst tensor", "verdict"],
        rows,
    )


def set_details(results: Sequence[ExactResult]) -> list[str]:
    lines = []
    for r in results:
        if r.sets_match:
            continue
        lines.append(
            f"- {r.case.name}: only in mergekit {r.only_mergekit}, only in mergesmith "
            f"{r.only_mergesmith}, shape/dtype differ {r.mismatched}"
        )
    return lines


def dist_table(d: DistResult) -> str:
    rows = []
    std = d.pooled["std"][0]
    for stat in STATS:
        a, b = d.pooled[stat]
        per = d.per_tensor_rel(stat)
        median = per[len(per) // 2][0] if per else math.nan
        big = [x for x in per if d.per_tensor[x[1]]["numel"][0] >= 4096]
        worst_big = big[-1] if big else (math.nan, "")
        rows.append(
            [
                stat,
                _g(a, 5),
                _g(b, 5),
                _g(rel_diff(stat, a, b, std)),
                _g(median),
                f"{_g(worst_big[0])} ({worst_big[1]})",
                f"{_g(per[-1][0])} ({per[-1][1]})" if per else "-",
            ]
        )
    text = table(
        [
            "stat (all tensors pooled)",
            "mergekit",
            "mergesmith",
            "rel diff",
            "per-tensor median rel",
            "per-tensor max rel, >=4096 entries",
            "per-tensor max rel, any",
        ],
        rows,
    )
    (fa, fb), n = d.pooled["frac_changed"], d.entries
    se = math.sqrt((fa * (1 - fa) + fb * (1 - fb)) / max(n, 1))
    text += (
        f"\n\nfrac_changed differs by {abs(fa - fb) / max(se, TINY):.2f} binomial standard errors "
        f"({n} entries per tool)"
    )
    if d.expected_frac is not None:
        text += f"; expected for {d.case.method} (1 - prod(1 - density)): {d.expected_frac:.5g}"
    return text


def dist_detail(d: DistResult) -> str:
    rows = []
    for name, stats in d.per_tensor.items():
        fa, fb = stats["frac_changed"]
        la, lb = stats["l1"]
        ma, mb = stats["mean"]
        sa, sb = stats["std"]
        rows.append(
            [
                name,
                str(int(stats["numel"][0])),
                f"{fa:.4f} / {fb:.4f}",
                f"{_g(la)} / {_g(lb)}",
                f"{_g(ma)} / {_g(mb)}",
                f"{_g(sa)} / {_g(sb)}",
            ]
        )
    return table(
        ["tensor", "entries", "frac changed mk / ms", "L1 mk / ms", "mean mk / ms", "std mk / ms"], rows
    )


# -- main -----------------------------------------------------------------------------------------


def default_python() -> Path:
    venv_python = REPO / ".venv" / "bin" / "python"
    return venv_python if venv_python.is_file() else Path(sys.executable)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/mkvenv"), help="virtualenv with mergekit")
    p.add_argument("--python", type=Path, default=default_python(), help="interpreter that runs mergesmith")
    p.add_argument("--out", type=Path, default=OUT_ROOT, help="output folder (default bench-out/)")
    p.add_argument("--seed", type=int, default=SEED, help="seed for the random methods, both tools")
    p.add_argument("--only", nargs="*", default=None, help="run only cases whose name contains one of these")
    p.add_argument("--details", action="store_true", help="also print per-tensor DARE statistics")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    venv: Path = args.mergekit_venv
    why = mergekit_available(venv)
    if why is not None:
        print(
            f"skipping the differential test: mergekit is not installed in {venv} ({why}).\n"
            f"Install it with: python -m venv {venv} && {venv}/bin/pip install mergekit"
        )
        return 0
    out: Path = args.out
    work = out / "differential"
    for sub in ("configs", "mergekit", "mergesmith", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    paths = make_checkpoints(work / "models")
    base = load_dir(paths["base"])
    cases = [c for c in CASES if not args.only or any(o in c.name for o in args.only)]

    exact: list[ExactResult] = []
    dists: list[DistResult] = []
    failures: dict[str, str] = {}
    for case in cases:
        s = slug(case.name)
        cfg = work / "configs" / f"{s}.yml"
        cfg.write_text(yaml.safe_dump(resolve_labels(case.config, paths), sort_keys=False))
        mk_out, ms_out = work / "mergekit" / s, work / "mergesmith" / s
        mk = run_tool(
            mergekit_argv(venv, cfg, mk_out, args.seed), mk_out, work / "logs" / f"{s}.mergekit.log"
        )
        ms = run_tool(
            mergesmith_argv(args.python, cfg, ms_out, args.seed),
            ms_out,
            work / "logs" / f"{s}.mergesmith.log",
        )
        print(
            f"{case.name}: mergekit {mk.seconds:.1f} s{'' if mk.ok else ' FAILED'}, "
            f"mergesmith {ms.seconds:.1f} s{'' if ms.ok else ' FAILED'}",
            file=sys.stderr,
        )
        if not (mk.ok and ms.ok):
            failed = [name for name, r in (("mergekit", mk), ("mergesmith", ms)) if not r.ok]
            failures[case.name] = f"{' and '.join(failed)} failed, see {work / 'logs'}/{s}.*.log"
            for name, r in (("mergekit", mk), ("mergesmith", ms)):
                if not r.ok:
                    print(f"--- {name} ---\n{r.log[-3000:]}", file=sys.stderr)
            continue
        ref, got = load_dir(mk_out), load_dir(ms_out)
        if case.random:
            dist = compare_distribution(case, ref, got, base)
            sources = [m["model"] for m in case.config["models"] if m["model"] != "base"]
            if case.method.startswith("della") and len(sources) == 1:
                dist.rank_bins = della_rank_bins(case, ref, got, base, load_dir(paths[sources[0]]))
            dists.append(dist)
        else:
            exact.append(compare_exact(case, ref, got))

    report = render(exact, dists, failures, args.details, args.seed)
    print(report)
    (out / "differential.md").write_text(
        "# mergekit vs mergesmith: differential test\n\n"
        + render(exact, dists, failures, True, args.seed)
        + "\n"
    )
    print(f"\nwritten to {out / 'differential.md'}", file=sys.stderr)
    bad = failures or any(r.max_rel > EXACT_TOLERANCE or not r.sets_match for r in exact)
    return 1 if bad else 0


def render(
    exact: Sequence[ExactResult],
    dists: Sequence[DistResult],
    failures: Mapping[str, str],
    details: bool,
    seed: int,
) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in MODEL_SHAPE.items())
    parts = [
        f"Tiny Llama fp32 ({shape}); fine-tunes = base + {NOISE_SCALE} * N(0, 1). "
        f"Relative error per tensor = ||mk - ms||_inf / max(||mk||_inf, {TINY:g}); tables show the max over "
        f"tensors. Tolerance {EXACT_TOLERANCE:g}.",
        "## Deterministic configs\n\n" + exact_table(exact, failures),
    ]
    notes = set_details([*exact, *(d.exact for d in dists)])
    if notes:
        parts.append("Tensor set differences:\n" + "\n".join(notes))

    def emit(d: DistResult) -> str:
        head = f"### {d.case.name} (seed {seed} in both tools; random bits differ)\n\n"
        if d.case.note:
            head += d.case.note + "\n\n"
        text = head + dist_table(d)
        if d.rank_bins is not None:
            mk, ms, want = d.rank_bins
            rows = [
                [f"{b + 1} of {RANK_BINS}", f"{mk[b]:.4f}", f"{ms[b]:.4f}", f"{want[b]:.4f}"]
                for b in range(RANK_BINS)
            ]
            text += "\n\nkeep rate by magnitude rank within rows (bin 1: smallest magnitudes):\n\n" + table(
                ["rank bin", "mergekit", "mergesmith", "formula (bin mean)"], rows
            )
        return text + (f"\n\nper tensor:\n\n{dist_detail(d)}" if details else "")

    if dists:
        parts.append(
            "## Random configs: distribution of the merged task vector (merged - base)\n\n"
            "rel diff = |mk - ms| / |mk|, except mean: |mk - ms| / std(mk task vector)."
        )
        parts += [emit(d) for d in dists]
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
