"""mergesmith against mergekit, side by side in one run: TIES on three ~50M-parameter bf16 models.

    python bench/vs_mergekit.py [--mergekit /tmp/mkvenv/bin/mergekit-yaml] [--size 50m]
                                [--repeats 3] [--busy-lead 5] [--work bench-out]

What it does:

1. Generates (or reuses) the three synthetic Llama-shaped checkpoints of ``bench/merge_speed.py``
   at ``--size`` (default ``50m``: hidden 512, intermediate 1376, 8 layers, 8 heads / 2 kv heads,
   vocab 32000, untied embeddings: 54,927,872 parameters, 110 MB per model in bf16, one shard
   each). Model 0 is the base, models 1 and 2 are the base plus small noise.
2. Writes one mergekit-schema YAML that both tools run unchanged: ``merge_method: ties``,
   ``base_model`` model 0, models 1 and 2 with ``weight: 0.5, density: 0.5``, ``dtype: bfloat16``.
3. Times both command-line tools as subprocesses, wall time from ``fork`` to exit (interpreter
   start-up and imports included), with the peak RSS of each process itself (its ``VmHWM``,
   written at exit by the wrapper of ``merge_speed.py``; see there why not ``ru_maxrss``):

   * mergekit: ``mergekit-yaml CONFIG OUT --no-copy-tokenizer`` run by its own virtualenv's
     interpreter (the one in the executable's ``#!`` line). Every other option is mergekit's
     default: no ``--cuda``, no ``-j/--num-threads`` (torch's default, one thread per core), no
     ``--async-write`` (``--write-threads 1``), ``--out-shard-size 5B``, model card written,
     progress bars on. ``--lazy-unpickle`` only concerns pickled ``.bin`` inputs and is left off.
     ``--no-copy-tokenizer`` because the synthetic models have no tokenizer: by default mergekit
     tries to build one anyway, fails, logs a traceback and carries on, which only adds time.
   * mergesmith: ``python -m mergesmith.cli merge CONFIG OUT`` from this checkout, default flags
     (the output directory is removed before each run, so no ``--force`` is needed).

   Before every run the earlier output is deleted, dirty pages are flushed (``os.sync``) and every
   input file is read once, so each run starts with the inputs in the page cache (checked with
   ``fincore`` where available). The tools alternate (mergekit, mergesmith, then mergesmith,
   mergekit, ...), ``--repeats`` runs each (default 3); the table shows the median.
4. Checks after the first pair of runs that both outputs hold the same tensors and agree:
   every tensor is compared (max absolute difference, and the share of entries that differ by
   more than bf16 rounding, 2 ulp). The two tools cannot be bit-identical here: mergekit
   computes TIES in the checkpoint dtype (bf16), mergesmith in float32 rounded once at the end;
   and bf16 task vectors have many entries of exactly the threshold magnitude, among which
   mergekit's ``argsort`` keeps an unspecified subset and mergesmith the first in index order.
5. Runs the same again under contention, **busy**: as many CPU-bound competitors as the machine
   has cores (``--busy``, default ``os.cpu_count()``, 2 on the issue's machine), each a separate
   ``python -c 'while True: pass'`` process at normal priority, started ``--busy-lead`` seconds
   (default 5) before the first busy run and kept running until the last one ends, then stopped.
   The one-minute load average only climbs towards the competitors' count over a minute or so,
   so the load average at the start of each run is recorded next to it (mergesmith picks its
   thread count from it; mergekit always uses one thread per core).

Prints the load average at start, then a table (tool, condition, median / min / max wall seconds,
peak RSS, runs) and the ratio mergekit / mergesmith of the median wall times per condition, and
writes every number to ``WORK/vs_mergekit-SIZE.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mergesmith

import torch
from merge_speed import (
    METHOD_CONFIGS,
    N_MODELS,
    REPO,
    SIZES,
    _fresh,
    _gb,
    _gib,
    _git_commit,
    _table,
    generate,
    log,
    run_python,
    warm_inputs,
)

DEFAULT_MERGEKIT = Path("/tmp/mkvenv/bin/mergekit-yaml")
TOOLS = ("mergekit", "mergesmith")
# No network: both tools must find everything on disk.
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BF16_ULPS = 2  # entries further apart than this many bf16 units count as different
DENSITY = 0.5  # of both fine-tunes in METHOD_CONFIGS["ties"]


def _script_python(exe: Path) -> str:
    """The interpreter of a console script: its ``#!`` line."""
    with open(exe, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if not first.startswith("#!"):
        raise SystemExit(f"{exe}: no #! line; pass the mergekit-yaml console script of its virtualenv")
    return first[2:].strip().split()[0]


def _load(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def compare_outputs(mk: Path, ms: Path, models: Sequence[Path], density: float) -> dict[str, Any]:
    """How far apart the two merged models are, tensor by tensor, and whether TIES explains it.

    An entry counts as different when the outputs are further apart than ``BF16_ULPS`` bf16 units
    of the largest magnitude involved (the base's or either output's entry: mergekit rounds every
    intermediate to bf16). A different entry is *explained* when one of the task vectors there is
    within bf16 rounding (2**-7 relative) of that task vector's trim threshold, its ``k``-th
    largest magnitude: which of those entries survive the trim is not specified (ties broken by
    ``argsort``'s order in mergekit, by index in mergesmith; mergekit's bf16 subtraction moves
    magnitudes by up to one rounding), or when the task vectors nearly cancel there (their sum is
    within 2**-6 of the largest of them), where mergekit elects the sign from a sum rounded to
    bf16. The outputs agree when both hold the same tensors and no different entry is unexplained.
    (Equal weights are assumed for the cancellation test, as in this benchmark's config.)
    """
    a, b = _load(mk), _load(ms)
    inputs = [_load(d) for d in models]
    same_names = sorted(a) == sorted(b)
    worst: tuple[float, str] = (0.0, "")
    differing = unexplained = total = 0
    num = den = 0.0
    rows: dict[str, dict[str, Any]] = {}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            rows[name] = {
                "shape_or_dtype_differs": [list(x.shape), str(x.dtype), list(y.shape), str(y.dtype)]
            }
            unexplained += max(x.numel(), y.numel())
            continue
        xf, yf, base = x.float().reshape(-1), y.float().reshape(-1), inputs[0][name].float().reshape(-1)
        diff = (xf - yf).abs()
        scale = torch.maximum(torch.maximum(xf.abs(), yf.abs()), base.abs())
        far = diff > scale.mul_(BF16_ULPS * 2.0**-7)
        n = base.numel()
        deltas = [model[name].float().reshape(-1) - base for model in inputs[1:]]
        summed = torch.stack(deltas).sum(0).abs_()
        near_threshold = summed <= torch.stack(deltas).abs().amax(0).mul_(2.0**-6)  # sign election
        for delta in deltas:
            mags = delta.abs()
            k = max(1, int(density * n))
            threshold = torch.kthvalue(mags, n - k + 1).values
            near_threshold |= (mags - threshold).abs_() <= threshold * 2.0**-7
        n_far = int(torch.count_nonzero(far))
        n_unexplained = int(torch.count_nonzero(far & ~near_threshold))
        max_abs = float(diff.max()) if diff.numel() else 0.0
        num += float((xf - yf).square().sum())
        den += float((xf - base).square().sum())
        rows[name] = {
            "max_abs": max_abs,
            "max_abs_value": float(xf.abs().max()) if x.numel() else 0.0,
            "entries": n,
            "different": n_far,
            "unexplained": n_unexplained,
        }
        differing += n_far
        unexplained += n_unexplained
        total += n
        worst = max(worst, (max_abs, name))
    return {
        "agree": same_names and unexplained == 0,
        "same_tensor_names": same_names,
        "only_mergekit": sorted(set(a) - set(b)),
        "only_mergesmith": sorted(set(b) - set(a)),
        "tensors_compared": len(rows),
        "max_abs_diff": worst[0],
        "max_abs_diff_tensor": worst[1],
        "entries": total,
        "different_entries": differing,
        "unexplained_entries": unexplained,
        "task_vector_rel_l2_diff": (num / den) ** 0.5 if den else 0.0,
        "per_tensor": rows,
    }


def _show_agreement(agreement: dict[str, Any]) -> None:
    per = agreement["per_tensor"]
    some = [n for n in per if "embed" in n or "lm_head" in n or ".0." in n or n == "model.norm.weight"]
    for name in some[:8]:
        r = per[name]
        if "max_abs" in r:
            log(
                f"    {name}: max |mergekit - mergesmith| {r['max_abs']:.3g} (largest |value| "
                f"{r['max_abs_value']:.3g}), {r['different']:,} of {r['entries']:,} entries differ, "
                f"{r['unexplained']} unexplained"
            )
    log(
        f"  outputs agree: {'yes' if agreement['agree'] else 'NO'} (same tensors: "
        f"{agreement['same_tensor_names']}, {agreement['tensors_compared']} compared; max |diff| "
        f"{agreement['max_abs_diff']:.3g} in {agreement['max_abs_diff_tensor']}; "
        f"{agreement['different_entries']:,} of {agreement['entries']:,} entries "
        f"({agreement['different_entries'] / max(1, agreement['entries']):.2%}) differ by more than "
        f"{BF16_ULPS} bf16 ulp, {agreement['unexplained_entries']} of them unexplained by trim-threshold or sign-election near-ties; "
        f"merged task vectors differ by {agreement['task_vector_rel_l2_diff']:.1%} in L2)"
    )


class Competitors:
    """``n`` CPU-bound busy loops, each its own process; stopped (by pid) on exit."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Competitors:
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(
    tool: str,
    condition: str,
    rep: int,
    argv: dict[str, tuple[str, list[str]]],
    config: Path,
    out: Path,
    files: Sequence[Path],
    log_dir: Path,
) -> dict[str, Any]:
    _fresh(out)
    warm = warm_inputs(files)
    load = _loadavg()
    python, target = argv[tool]
    res = run_python(
        python,
        [target] if tool == "mergekit" else ["-m", target],
        _tool_args(tool, config, out),
        log_dir / f"{tool}-{condition}-{rep}.log",
        env=ENV,
    )
    if res.returncode != 0 or not out.is_dir():
        log(res.output[-4000:])
        raise SystemExit(f"{tool} ({condition}, run {rep + 1}) failed with exit status {res.returncode}")
    resident = "?" if warm["resident"] is None else f"{warm['resident']:.0%}"
    log(
        f"  {condition} run {rep + 1}: {tool:<10} {res.wall_s:6.2f} s  peak RSS {_gib(res.peak_rss)} GiB  "
        f"(load average {load[0]:.2f} at start, inputs {resident} cached)"
    )
    return {
        "tool": tool,
        "condition": condition,
        "run": rep + 1,
        "wall_s": res.wall_s,
        "peak_rss_bytes": res.peak_rss,
        "loadavg_at_start": load,
        "inputs_cached": warm["resident"],
        "output_tail": res.output.strip()[-2000:],
    }


def _tool_args(tool: str, config: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        return [str(config), str(out), "--no-copy-tokenizer"]
    return ["merge", str(config), str(out)]


def _order(rep: int) -> tuple[str, ...]:
    """mergekit first in even rounds, mergesmith first in odd ones: ABBAAB..."""
    return TOOLS if rep % 2 == 0 else TOOLS[::-1]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable")
    ap.add_argument("--size", choices=sorted(SIZES), default="50m", help="model shape (default 50m)")
    ap.add_argument("--work", type=Path, default=REPO / "bench-out", help="inputs, outputs, results")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tool per condition (default 3)")
    ap.add_argument(
        "--busy", type=int, default=os.cpu_count() or 1, help="busy-loop processes (default: cores)"
    )
    ap.add_argument("--busy-lead", type=float, default=5.0, help="seconds the busy loops run before timing")
    ap.add_argument("--conditions", default="quiet,busy", help="comma-separated: quiet, busy")
    args = ap.parse_args(argv)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if not conditions or any(c not in ("quiet", "busy") for c in conditions) or args.repeats < 1:
        ap.error("--conditions takes quiet and/or busy; --repeats at least 1")
    mk_exe = args.mergekit.resolve()
    if not mk_exe.is_file():
        raise SystemExit(f"{mk_exe}: not found; pass --mergekit PATH to mergekit-yaml")
    tools = {
        "mergekit": (_script_python(mk_exe), str(mk_exe)),
        "mergesmith": (sys.executable, "mergesmith.cli"),
    }

    shape = SIZES[args.size]
    work: Path = args.work.resolve()
    start_load = _loadavg()
    log(
        f"machine: {os.cpu_count()} cores, load average at start {start_load[0]:.2f} / {start_load[1]:.2f} / "
        f"{start_load[2]:.2f} (1/5/15 min); the machine may be shared with other work"
    )
    log(
        f"shape {args.size}: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, "
        f"vocab {shape.vocab}, {shape.heads} heads / {shape.kv_heads} kv heads: {shape.parameters:,} "
        f"parameters, {_gb(shape.parameters * 2)} in bf16 per model, {N_MODELS} models"
    )
    dirs = generate(shape, work / "models" / args.size)
    files = sorted(p for d in dirs for p in d.glob("*.safetensors"))
    config = work / "configs" / f"vs_mergekit-{args.size}-ties.yml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(METHOD_CONFIGS["ties"].format(m0=dirs[0], m1=dirs[1], m2=dirs[2]))
    out_root = work / "out" / "vs_mergekit"
    out_root.mkdir(parents=True, exist_ok=True)
    log(f"config (both tools): {config}")
    log(f"mergekit:   {tools['mergekit'][0]} {mk_exe} CONFIG OUT --no-copy-tokenizer")
    log(f"mergesmith: {sys.executable} -m mergesmith.cli merge CONFIG OUT  (from {REPO})")

    runs: list[dict[str, Any]] = []
    agreement: dict[str, Any] | None = None
    busy_note = (
        f"{args.busy} x `{sys.executable} -c 'while True: pass'` (one per core), started "
        f"{args.busy_lead:g} s before the first busy run and running until the last one ended"
    )
    for condition in conditions:
        log(f"{condition}:" + (f" {busy_note}" if condition == "busy" else " no competitor started"))
        competitors = Competitors(args.busy if condition == "busy" else 0)
        with competitors:
            if competitors.n:
                time.sleep(args.busy_lead)
                log(
                    f"  busy loops running (pids {', '.join(str(p.pid) for p in competitors.procs)}), "
                    f"load average now {_loadavg()[0]:.2f}"
                )
            for rep in range(args.repeats):
                for tool in _order(rep):
                    runs.append(
                        measure(tool, condition, rep, tools, config, out_root / tool, files, out_root)
                    )
                if agreement is None:
                    agreement = compare_outputs(out_root / "mergekit", out_root / "mergesmith", dirs, DENSITY)
                    _show_agreement(agreement)
    for tool in TOOLS:
        shutil.rmtree(out_root / tool, ignore_errors=True)

    summary: dict[str, dict[str, Any]] = {}
    rows = [("tool", "condition", "median s", "min s", "max s", "peak RSS GiB", "runs")]
    for condition in conditions:
        for tool in TOOLS:
            mine = [r for r in runs if r["tool"] == tool and r["condition"] == condition]
            walls = [r["wall_s"] for r in mine]
            peaks = [r["peak_rss_bytes"] for r in mine if r["peak_rss_bytes"] is not None]
            s = {
                "median_s": statistics.median(walls),
                "min_s": min(walls),
                "max_s": max(walls),
                "peak_rss_bytes": max(peaks) if peaks else None,
                "runs": len(walls),
            }
            summary[f"{tool}/{condition}"] = s
            rows.append(
                (
                    tool,
                    condition,
                    f"{s['median_s']:.2f}",
                    f"{s['min_s']:.2f}",
                    f"{s['max_s']:.2f}",
                    _gib(s["peak_rss_bytes"]),
                    str(s["runs"]),
                )
            )
    ratios = {
        c: summary[f"mergekit/{c}"]["median_s"] / summary[f"mergesmith/{c}"]["median_s"] for c in conditions
    }
    log("")
    log(
        f"TIES, {shape.parameters:,} parameters x {N_MODELS} bf16 models, warm page cache, "
        f"wall time including interpreter start-up; peak RSS is the largest of the runs"
    )
    for line in _table(rows):
        log(line)
    for c in conditions:
        log(f"mergekit / mergesmith ({c}): {ratios[c]:.2f}x")
    if "busy" in conditions:
        log(f"busy = {busy_note}")
    log(f"load average at start: {start_load[0]:.2f}, at end: {_loadavg()[0]:.2f}")
    if agreement is not None and not agreement["agree"]:
        log("WARNING: the outputs do not agree (see above); the comparison is not apples to apples")

    result = {
        "size": args.size,
        "parameters": shape.parameters,
        "config": config.read_text(),
        "commands": {
            "mergekit": [tools["mergekit"][0], str(mk_exe), "CONFIG", "OUT", "--no-copy-tokenizer"],
            "mergesmith": [sys.executable, "-m", "mergesmith.cli", "merge", "CONFIG", "OUT"],
        },
        "busy": busy_note,
        "summary": summary,
        "ratio_mergekit_over_mergesmith": ratios,
        "agreement": agreement,
        "runs": runs,
        "loadavg_at_start": start_load,
        "wall_time": "fork to exit of the tool's process, interpreter start-up and imports included",
        "peak_rss": "VmHWM of the tool's process itself, written by it at exit",
        "page_cache": "warm: every input file is read in full right before each run",
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "commit": _git_commit(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = work / f"vs_mergekit-{args.size}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
