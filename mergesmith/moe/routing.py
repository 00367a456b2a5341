"""Where a built mixture of experts sends the tokens of each task: per layer, the share of tokens
routed to each expert (a token goes to ``experts_per_token`` experts, so a row sums to that)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith import defaults
from mergesmith._output import atomic_write
from mergesmith._text import printable
from mergesmith.errors import CheckpointError
from mergesmith.evaluate import Task

__all__ = ["Routing", "routing", "write_routing"]

ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")


@dataclass(frozen=True)
class Routing:
    experts: tuple[str, ...]
    per_token: int
    tokens: dict[str, int]  # task -> tokens routed
    shares: dict[str, list[list[float]]]  # task -> [layer][expert]: share of its tokens

    def to_markdown(self) -> str:
        lines = [
            "# Routing",
            "",
            f"Share of each task's tokens (prompt and answer) routed to each expert, per layer; each "
            f"token goes to {self.per_token} expert(s), so a row sums to {self.per_token}.",
        ]
        for task, layers in self.shares.items():
            lines += ["", f"## {printable(task)} ({self.tokens[task]} tokens)", ""]
            lines.append("| layer | " + " | ".join(printable(e) for e in self.experts) + " |")
            lines.append("|---" * (len(self.experts) + 1) + "|")
            for n, row in enumerate(layers):
                lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        data = {
            "experts": list(self.experts),
            "experts_per_token": self.per_token,
            "tokens": self.tokens,
            "shares": self.shares,
        }
        return json.dumps(data, indent=2) + "\n"


def routing(
    model_dir: str | Path,
    tasks: Sequence[Task],
    experts: Sequence[str],
    *,
    batch_size: int = defaults.BATCH_SIZE,
    device: str = defaults.DEVICE,
    say: Callable[[str], None] | None = None,
) -> Routing:
    """Run every example (prompt followed by answer) of each task through the model at
    ``model_dir`` and count, at each layer's router, the experts each real token is sent to."""
    from mergesmith.evaluate import load_model

    net, tokenizer = load_model(model_dir, device)
    routers = {int(m.group(1)): mod for name, mod in net.named_modules() if (m := ROUTER.search(name))}
    if not routers:
        raise CheckpointError(
            f"{model_dir}: no MoE router (layers.N.mlp.gate) in the model transformers built"
        )
    layers = max(routers) + 1
    chosen: dict[int, torch.Tensor] = {}

    def hook(layer: int) -> Callable[..., None]:
        def keep(module: Any, args: Any, output: Any) -> None:
            chosen[layer] = output[2].detach().cpu()  # (tokens, experts_per_token)

        return keep

    handles = [mod.register_forward_hook(hook(n)) for n, mod in routers.items()]
    tokens: dict[str, int] = {}
    shares: dict[str, list[list[float]]] = {}
    per_token = int(net.config.num_experts_per_tok)
    try:
        for i, task in enumerate(tasks, 1):
            if say is not None:
                say(f"moe: routing task {i}/{len(tasks)} {task.name}")
            counts = torch.zeros(layers, len(experts), dtype=torch.long)
            total = 0
            texts = [e.prompt + e.answer for e in task.examples]
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
                mask = batch["attention_mask"].reshape(-1).bool()
                with torch.no_grad():
                    net(**batch.to(device))
                total += int(mask.sum())
                for n, idx in chosen.items():
                    counts[n] += torch.bincount(idx[mask].reshape(-1), minlength=len(experts))[: len(experts)]
            tokens[task.name] = total
            shares[task.name] = [[c / max(total, 1) for c in row.tolist()] for row in counts]
    finally:
        for h in handles:
            h.remove()
    return Routing(tuple(experts), per_token, tokens, shares)


def write_routing(report: Routing, out_dir: Path) -> list[Path]:
    """routing_report.md and routing_report.json in ``out_dir``, and routing_report.png where
    matplotlib is installed."""
    paths = [out_dir / "routing_report.md", out_dir / "routing_report.json"]
    atomic_write(paths[0], report.to_markdown())
    atomic_write(paths[1], report.to_json())
    png = out_dir / "routing_report.png"
    if _plot(report, png):
        paths.append(png)
    return paths


def _plot(report: Routing, path: Path) -> bool:
    """One heatmap per task: layers down, experts across, the share of the task's tokens in each
    cell; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(report.shares)
    layers = max((len(rows) for rows in report.shares.values()), default=0)
    width = 1.4 + 0.55 * len(report.experts)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(width * len(tasks), 1.6 + 0.3 * layers), squeeze=False, sharey=True
    )
    for ax, task in zip(axes[0], tasks):
        grid = report.shares[task]
        ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(report.experts)), [printable(e) for e in report.experts], rotation=45)
        ax.set_yticks(range(len(grid)), [str(n) for n in range(len(grid))])
        ax.set_title(printable(task), fontsize=10)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                color = "white" if v < 0.6 else "black"
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", color=color, fontsize=7)
    axes[0][0].set_ylabel("layer")
    fig.suptitle(
        f"share of each task's tokens sent to each expert ({report.per_token} per token)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
