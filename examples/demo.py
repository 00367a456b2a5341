"""The demo: merge the zoo's fine-tunes and show, task by task, what each merge kept.

Run from the repository root with `make demo`; everything is written under demo-out/.

The zoo (zoo/README.md) holds a tiny character-level Llama base and four fine-tunes of it, each
good at one skill (add, rev, sort, shift), plus a LoRA adapter per skill. The demo:

1. evaluates the base and every parent on every task (exact-match accuracy, held-out prompts);
2. merges every pair of fine-tunes and all four together with linear, task arithmetic, TIES and
   DARE-TIES, and the matching LoRA adapters into one adapter, and evaluates each merged model on
   the tasks of the models it merged;
3. runs every example config in examples/ (one per method) on the zoo and evaluates it the same way;
4. builds mixtures of experts of the four fine-tunes (examples/moe/zoo_moe.yml: each fine-tune's MLP
   an expert, hidden-state gates; 2 or 1 experts per token; attention from the base or merged from
   the experts'), evaluates them on every skill and prints where the router sends each skill's tokens;
   beside them, the most such a mixture could reach with perfect routing (each skill scored on a
   dense model of its own MLP with the base's or the merged attention);
5. prints the table of normalized accuracy (merged accuracy / the parent's own accuracy) and writes
   demo-out/report.{md,json,png}.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

import mergesmith  # noqa: E402
from mergesmith.evaluate import TaskScore, evaluate, load_task  # noqa: E402
from mergesmith.lora_merge import merge_adapters  # noqa: E402
from mergesmith.moe import moe  # noqa: E402
from mergesmith.moe.routing import routing  # noqa: E402
from mergesmith.report import Entry, build_report, write_report  # noqa: E402

OUT = ROOT / "demo-out"
ZOO = ROOT / "zoo"
SKILLS = ["add", "rev", "sort", "shift"]
EXAMPLE_PARENTS = {f"zoo/models/{s}": s for s in ("add", "rev", "sort", "shift")}

# The four fine-tunes as the experts of one mixture of experts (examples/moe/zoo_moe.yml), with
# their own MLPs; attention and the rest from the base, or merged from the experts' (base_merge).
MOE_CONFIG: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "moe" / "zoo_moe.yml").read_text())
MOE_VARIANTS: dict[str, dict[str, Any]] = {
    "2/token": {},
    "1/token": {"experts_per_token": 1},
    "2/token, merged attention": {
        "base_merge": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.5}}
    },
}

# What a mixture of these MLP experts could reach with perfect routing: for each skill, a dense
# model of that skill's own MLP (weight 1 on its MLP tensors) with the base's attention, or with
# attention merged as base_merge merges it (task_arithmetic, 0.5 each).
CEILINGS: dict[str, float] = {"base attention": 0.0, "merged attention": 0.5}


def ceiling_config(skill: str, others_weight: float) -> dict[str, Any]:
    def weight(own: float) -> list[dict[str, Any]]:
        return [{"filter": "mlp", "value": own}, {"value": others_weight}]

    return {
        "merge_method": "task_arithmetic",
        "base_model": str(ZOO / "models" / "base"),
        "models": [
            {"model": str(ZOO / "models" / s), "parameters": {"weight": weight(1.0 if s == skill else 0.0)}}
            for s in SKILLS
        ],
        "dtype": "float32",
        "out_dtype": "float16",
    }


# Each method with the settings a user would start from.
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # method: (merge-wide, per model)
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({}, {"weight": 1.0}),
    "ties": ({}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.5}),
}


def config_for(method: str, skills: tuple[str, ...]) -> dict[str, Any]:
    merge_wide, per_model = METHODS[method]
    return {
        "merge_method": method,
        "base_model": str(ZOO / "models" / "base"),
        "models": [{"model": str(ZOO / "models" / s), "parameters": per_model} for s in skills],
        "parameters": merge_wide,
        "dtype": "float32",
        "out_dtype": "float16",
        "seed": 0,
    }


def say(line: str) -> None:
    """A progress line on stderr."""
    print(line, file=sys.stderr, flush=True)


class Scorer:
    """Evaluates a model on some tasks once and remembers the scores; says which of ``total``."""

    def __init__(self, total: int) -> None:
        self.tasks = {s: load_task(ZOO / "tasks" / f"{s}.jsonl") for s in SKILLS}
        self.seconds = 0.0
        self.models = 0
        self.total = total

    def __call__(self, model: str | Path, skills: list[str]) -> dict[str, TaskScore]:
        start = time.perf_counter()
        say(f"evaluating model {self.models + 1}/{self.total}: {model} on {', '.join(skills)}")
        scores = evaluate(str(model), [self.tasks[s] for s in skills], batch_size=100)
        self.seconds += time.perf_counter() - start
        self.models += 1
        return {s.task: s for s in scores}


def main() -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (ZOO / "models" / "base" / "model.safetensors").is_file():
        print("the zoo is missing: build it with `python zoo/build.py`", file=sys.stderr)
        return 1
    os.chdir(ROOT)
    started = time.perf_counter()
    groups = [*itertools.combinations(SKILLS, 2), tuple(SKILLS)]
    examples = sorted((ROOT / "examples").glob("*.yml"))
    ceilings = len(CEILINGS) * len(SKILLS)
    merges = len(groups) * (len(METHODS) + 1) + len(examples) + len(MOE_VARIANTS) + ceilings
    score = Scorer(1 + 2 * len(SKILLS) + merges)
    base = Entry("base", str(ZOO / "models" / "base"), score(ZOO / "models" / "base", SKILLS))
    parents = [Entry(s, str(ZOO / "models" / s), score(ZOO / "models" / s, SKILLS)) for s in SKILLS]
    adapters = [
        Entry(
            f"{s} LoRA",
            f"{base.path}+{ZOO / 'adapters' / s}",
            score(f"{base.path}+{ZOO / 'adapters' / s}", SKILLS),
        )
        for s in SKILLS
    ]
    merged: list[Entry] = []
    merge_seconds = 0.0
    for group in groups:
        label = "+".join(group)
        for method in METHODS:
            out = OUT / "merged" / f"{label}-{method}"
            say(f"merge {len(merged) + 1}/{merges}: {label} with {method}")
            start = time.perf_counter()
            mergesmith.merge(config_for(method, group), out, force=True, progress=False)
            merge_seconds += time.perf_counter() - start
            merged.append(Entry(f"{label} {method}", str(out), score(out, list(group)), group, method))
        out = OUT / "adapters" / label
        say(f"merge {len(merged) + 1}/{merges}: {label} LoRA adapters summed")
        start = time.perf_counter()
        merge_adapters([ZOO / "adapters" / s for s in group], out, force=True)
        merge_seconds += time.perf_counter() - start
        model = f"{base.path}+{out}"
        merged.append(
            Entry(f"{label} LoRA-sum", model, score(model, list(group)), tuple(f"{s} LoRA" for s in group))
        )
    for example in examples:
        out = OUT / "examples" / example.stem
        say(f"merge {len(merged) + 1}/{merges}: example {example.name}")
        start = time.perf_counter()
        mergesmith.merge(example, out, force=True, progress=False)
        merge_seconds += time.perf_counter() - start
        config = mergesmith.load_config(example)
        names = tuple(
            dict.fromkeys(
                EXAMPLE_PARENTS[r.path] for r in config.referenced_models() if r.path in EXAMPLE_PARENTS
            )
        )
        merged.append(
            Entry(f"example {example.stem}", str(out), score(out, list(names)), names, config.method)
        )

    for variant, changes in MOE_VARIANTS.items():
        out = OUT / "moe" / variant.replace(" ", "-").replace(",", "").replace("/", "-per-")
        say(f"merge {len(merged) + 1}/{merges}: mixture of experts, {variant}")
        config_file = OUT / "moe" / f"{out.name}.yml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump({**MOE_CONFIG, **changes}, sort_keys=False))
        start = time.perf_counter()
        moe(config_file, out, force=True)
        merge_seconds += time.perf_counter() - start
        merged.append(Entry(f"{'+'.join(SKILLS)} MoE {variant}", str(out), score(out, SKILLS), SKILLS, "moe"))
    made = len(merged)
    for attention, others in CEILINGS.items():
        scores = {}
        for skill in SKILLS:
            made += 1
            out = OUT / "moe" / f"ceiling-{attention.replace(' ', '-')}-{skill}"
            say(f"merge {made}/{merges}: {skill}'s own MLP with {attention}")
            start = time.perf_counter()
            mergesmith.merge(ceiling_config(skill, others), out, force=True, progress=False)
            merge_seconds += time.perf_counter() - start
            scores.update(score(out, [skill]))
        name = f"MoE ceiling: own MLP, {attention}"
        merged.append(Entry(name, str(OUT / "moe"), scores, tuple(SKILLS), "moe"))
    routed = routing(
        merged[-len(MOE_VARIANTS) - len(CEILINGS)].path,
        [load_task(ZOO / "tasks" / f"{s}.jsonl") for s in SKILLS],
        SKILLS,
    )

    report = build_report(SKILLS, [*parents, *adapters], merged, base=base, owners={s: s for s in SKILLS})
    written = write_report(report, OUT, stem="report")
    print(table(report, merged))
    print()
    print(side_by_side(report, groups))
    print(
        f"\n{made} merges in {merge_seconds:.1f} s; {score.models} evaluations in {score.seconds:.1f} s; "
        f"total {time.perf_counter() - started:.1f} s"
    )
    print(moe_routing(routed))
    print(
        "A mixture of MLP experts keeps the trunk's attention, so it reaches at most the 'MoE ceiling' rows "
        "(perfect routing: each skill on its own MLP); the zoo's fine-tunes learnt in attention too."
    )
    best_pair = max((m for m in merged if len(m.parents) == 2), key=lambda m: report.average.get(m.name, 0.0))
    print(f"best two-skill merge: {best_pair.name}, {report.average[best_pair.name]:.1%} normalized accuracy")
    print("report: " + ", ".join(str(p.relative_to(ROOT)) for p in written))
    return 0


def moe_routing(routed: Any) -> str:
    """Where the first mixture of experts sends each skill's tokens, in its last layer."""
    last = {task: shares[-1] for task, shares in routed.shares.items()}
    cells = [
        f"{task}: " + ", ".join(f"{e} {share:.0%}" for e, share in zip(routed.experts, row) if share >= 0.05)
        for task, row in last.items()
    ]
    return (
        f"MoE routing in the last layer ({routed.per_token} experts per token; share of each skill's "
        "tokens sent to each expert):\n  " + "\n  ".join(cells)
    )


