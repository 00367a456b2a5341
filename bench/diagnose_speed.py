"""How close ``mergesmith diagnose`` runs to the time it takes just to read its inputs.

Uses the three synthetic Llama-shaped checkpoints of ``bench/merge_speed.py`` (generated there, or
here on first use; model 0 is the base, models 1 and 2 its fine-tunes) and that benchmark's TIES
config, and measures side by side, each step right after all inputs were read once (warm page
cache, as in ``merge_speed.py``):

* the **read floor**: one pass that reads every input byte the diagnosis reads, tensor by tensor in
  the plan's order, into one reused buffer, computing nothing;
* ``diagnose()`` called in this process (the plan is built from headers inside the call);
* ``python -m mergesmith.cli diagnose CONFIG`` as a subprocess: its wall time (interpreter start and
  imports included) and the time it reports for the diagnosis itself.

The floor runs once per repeat, before that repeat's measurements. Ratios are printed three ways:
best over best floor, median over median floor, and the median of each run over the floor run of
its own repeat ("paired", which cancels the machine's slow spells); every floor run is printed,
so the noise shows. Results go to
``WORK/diagnose-SIZE.json``.

Run from the repository root: ``python bench/diagnose_speed.py --size tiny`` (seconds) or
``python bench/diagnose_speed.py`` (``--size 1.5b``: three 2.8 GB models; 9 GB generated once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_speed import (
    REPO,
    SIZES,
    _config_files,
    _gb,
    _read_all,
    _spans,
    generate,
    log,
    run_module,
    warm_inputs,
)

from mergesmith.api import validate
from mergesmith.diagnose import diagnose, measured_jobs
from mergesmith.plan import Plan


def read_floor(plan: Plan) -> tuple[float, int]:
    """Read the inputs of every tensor the diagnosis measures, in its order; (seconds, bytes)."""
    jobs = measured_jobs(plan)
    spans = {p: _spans(p) for ckpt in plan.models for p in ckpt.weight_files}
    biggest = max(e - s for table in spans.values() for s, e in table.values())
    view = memoryview(bytearray(biggest))
    handles = {p: open(p, "rb", buffering=0) for p in spans}  # noqa: SIM115
    read = 0
    start = time.perf_counter()
    try:
        for job in jobs:
            for ref in job.all_inputs():
                entry = plan.models[ref.model].entry(ref.name)
                assert entry is not None  # the bench's inputs are safetensors files, read as stored
                path = entry.file
                lo, hi = spans[path][ref.name]
                _read_all(handles[path], view, lo, hi - lo)
                read += hi - lo
    finally:
        for f in handles.values():
            f.close()
    return time.perf_counter() - start, read


def _reported(output: str) -> float | None:
    """The time the CLI prints for the diagnosis ("diagnosed N tensors ... in 1.2 s")."""
    for line in output.splitlines():
        if line.startswith("diagnosed ") and line.endswith(" s"):
            return float(line.rsplit(" in ", 1)[1][:-2])
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.5b", help="model shape (default 1.5b)")
    ap.add_argument("--work", type=Path, default=REPO / "bench-out", help="inputs and results")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement (default 3)")
    args = ap.parse_args(argv)
    work: Path = args.work.resolve()
    dirs = generate(SIZES[args.size], work / "models" / args.size)
    config = _config_files(dirs, work, args.size, ["ties"])["ties"]
    plan = validate(config)
    files = sorted({p for ckpt in plan.models for p in ckpt.weight_files})
    floors: list[float] = []
    inproc: list[float] = []
    cli_wall: list[float] = []
    cli_reported: list[float] = []
    read_bytes = 0
    summary = ""
    for _ in range(args.repeats):
        warm_inputs(files)
        took, read_bytes = read_floor(plan)
        floors.append(took)
        log(f"read floor: {took:.2f} s ({_gb(read_bytes)}, {read_bytes / took / 1e9:.2f} GB/s)")
        warm_inputs(files)
        start = time.perf_counter()
        found = diagnose(config)
        inproc.append(time.perf_counter() - start)
        summary = found.summary()
        log(f"diagnose() in process: {inproc[-1]:.2f} s")
        warm_inputs(files)
        res = run_module("mergesmith.cli", ["diagnose", str(config)], work / "diagnose-cli.log")
        if res.returncode != 0:
            raise SystemExit(f"mergesmith diagnose failed:\n{res.output}")
        reported = _reported(res.output)
        cli_wall.append(res.wall_s)
        if reported is not None:
            cli_reported.append(reported)
        log(f"mergesmith diagnose: {res.wall_s:.2f} s wall, {reported} s reported")
    floor, floor_median = min(floors), statistics.median(floors)
    rows = [
        ("diagnose() in process", inproc),
        ("CLI, reported (imports excluded)", cli_reported),
        ("CLI, wall (interpreter and imports included)", cli_wall),
    ]
    print()
    print(f"size {args.size}: 3 models (base and 2 fine-tunes), {_gb(read_bytes)} read, warm page cache")
    print(
        f"read floor: best {floor:.2f} s, median {floor_median:.2f} s, of "
        + ", ".join(f"{f:.2f}" for f in floors)
        + " s"
    )
    print(
        f"{'measurement':<46} {'best s':>7} {'median s':>9} {'best/best floor':>16} {'median/median':>14} "
        f"{'paired':>7}"
    )
    for name, times in rows:
        best, median = min(times), statistics.median(times)
        # each run against the floor measured just before it, so that slow spells of the machine cancel
        paired = statistics.median(t / f for t, f in zip(times, floors))
        print(
            f"{name:<46} {best:>7.2f} {median:>9.2f} {best / floor:>16.2f} {median / floor_median:>14.2f} "
            f"{paired:>7.2f}"
        )
    print("paired: the median over the repeats of each run's time over the floor run just before it")
    print()
    print(summary)
    out = work / f"diagnose-{args.size}.json"
    out.write_text(
        json.dumps(
            {
                "size": args.size,
                "read_bytes": read_bytes,
                "floors_s": floors,
                "diagnose_in_process_s": inproc,
                "cli_wall_s": cli_wall,
                "cli_reported_s": cli_reported,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
