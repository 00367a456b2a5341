"""What one tuning trial costs, against merging to disk, reloading and evaluating the same config.

    python bench/tune_trial.py [--repeats 5]

Runs on the zoo (examples/tune/ties_add_rev.yml at its default values, tasks add and rev, 200
prompts each) and prints, measured side by side in this run:
- trial: an in-memory merge from parents read once, loaded into a model held in memory, scored;
- merge to disk + load + score (in process): mergesmith.merge to a directory, loaded and scored
  the same way (accuracy only, as trials are);
- merge + eval as two commands: `mergesmith merge` then `mergesmith eval`, as a user would;
and the merge part of the first two on its own. On the zoo scoring dominates a trial; the merge
part is what grows with the model's size.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mergesmith  # noqa: E402
from mergesmith import _yaml  # noqa: E402
from mergesmith.evaluate import load_model, load_task, score  # noqa: E402
from mergesmith.tune import TrialRunner, midpoint, search_space, substitute  # noqa: E402

CONFIG = ROOT / "examples" / "tune" / "ties_add_rev.yml"
TASKS = [str(ROOT / "zoo" / "tasks" / f"{t}.jsonl") for t in ("add", "rev")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--hidden",
        type=int,
        default=0,
        help="instead of the zoo, random Llama fine-tunes of this hidden size (8 layers; 1024 is ~110M "
        "parameters) scored on 8 prompts: where merging, writing and reloading outweigh scoring",
    )
    parser.add_argument(
        "--method",
        default="ties",
        choices=["ties", "task_arithmetic", "linear"],
        help="with --hidden: the merge method (default ties, whose trimming makes the merge itself costly)",
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    global TASKS
    if args.hidden:
        tmp_models = tempfile.mkdtemp(prefix="tune-bench-")
        doc, TASKS = synthetic(Path(tmp_models), args.hidden, args.method)
    else:
        doc = _yaml.load(CONFIG.read_text())
    space = search_space(doc)
    values = midpoint(space)
    plain = substitute(doc, space, values)
    tasks = [load_task(t) for t in TASKS]
    print(
        f"{'zoo' if not args.hidden else f'random Llama, hidden {args.hidden}'}: tasks {[t.name for t in tasks]}"
    )

    start = time.perf_counter()
    runner = TrialRunner(doc, TASKS)
    setup = time.perf_counter() - start
    trial, trial_merge, full, full_merge = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so that both see the same machine
            start = time.perf_counter()
            runner.net.load_state_dict(runner.merged_state(values), strict=False)
            trial_merge.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = runner.run(values)
            trial.append(time.perf_counter() - start)
            start = time.perf_counter()
            mergesmith.merge(plain, Path(tmp) / f"m{i}", progress=False)
            net, tokenizer = load_model(Path(tmp) / f"m{i}")
            full_merge.append(time.perf_counter() - start)
            scores = score(net, tokenizer, tasks, batch_size=64, with_loss=False)
            full.append(time.perf_counter() - start)
            assert {s.task: s.accuracy for s in scores} == got, "the trial and the written merge disagree"
        cfg = Path(tmp) / "plain.yml"
        cfg.write_text(_yaml_dump(plain))
        start = time.perf_counter()
        cli = [sys.executable, "-m", "mergesmith.cli"]
        subprocess.run(
            [*cli, "merge", str(cfg), f"{tmp}/cli", "--no-progress"], check=True, capture_output=True
        )
        subprocess.run([*cli, "eval", f"{tmp}/cli", "--tasks", *TASKS], check=True, capture_output=True)
        commands = time.perf_counter() - start

    t, f, tm, fm = (statistics.median(x) for x in (trial, full, trial_merge, full_merge))
    print(f"setup of the trial runner (parents read once, model built): {setup:.2f} s")
    print(f"{'work (median of ' + str(args.repeats) + ')':<44} {'seconds':>8} {'x trial':>8}")
    print(f"{'trial: merge in memory + score':<44} {t:>8.3f} {1.0:>8.2f}")
    print(f"{'merge to disk + load + score (in process)':<44} {f:>8.3f} {f / t:>8.2f}")
    print(f"{'merge + eval as two commands':<44} {commands:>8.3f} {commands / t:>8.2f}")
    print(f"{'  of which, trial merge into the model':<44} {tm:>8.3f} {tm / t:>8.2f}")
    print(f"{'  of which, merge to disk + load':<44} {fm:>8.3f} {fm / t:>8.2f}")
    print(f"{'  scoring (trial less its merge)':<44} {t - tm:>8.3f} {(t - tm) / t:>8.2f}")
    print(f"merge part: in memory {tm:.3f} s vs to disk and back {fm:.3f} s ({fm / tm:.1f}x)")
    print(f"accuracy at the default values: {got}")
    return 0


def synthetic(root: Path, hidden: int, method: str = "ties") -> tuple[dict[str, object], list[str]]:
    """A random 8-layer Llama base and two small-delta fine-tunes in float16, and a task of 8 prompts."""
    import json

    import torch

    from tests import tiny

    base, cfg = tiny.llama_state(0, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=8)
    tiny.save(root / "base", base, cfg, dtype=torch.float16, tokenizer=True)
    for i, name in enumerate(("a", "b")):
        tiny.save(root / name, tiny.finetune(base, 10 + i), cfg, dtype=torch.float16, tokenizer=True)
    task = root / "probe.jsonl"
    task.write_text("".join(json.dumps({"prompt": "abc" * (k + 1), "answer": "d"}) + "\n" for k in range(8)))
    doc: dict[str, object] = {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [
            {
                "model": str(root / n),
                "parameters": {
                    "weight": {"search": [0.2, 2.0]},
                    **({"density": 0.5} if method == "ties" else {}),
                },
            }
            for n in ("a", "b")
        ],
        "dtype": "float32",
        "out_dtype": "float16",
    }
    return doc, [str(task)]


def _yaml_dump(doc: object) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


if __name__ == "__main__":
    raise SystemExit(main())
