"""Differential check of ``mergesmith moe`` against ``mergekit-moe`` on the zoo's models.

Each case is one mergekit-moe config over ``zoo/models`` (the base and the add, rev, sort and shift
fine-tunes). Both tools build it; the outputs are read back and compared after mergekit's fused
expert tensors (``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden] and
``mlp.experts.down_proj``) are split into the per-expert tensors mergesmith writes. Router weights
must agree within ``--atol`` (both run the base in bfloat16; the table shows the largest
difference), every other tensor bit for bit, and the tensor names, shapes and dtypes must be the
same.

mergekit runs from its own virtualenv (``--mergekit-venv``, default ``/tmp/mkvenv``) as
``mergekit-moe CONFIG OUT --random-seed 0``; the script says so and stops when it is not there.
Outputs go to ``bench-out/moe/``.

    .venv/bin/python bench/moe_differential.py [--mergekit-venv /tmp/mkvenv] [--only hidden ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {
    "add": ["ad 47+38=", "ad 12+5=", "ad 90+61="],
    "rev": ["rv kfqz=", "rv abcde=", "rv mqlpx="],
    "sort": ["so kfqz=", "so dcbae=", "so qmlpx="],
    "shift": ["sh kfqz=", "sh abcde=", "sh mqlpx="],
    "base": ["pl 47+38=", "bk kfqz=", "or dcbae="],
}


def expert_yaml(skill: str, indent: str = "  ", extra: str = "", prompts: bool = True) -> str:
    text = f"{indent}- source_model: {ROOT}/zoo/models/{skill}\n"
    if prompts:
        text += f"{indent}  positive_prompts: {json.dumps(PROMPTS[skill])}\n"
    return text + extra


def config(
    mode: str,
    *,
    per_token: int = 2,
    architecture: str | None = None,
    skills: tuple[str, ...] = ("add", "rev", "sort", "shift"),
    shared: str | None = None,
    shared_prompts: bool = True,
    extra: str = "",
) -> str:
    text = f"base_model: {ROOT}/zoo/models/base\ngate_mode: {mode}\ndtype: float16\n"
    text += f"experts_per_token: {per_token}\n"
    if architecture:
        text += f"architecture: {architecture}\n"
    text += "experts:\n" + "".join(expert_yaml(s, extra=extra) for s in skills)
    if shared:
        text += "shared_experts:\n" + expert_yaml(shared, prompts=shared_prompts)
    return text


NOISE = "    noise_scale: 0.01\n    residual_scale: 0.9\n"
CASES: dict[str, tuple[str, str]] = {
    "hidden": (config("hidden", per_token=1), "mixtral"),
    "cheap_embed": (config("cheap_embed"), "mixtral"),
    "random": (config("random"), "mixtral"),
    "uniform_random": (config("uniform_random"), "mixtral"),
    "negative_residual": (
        config(
            "hidden",
            skills=("add", "rev"),
            extra='    negative_prompts: ["pl 47+38="]\n    residual_scale: 0.5\n',
        ),
        "mixtral",
    ),
    # the shared expert is the base: mergekit-moe 0.1.5 opens only the base and the routed experts
    "qwen2_moe": (config("hidden", architecture="qwen", skills=("add", "rev"), shared="base"), "qwen2_moe"),
    "deepseek": (
        config("hidden", architecture="deepseek", skills=("add", "rev"), shared="base", shared_prompts=False),
        "deepseek",
    ),
    "deepseek_random": (
        config("random", skills=("add", "rev", "sort"), shared="base", shared_prompts=False),
        "deepseek",
    ),
    # noise_scale: the same draws from the seeded stream, in mergekit-moe's order of tensors
    "noise_random": (config("random", skills=("add", "rev"), extra=NOISE), "mixtral"),
    "noise_hidden": (config("hidden", skills=("add", "rev", "sort"), extra=NOISE), "mixtral"),
    "noise_qwen2_moe": (
        config("uniform_random", architecture="qwen", skills=("add", "rev"), shared="base", extra=NOISE),
        "qwen2_moe",
    ),
    "noise_deepseek": (
        config("random", skills=("add", "rev"), shared="base", shared_prompts=False, extra=NOISE),
        "deepseek",
    ),
}


def split_fused(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """mergekit's output with its fused expert tensors split, under mergesmith's names."""
    out: dict[str, torch.Tensor] = {}
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for key, t in state.items():
        prefix, _, rest = key.partition(".mlp.")
        if not rest:
            out[key] = t
        elif rest == "experts.gate_up_proj":
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{block}.experts.{e}.{names[0]}.weight"] = t[e, :half]
                out[f"{prefix}.{block}.experts.{e}.{names[1]}.weight"] = t[e, half:]
        elif rest == "experts.down_proj":
            for e in range(t.shape[0]):
                out[f"{prefix}.{block}.experts.{e}.{names[2]}.weight"] = t[e]
        else:
            out[f"{prefix}.{block}.{rest}"] = t
    return out


def compare(ours_dir: Path, theirs_dir: Path, arch: str) -> dict[str, object]:
    """Router difference, tensors that differ, and name/shape/dtype agreement."""
    ours = load_file(str(ours_dir / "model.safetensors"))
    theirs = split_fused(load_file(str(theirs_dir / "model.safetensors")), arch)
    same_layout = {k: (t.shape, t.dtype) for k, t in ours.items()} == {
        k: (t.shape, t.dtype) for k, t in theirs.items()
    }
    router, differ, exact = 0.0, [], 0
    for key, a in ours.items():
        b = theirs.get(key)
        if b is None or a.shape != b.shape:
            differ.append(key)
        elif key.endswith("gate.weight"):  # the router and the shared expert's gate
            router = max(router, (a.float() - b.float()).abs().max().item())
        elif torch.equal(a, b):
            exact += 1
        else:
            differ.append(key)
    return {"same_layout": same_layout, "router_max_diff": router, "exact": exact, "differ": differ}


def run_case(name: str, out: Path, mergekit: Path, *, in_process: bool = False) -> dict[str, object]:
    """Build case ``name`` with both tools under ``out`` and compare. ``in_process`` builds
    mergesmith's side with :func:`mergesmith.moe.moe` in this process instead of the command."""
    text, arch = CASES[name]
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / f"{name}.yml"
    cfg.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    ours, theirs = out / f"{name}-mergesmith", out / f"{name}-mergekit"
    if in_process:
        from mergesmith.moe import moe

        moe(cfg, ours, force=True, seed=0)
    else:
        subprocess.run(
            [sys.executable, "-m", "mergesmith.cli", "moe", str(cfg), str(ours), "--force", "--seed", "0"],
            check=True,
            env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
        )
    subprocess.run(["rm", "-rf", str(theirs)], check=True)
    subprocess.run(
        [str(mergekit / "bin" / "mergekit-moe"), str(cfg), str(theirs), "--random-seed", "0", "--quiet"],
        check=True,
        env=env,
        capture_output=True,
    )
    return compare(ours, theirs, arch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit-venv", default="/tmp/mkvenv")
    p.add_argument("--only", nargs="+", choices=list(CASES))
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--out", default=str(ROOT / "bench-out" / "moe"))
    args = p.parse_args()
    mergekit = Path(args.mergekit_venv)
    if not (mergekit / "bin" / "mergekit-moe").is_file():
        print(f"skipped: no mergekit-moe in {mergekit}/bin (pip install mergekit there)")
        return 0
    failed = 0
    print(
        "| case | same names/shapes/dtypes | router max diff | exact tensors | differing |\n|---|---|---|---|---|"
    )
    for name in args.only or CASES:
        r = run_case(name, Path(args.out), mergekit)
        bad = not r["same_layout"] or r["differ"] or float(r["router_max_diff"]) > args.atol  # type: ignore[arg-type]
        failed += bool(bad)
        differ = r["differ"]
        assert isinstance(differ, list)
        print(
            f"| {name} | {r['same_layout']} | {float(r['router_max_diff']):.2e} | {r['exact']} | "  # type: ignore[arg-type]
            f"{len(differ)}{' ' + differ[0] if differ else ''} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
