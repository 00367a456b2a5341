"""How fast and in how much memory mergesmith merges three Llama-style checkpoints, against an I/O floor.

What it does, in one run:

1. Generates three synthetic Llama-shaped checkpoints (cached under ``--work``; reused while their
   shape spec is unchanged): sharded bf16 safetensors of about ``shard_bytes`` per file, an index
   and a ``config.json``. Model 0 is the base; models 1 and 2 are the base plus small noise, so
   their task vectors are small, dense and of mixed sign, like real fine-tunes. Generation is
   tensor by tensor, so it needs memory for a few copies of the largest tensor only.
2. Measures, side by side and with the same page-cache state:

   * the **floor**: one streaming pass that reads every input byte the merge reads (taken from
     the merge's own plan: each job's input tensors, in job order) and writes as many bytes as
     the merge writes, into shard files of the merge's sizes, each fsynced when complete, as
     the merge's writer does. Nothing is computed. It runs before every merge and once at the
     end; the fastest run is the floor the ratios are taken against, and the spread of the runs
     shows how noisy the machine's disk is;
   * each merge (``linear`` 0.4/0.3/0.3 and ``ties`` with base model 0, weight 0.5 and density
     0.5 for models 1 and 2, both ``dtype: bfloat16``) as its own subprocess,
     ``python -m mergesmith.cli merge CONFIG OUT --force --no-progress``, whose wall time
     (interpreter start and imports included) and peak RSS are recorded. The time the CLI
     reports (imports excluded) is shown too, as is the start-up cost of an interpreter that
     only imports torch and mergesmith. The peak RSS is the child's own ``VmHWM`` (high-water
     RSS of its address space), which a small wrapper writes at exit. ``ru_maxrss`` from
     ``wait4`` would be wrong: Linux folds the high-water mark of the address space a process
     had before ``exec`` into it, and ``subprocess`` starts children with ``vfork``, in the
     parent's address space, so a child would be charged this benchmark's own peak.

   Page cache: dropping it needs root and is not reliable in a container, so every measurement
   runs **warm** instead: right before each one, all input files are read once, and the input
   bytes resident in the page cache are checked with ``fincore`` where available. Dirty pages of
   earlier steps are flushed (``os.sync``) and earlier outputs deleted before each step, so no
   step pays for another's writeback.

3. Prints a table (method, wall seconds, floor seconds, merge/floor, peak RSS) and the input and
   output byte counts, and writes all numbers to ``WORK/results-SIZE.json``. Merge outputs are
   deleted after they are measured; the generated inputs are kept for the next run.

Run from the repository root, e.g. ``python bench/merge_speed.py --size tiny`` (seconds) or
``python bench/merge_speed.py`` (the default ``--size 1.5b``: three 2.8 GB inputs, 9 GB to
generate once; several minutes). ``--size 50m`` (54,927,872 parameters, 110 MB per model) is the
shape ``bench/vs_mergekit.py`` compares with mergekit on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesmith._safetensors import ShardWriter
from mergesmith.api import validate
from mergesmith.plan import Plan

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
CHUNK = 1 << 22  # elements generated at once; bounds generation memory besides the tensors themselves
READ_BLOCK = 1 << 24
N_MODELS = 3


@dataclass(frozen=True)
class Shape:
    """A Llama-style model shape, and how its checkpoints are sharded on disk."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    shard_bytes: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor name and shape, in the order a Hugging Face checkpoint stores them."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def parameters(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensors())

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


SIZES: dict[str, Shape] = {
    "tiny": Shape(
        hidden=256, intermediate=688, layers=2, vocab=1000, heads=8, kv_heads=2, shard_bytes=2 * 10**6
    ),
    # 54,927,872 parameters (110 MB per model in bf16): the "~50M" comparison with mergekit
    "50m": Shape(
        hidden=512, intermediate=1376, layers=8, vocab=32000, heads=8, kv_heads=2, shard_bytes=10**9
    ),
    "0.3b": Shape(
        hidden=1024, intermediate=2816, layers=24, vocab=32000, heads=16, kv_heads=4, shard_bytes=10**9
    ),
    "1.5b": Shape(
        hidden=2048, intermediate=5632, layers=28, vocab=32000, heads=32, kv_heads=8, shard_bytes=10**9
    ),
}

