"""The demo: build tiny fine-tunes of one tiny Llama base, merge them with every example config,
and compare each merged model with its parents.

Run from the repository root with `make demo`. Everything is written under demo-out/.
The comparison is made in weight space, for each merged model and each parent fine-tune:
- kept: cosine similarity between the merged model's task vector (merged - base) and the parent's,
  over all weights: 1 means the merged model moved in the parent's direction only, 0 means the
  parent's change is absent, negative means it was subtracted;
- size: the norm of the merged task vector over the parent's;
and every merged model is loaded with transformers and run on a batch of prompts (finite logits).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mergesmith  # noqa: E402
from tests import tiny  # noqa: E402

OUT = ROOT / "demo-out"
PARENTS = {"code": 11, "chat": 12, "math": 13}


def build_models(models: Path) -> None:
    """A tiny 4-layer Llama base and three fine-tunes: the base plus a small, structured task vector."""
    base, cfg = tiny.llama_state(0, num_hidden_layers=4, hidden_size=64, intermediate_size=128)
    tiny.save(models / "base", base, cfg, tokenizer=True)
    for name, seed in PARENTS.items():
        tiny.save(models / name, tiny.finetune(base, seed, scale=0.05), cfg, tokenizer=True)


def task_vector(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k].float() - base[k].float()).reshape(-1) for k in sorted(base)])


def run_forward(directory: Path, prompts: torch.Tensor) -> bool:
    """Load a model with transformers and check its logits on ``prompts`` are finite."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return bool(torch.isfinite(model(prompts).logits).all())


def main() -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = OUT / "models"
    if not (models / "base").exists():
        print("building tiny models in", models)
        build_models(models)
    os.chdir(OUT)
    prompts = torch.randint(4, len(tiny.VOCAB), (64, 16), generator=torch.Generator().manual_seed(0))
    base_state = tiny.load_state(models / "base")
    parent_states = {n: tiny.load_state(models / n) for n in PARENTS}
    parent_vectors = {n: task_vector(s, base_state) for n, s in parent_states.items()}

    configs = sorted((ROOT / "examples").glob("*.yml"))
    header = f"{'config':<16} {'tensors':>7} {'sec':>5} {'loads':>5} " + " ".join(
        f"{'kept ' + n:>10} {'size ' + n:>10}" for n in PARENTS
    )
    rows = [header, "-" * len(header)]
    for cfg in configs:
        out = OUT / "merged" / cfg.stem
        start = time.perf_counter()
        plan = mergesmith.merge(cfg, out, force=True, progress=False)
        took = time.perf_counter() - start
        merged = tiny.load_state(out)
        loads = "yes" if run_forward(out, prompts) else "NO"
        cells = []
        if merged.keys() == base_state.keys():
            vector = task_vector(merged, base_state)
            for n in PARENTS:
                kept = float(torch.nn.functional.cosine_similarity(vector, parent_vectors[n], dim=0))
                size = float(vector.norm() / parent_vectors[n].norm())
                cells.append(f"{kept:>10.2f} {size:>10.2f}")
        else:  # layers were stacked: no tensor-by-tensor comparison with the parents
            cells.append(f"{'(' + str(len(plan.jobs)) + ' tensors, layers stacked: not comparable)':>43}")
        rows.append(f"{cfg.stem:<16} {len(plan.jobs):>7} {took:>5.2f} {loads:>5} " + " ".join(cells))
    print("\n".join(rows))
    failed = [r for r in rows[2:] if " NO " in r]
    if failed:
        print("some merged models did not run:", *failed, sep="\n")
        return 1
    print(f"\nmerged models and their model cards are in {OUT / 'merged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