def side_by_side(report: Any, groups: list[tuple[str, ...]]) -> str:
    """Average normalized accuracy, one row per group of skills, one column per method."""
    methods = [*METHODS, "LoRA-sum"]
    width = max(len("+".join(g)) for g in groups) + 2
    head = f"{'merged skills':<{width}}" + "".join(f"{m:>17}" for m in methods)
    lines = ["average normalized accuracy by method", head, "-" * len(head)]
    for group in groups:
        label = "+".join(group)
        cells = [report.average.get(f"{label} {m}") for m in methods]
        lines.append(
            f"{label:<{width}}" + "".join(f"{c:>17.0%}" if c is not None else f"{'':>17}" for c in cells)
        )
    return "\n".join(lines)


def table(report: Any, merged: list[Entry]) -> str:
    """Accuracy of base and parents, then normalized accuracy of every merge, one row each."""
    width = max(len(m.name) for m in merged) + 2
    head = f"{'model':<{width}}" + "".join(f"{s:>8}" for s in SKILLS) + f"{'avg':>8}"
    lines = ["accuracy", head, "-" * len(head)]
    for e in [report.base, *report.parents]:
        lines.append(f"{e.name:<{width}}" + "".join(f"{e.scores[s].accuracy:>8.0%}" for s in SKILLS))
    lines += [
        "",
        "normalized accuracy (merged / the parent's own; LoRA merges against the LoRA parents)",
        head,
        "-" * len(head),
    ]
    for m in merged:
        norms = report.normalized.get(m.name, {})
        cells = "".join(f"{norms[s]:>8.0%}" if s in norms else f"{'':>8}" for s in SKILLS)
        avg = report.average.get(m.name)
        lines.append(f"{m.name:<{width}}{cells}" + (f"{avg:>8.0%}" if avg is not None else ""))
    warned = sorted({w.model for w in report.warnings})
    lines += ["", f"{len(report.warnings)} warnings on {len(warned)} merges (details in demo-out/report.md)"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