METHOD_CONFIGS: dict[str, str] = {
    "linear": """\
merge_method: linear
models:
  - model: {m0}
    parameters: {{weight: 0.4}}
  - model: {m1}
    parameters: {{weight: 0.3}}
  - model: {m2}
    parameters: {{weight: 0.3}}
dtype: bfloat16
""",
    "ties": """\
merge_method: ties
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
""",
}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def log(msg: str) -> None:
    print(msg, flush=True)


# -- generation -------------------------------------------------------------------------------------


def _pack(
    tensors: Sequence[tuple[str, tuple[int, ...]]], limit: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * 2
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _model_tensors(shape: tuple[int, ...], gen: torch.Generator) -> list[torch.Tensor]:
    """One tensor of the base and of each fine-tune, in bf16, drawn in float32 chunks."""
    norm = len(shape) == 1
    mean, std, noise = (1.0, 0.0, 0.01) if norm else (0.0, 0.02, 0.002)
    n = _numel(shape)
    outs = [torch.empty(n, dtype=torch.bfloat16) for _ in range(N_MODELS)]
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        base = torch.randn(stop - start, generator=gen).mul_(std).add_(mean)
        outs[0][start:stop] = base
        for out in outs[1:]:
            out[start:stop] = torch.randn(stop - start, generator=gen).mul_(noise).add_(base)
    return [o.reshape(shape) for o in outs]


def generate(shape: Shape, root: Path) -> list[Path]:
    """The three model directories under ``root``, written unless a complete set of this shape is there."""
    dirs = [root / f"model{i}" for i in range(N_MODELS)]
    marker = root / "complete.json"
    spec = asdict(shape)
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        log(f"inputs: reusing {root}")
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs:
        d.mkdir(parents=True)
    shards = _pack(shape.tensors(), shape.shard_bytes)
    names = [f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors" for s in range(len(shards))]
    gen = torch.Generator().manual_seed(0)
    total = shape.parameters * 2 * N_MODELS
    log(f"inputs: generating {N_MODELS} x {len(shards)} shard(s), {_gb(total)} in all, into {root}")
    start = time.perf_counter()
    for members, fname in zip(shards, names):
        writers = [ShardWriter(d / fname, {n: (torch.bfloat16, s) for n, s in members}) for d in dirs]
        for name, s in members:
            for writer, tensor in zip(writers, _model_tensors(s, gen)):
                writer.write(name, tensor)
        for writer in writers:
            writer.close()
        log(f"  {fname} done ({time.perf_counter() - start:.1f} s)")
    weight_map = {name: fname for members, fname in zip(shards, names) for name, _ in members}
    index = {"metadata": {"total_size": shape.parameters * 2}, "weight_map": weight_map}
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (d / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    marker.write_text(json.dumps(spec))
    took = time.perf_counter() - start
    log(f"inputs: generated in {took:.1f} s ({total / took / 1e9:.2f} GB/s)")
    return dirs


# -- page cache and the floor ---------------------------------------------------------------------


def _read_all(f: io.FileIO, view: memoryview, start: int, nbytes: int) -> None:
    f.seek(start)
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:nbytes])
        if not n:
            raise OSError(f"{f.name}: unexpected end of file")
        got += n


def warm_inputs(files: Sequence[Path]) -> dict[str, float | None]:
    """Read every input file once, so the measurement after it starts with a warm page cache."""
    buf = memoryview(bytearray(READ_BLOCK))
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    took = time.perf_counter() - start
    return {"read_s": took, "gb_per_s": total / took / 1e9, "resident": cache_residency(files)}


def cache_residency(files: Sequence[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache, from ``fincore``; None where it is missing."""
    tool = shutil.which("fincore")
    if tool is None:
        return None
    res = subprocess.run(
        [tool, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return None
    resident = size = 0
    for line in res.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            resident, size = resident + int(r), size + int(s)
    return min(1.0, resident / size) if size else None  # whole pages: the last one may overhang


def _spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte span of each tensor in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}


def floor_pass(plan: Plan, out_dir: Path) -> tuple[float, int, int]:
    """Read what the plan reads and write what it writes, computing nothing; (seconds, read, written)."""
    spans: dict[Path, dict[str, tuple[int, int]]] = {}
    for ckpt in plan.models:
        for path in ckpt.weight_files:
            spans[path] = _spans(path)
    biggest = max(
        [e - s for table in spans.values() for s, e in table.values()] + [j.nbytes for j in plan.jobs]
    )
    view = memoryview(bytearray(biggest))
    out_dir.mkdir(parents=True, exist_ok=True)
    read = written = 0
    start = time.perf_counter()
    handles = {path: open(path, "rb", buffering=0) for path in spans}  # noqa: SIM115
    try:
        for s, members in enumerate(plan.shards):
            with open(out_dir / f"shard-{s:05d}.bin", "wb") as out:
                for i in members:
                    job = plan.jobs[i]
                    for ref in job.all_inputs():
                        entry = plan.models[ref.model].entry(ref.name)
                        assert entry is not None  # the bench's inputs are safetensors files, read as stored
                        path = entry.file
                        lo, hi = spans[path][ref.name]
                        _read_all(handles[path], view, lo, hi - lo)
                        read += hi - lo
                    out.write(view[: job.nbytes])
                    written += job.nbytes
                out.flush()
                os.fsync(out.fileno())
    finally:
        for f in handles.values():
            f.close()
    return time.perf_counter() - start, read, written


# -- measured subprocesses ------------------------------------------------------------------------


# Runs a module as ``python -m`` would (``-m NAME``) or a script file as ``python FILE`` would
# (``FILE``), then writes the process's own peak RSS (VmHWM, kB) to the file named by
# $MERGE_SPEED_HWM at exit.
_WRAPPER = """\
import atexit, os, runpy, sys

def _report():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["MERGE_SPEED_HWM"], "w") as f:
        f.write(hwm)

atexit.register(_report)
target = sys.argv.pop(1)
if target == "-m":
    runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
else:
    sys.argv[0] = target
    runpy.run_path(target, run_name="__main__")
"""


@dataclass
class Measured:
    """One subprocess: its wall time, its own peak RSS, and how its RSS evolved (sampled)."""

    wall_s: float
    peak_rss: int | None
    ru_maxrss: int
    returncode: int
    output: str
    rss_timeline: list[tuple[float, int]] = field(default_factory=list)
    sampled_peak_at_s: float | None = None

    @property
    def sampled_peak(self) -> int | None:
        return max((rss for _, rss in self.rss_timeline), default=None)


def _sample_rss(pid: int, start: float, stop: threading.Event, timeline: list[tuple[float, int]]) -> None:
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return
    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            timeline.append((time.perf_counter() - start, proc.memory_info().rss))
            stop.wait(0.05)
    except psutil.Error:
        return


def run_module(module: str, args: Sequence[str], log_file: Path) -> Measured:
    """Run ``python -m module args`` from the repository root; time it and get its own peak RSS."""
    return run_python(sys.executable, ["-m", module], args, log_file)


def run_python(
    python: str | Path,
    target: Sequence[str],
    args: Sequence[str],
    log_file: Path,
    env: dict[str, str] | None = None,
) -> Measured:
    """Run ``python TARGET args`` from the repository root, where ``target`` is ``["-m", module]``
    or ``[script_file]``; time it (interpreter start-up included) and get its own peak RSS."""
    hwm_file = log_file.with_suffix(".hwm")
    hwm_file.unlink(missing_ok=True)
    env = {**os.environ, **(env or {}), "MERGE_SPEED_HWM": str(hwm_file)}
    cmd = [str(python), "-c", _WRAPPER, *target, *args]
    with open(log_file, "w+b") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()
        timeline: list[tuple[float, int]] = []
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, start, stop, timeline), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
        out.seek(0)
        text = out.read().decode(errors="replace")
    peak = int(hwm_file.read_text()) * 1024 if hwm_file.is_file() else None
    hwm_file.unlink(missing_ok=True)
    peak_at = max(timeline, key=lambda p: p[1])[0] if timeline else None
    return Measured(wall, peak, usage.ru_maxrss * 1024, proc.returncode, text, _thin(timeline, 0.25), peak_at)


def _thin(timeline: list[tuple[float, int]], step: float) -> list[tuple[float, int]]:
    """Keep the largest sample of each ``step`` seconds, rounded, for the JSON record."""
    buckets: dict[int, tuple[float, int]] = {}
    for t, rss in timeline:
        b = int(t / step)
        if b not in buckets or rss > buckets[b][1]:
            buckets[b] = (round(t, 2), rss)
    return [buckets[b] for b in sorted(buckets)]


def _reported_seconds(output: str) -> float | None:
    """The merge time the CLI prints ("... in 12.3 s"), which leaves out start-up and imports."""
    for line in reversed(output.splitlines()):
        if line.startswith("merged ") and line.endswith(" s") and " in " in line:
            try:
                return float(line.rsplit(" in ", 1)[1][:-2])
            except ValueError:
                return None
    return None


# -- the run ------------------------------------------------------------------------------------------


def _config_files(dirs: Sequence[Path], work: Path, size: str, methods: Sequence[str]) -> dict[str, Path]:
    out = {}
    (work / "configs").mkdir(parents=True, exist_ok=True)
    for method in methods:
        path = work / "configs" / f"{size}-{method}.yml"
        path.write_text(METHOD_CONFIGS[method].format(m0=dirs[0], m1=dirs[1], m2=dirs[2]))
        out[method] = path
    return out


def _fresh(path: Path) -> None:
    """Remove an earlier output and flush dirty pages, so the next step pays for no earlier writes."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _git_commit() -> str | None:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "mergesmith"], cwd=REPO, capture_output=True, text=True
    )
    return res.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _steps(methods: Sequence[str]) -> Iterator[str]:
    """The floor before every merge and once at the end, so its spread shows the machine's noise."""
    for m in methods:
        yield "floor"
        yield m
    yield "floor"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.3f}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]


