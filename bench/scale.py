"""How a merge scales over worker processes and Ray tasks, against the I/O floor, and what that
predicts for three 405B-class checkpoints on K nodes.

In one run, on three synthetic Llama-shaped bf16 checkpoints (made and cached by
``bench/merge_speed.py``'s generator; ``--size 1.5b`` by default):

1. the **floor**: one streaming pass that reads every input byte the merge reads and writes as many
   bytes as it writes (``merge_speed.floor_pass``), before every merge and once at the end; the
   fastest is the floor;
2. the merge (``--method``, TIES by default) through the CLI in its own process, once per setting:
   ``--workers 1``, ``--workers 2`` (or the counts ``--workers`` lists) and, unless ``--no-ray``,
   ``--executor ray`` on a local Ray cluster the CLI starts (its start-up is part of the time), each
   with a warm page cache, as ``merge_speed`` measures; where a CUDA device is present, also
   ``--device cuda`` with one worker;
3. a table: setting, wall s, floor s, merge/floor, speed-up over one worker, peak RSS of the driver;
4. the estimate: the merge's throughput per node (input plus output bytes per second of the best
   setting measured here) applied to the exact byte counts of three Llama-3.1-405B-shaped
   checkpoints (126 layers, hidden 16384, intermediate 53248, vocabulary 128256, bf16), for K nodes
   that each merge their share of the shards and read and write a storage every node sees. The
   estimate assumes the storage serves K nodes at K times one node's rate; where it cannot, its
   aggregate bandwidth bounds the time instead, and the line says so.

The load average at the start is printed: on a shared machine, workers compete with whatever
else runs, and the speed-up shows it.

Run from the repository root: ``python bench/scale.py`` (about 15 minutes on 2 cores at 1.5b),
``python bench/scale.py --size tiny`` (seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import merge_speed as ms  # noqa: E402
import torch  # noqa: E402

from mergesmith.api import validate  # noqa: E402

LLAMA_405B = ms.Shape(
    hidden=16384, intermediate=53248, layers=126, vocab=128256, heads=128, kv_heads=8, shard_bytes=5 * 10**9
)


def measure(setting: str, flags: list[str], config: Path, out: Path, log_dir: Path) -> dict[str, Any]:
    args = ["merge", str(config), str(out), "--force", "--no-progress", *flags]
    res = ms.run_module("mergesmith.cli", args, log_dir / f"scale-{setting.replace(' ', '_')}.log")
    if res.returncode != 0:
        ms.log(res.output)
        raise SystemExit(f"{setting}: the merge failed with exit status {res.returncode}")
    ms.log(f"{setting}: {res.wall_s:.2f} s wall, driver peak RSS {ms._gib(res.peak_rss)} GiB")
    return {"flags": flags, "wall_s": res.wall_s, "peak_rss_bytes": res.peak_rss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", choices=sorted(ms.SIZES), default="1.5b", help="model shape (default 1.5b)")
    ap.add_argument("--work", type=Path, default=REPO / "bench-out", help="inputs and outputs")
    ap.add_argument("--method", choices=sorted(ms.METHOD_CONFIGS), default="ties")
    ap.add_argument("--workers", default="1,2", help="worker counts to time (default 1,2)")
    ap.add_argument("--no-ray", action="store_true", help="leave out the Ray row")
    ap.add_argument("--nodes", default="1,4,16,64", help="node counts of the 405B estimate")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    shape = ms.SIZES[args.size]
    work: Path = args.work.resolve()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ms.log(f"cores: {os.cpu_count()}, load average (1 min) at start: {load:.2f}")
    dirs = ms.generate(shape, work / "models" / args.size)
    config = ms._config_files(dirs, work, args.size, [args.method])[args.method]
    plan = validate(config)
    files = sorted({p for ckpt in plan.models for p in ckpt.weight_files})
    settings = {f"{n} worker{'s' if n > 1 else ''}": ["--workers", str(n)] for n in counts}
    if not args.no_ray:
        settings["ray, local, 2 CPUs"] = ["--executor", "ray", "--threads", "1"]
    if torch.cuda.is_available():  # the GPU path: inputs copied ahead on a copy stream
        settings["1 worker, cuda"] = ["--device", "cuda"]
    out_root = work / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    floors: list[float] = []
    results: dict[str, dict[str, Any]] = {}
    for setting, flags in [
        ("floor", []),
        *((s, f) for item in settings.items() for s, f in (item, ("floor", []))),
    ]:
        out = out_root / "scale"
        ms._fresh(out)
        ms.warm_inputs(files)
        if setting == "floor":
            took, _, _ = ms.floor_pass(plan, out)
            floors.append(took)
            ms.log(f"floor: {took:.2f} s")
        else:
            results[setting] = measure(setting, flags, config, out, out_root)
        shutil.rmtree(out, ignore_errors=True)
    floor = min(floors)
    one = results[next(iter(results))]["wall_s"]
    rows = [("setting", "wall s", "floor s", "merge/floor", "speed-up", "driver peak RSS GiB")]
    for setting, r in results.items():
        rows.append(
            (
                setting,
                f"{r['wall_s']:.2f}",
                f"{floor:.2f}",
                f"{r['wall_s'] / floor:.2f}",
                f"{one / r['wall_s']:.2f}",
                ms._gib(r["peak_rss_bytes"]),
            )
        )
    moved = plan.read_bytes + plan.write_bytes
    ms.log("")
    ms.log(
        f"{args.method} on three {shape.parameters / 1e9:.3f} B-parameter bf16 models: read "
        f"{ms._gb(plan.read_bytes)}, write {ms._gb(plan.write_bytes)}; load average at start {load:.2f}"
    )
    for line in ms._table(rows):
        ms.log(line)
    best = min(r["wall_s"] for r in results.values())
    rate = moved / best
    big_read = 3 * LLAMA_405B.parameters * 2
    big_write = LLAMA_405B.parameters * 2
    ms.log("")
    ms.log(
        f"estimate for three {LLAMA_405B.parameters / 1e9:.1f} B-parameter bf16 models (read "
        f"{ms._gb(big_read)}, write {ms._gb(big_write)}) at this machine's best rate, "
        f"{rate / 1e9:.3f} GB/s of input plus output per node:"
    )
    for k in (int(n) for n in args.nodes.split(",") if n.strip()):
        seconds = (big_read + big_write) / (k * rate)
        ms.log(
            f"  {k:>3} node(s): {seconds / 3600:6.2f} h (the storage must serve {k * rate / 1e9:.2f} GB/s; "
            "below that, its bandwidth sets the time)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