def measure_merge(method: str, config: Path, out: Path, log_dir: Path) -> dict[str, Any]:
    """Run one merge through the CLI in its own process; its numbers, or exit if it fails."""
    args = ["merge", str(config), str(out), "--force", "--no-progress"]
    res = run_module("mergesmith.cli", args, log_dir / f"{method}.log")
    if res.returncode != 0:
        log(res.output)
        raise SystemExit(f"{method}: the merge failed with exit status {res.returncode}")
    reported = _reported_seconds(res.output)
    log(
        f"{method}: {res.wall_s:.2f} s wall ({reported} s reported by the CLI), peak RSS "
        f"{_gib(res.peak_rss)} GiB (sampled: {_gib(res.sampled_peak)} GiB "
        f"at {res.sampled_peak_at_s or 0:.1f} s)"
    )
    return {
        "command": ["python", "-m", "mergesmith.cli", *args],
        "wall_s": res.wall_s,
        "reported_s": reported,
        "peak_rss_bytes": res.peak_rss,
        "sampled_peak_rss_bytes": res.sampled_peak,
        "sampled_peak_at_s": res.sampled_peak_at_s,
        "ru_maxrss_bytes_incl_parent": res.ru_maxrss,
        "rss_timeline": res.rss_timeline,
        "output": res.output.strip(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.5b", help="model shape (default 1.5b)")
    ap.add_argument("--work", type=Path, default=REPO / "bench-out", help="inputs, outputs, results")
    ap.add_argument(
        "--methods", default="linear,ties", help="comma-separated, from: " + ", ".join(METHOD_CONFIGS)
    )
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged models")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_CONFIGS]
    if unknown or not methods:
        ap.error(f"unknown method(s): {', '.join(unknown) or '(none given)'}")
    shape = SIZES[args.size]
    work: Path = args.work.resolve()
    log(
        f"shape {args.size}: hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.layers} layers, "
        f"vocab {shape.vocab}, {shape.heads} heads / {shape.kv_heads} kv heads: {shape.parameters:,} "
        f"parameters ({shape.parameters / 1e9:.3f} B), {_gb(shape.parameters * 2)} in bf16 per model"
    )
    dirs = generate(shape, work / "models" / args.size)
    configs = _config_files(dirs, work, args.size, methods)
    plans = {m: validate(configs[m]) for m in methods}
    files = sorted({p for plan in plans.values() for ckpt in plan.models for p in ckpt.weight_files})
    floor_plan = plans[methods[0]]
    for m, plan in plans.items():
        if (plan.read_bytes, plan.write_bytes) != (floor_plan.read_bytes, floor_plan.write_bytes):
            raise SystemExit(
                f"{m} reads or writes other bytes than {methods[0]}; one floor cannot serve both"
            )
    out_root = work / "out"
    out_root.mkdir(parents=True, exist_ok=True)

    startup = run_module("mergesmith.api", [], out_root / "startup.log")
    log(
        f"start-up (python, import torch and mergesmith): {startup.wall_s:.2f} s, "
        f"{_gib(startup.peak_rss)} GiB"
    )

    floors: list[dict[str, Any]] = []
    merges: dict[str, dict[str, Any]] = {}
    for step in _steps(methods):
        out = out_root / step
        _fresh(out)
        warm = warm_inputs(files)
        resident = "unknown" if warm["resident"] is None else f"{warm['resident']:.1%}"
        log(
            f"{step}: inputs read at {warm['gb_per_s']:.2f} GB/s just before; "
            f"{resident} of them in page cache"
        )
        if step == "floor":
            took, read, written = floor_pass(floor_plan, out)
            if (read, written) != (floor_plan.read_bytes, floor_plan.write_bytes):
                raise SystemExit(f"floor read {read} and wrote {written} bytes, the plan says otherwise")
            floors.append({"seconds": took, "warm": warm})
            log(f"floor: {took:.2f} s (read {_gb(read)}, wrote {_gb(written)})")
        else:
            merges[step] = {**measure_merge(step, configs[step], out, out_root), "warm": warm}
        if step == "floor" or not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)

    floor_s = min(f["seconds"] for f in floors)
    rows = [("method", "merge s", "floor s", "merge/floor", "peak RSS GiB", "in-CLI s", "in-CLI/floor")]
    for m, r in merges.items():
        rep = r["reported_s"]
        r["ratio"] = r["wall_s"] / floor_s
        r["reported_ratio"] = None if rep is None else rep / floor_s
        rows.append(
            (
                m,
                f"{r['wall_s']:.2f}",
                f"{floor_s:.2f}",
                f"{r['ratio']:.2f}",
                _gib(r["peak_rss_bytes"]),
                "-" if rep is None else f"{rep:.1f}",
                "-" if rep is None else f"{rep / floor_s:.2f}",
            )
        )
    log("")
    log(
        f"size {args.size}: {shape.parameters / 1e9:.3f} B parameters x {N_MODELS} models, bf16, "
        "warm page cache"
    )
    for line in _table(rows):
        log(line)
    log(
        f"input bytes read: {floor_plan.read_bytes:,} ({_gb(floor_plan.read_bytes)}); "
        f"output bytes written: {floor_plan.write_bytes:,} ({_gb(floor_plan.write_bytes)})"
    )
    log(
        "floor runs: " + ", ".join(f"{f['seconds']:.2f} s" for f in floors) + " (the fastest is used); "
        f"start-up alone (python + imports): {startup.wall_s:.2f} s, {_gib(startup.peak_rss)} GiB"
    )
    result = {
        "size": args.size,
        "shape": asdict(shape),
        "parameters": shape.parameters,
        "input_bytes": floor_plan.read_bytes,
        "output_bytes": floor_plan.write_bytes,
        "floor_s": floor_s,
        "floors": floors,
        "merges": merges,
        "startup": {"wall_s": startup.wall_s, "peak_rss_bytes": startup.peak_rss},
        "page_cache": "warm: every input file is read in full right before each measured step",
        "peak_rss": "VmHWM of the merge process itself, written by it at exit",
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "commit": _git_commit(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = work / f"results-{args.size}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
