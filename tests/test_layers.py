"""Imports point down the layers docs/design.md names: the I/O layer never imports the engine, the
engine never a tool, nothing but the command line imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mergesmith"
LAYERS = {  # as docs/design.md's table, lowest first
    "I/O and knowledge": [
        "sources", "lora", "architecture", "stacks", "_safetensors", "_hub", "_output", "_files", "_json",
        "_yaml", "_memory", "_threads", "_text", "errors", "defaults", "_version",
    ],
    "engine": [
        "api", "config", "parameters", "plan", "layout", "compat", "vocab", "tokenizer_spec",
        "chat_templates", "methods", "whole_model", "execute", "shards", "executors", "card", "models",
    ],
    "tools": ["evaluate", "report", "diagnose", "tune", "moe", "multi", "lora_merge", "extract", "docs"],
    "command line": ["cli", "commands", "_mergekit_flags"],
}  # fmt: skip
RANK = {top: rank for rank, tops in enumerate(LAYERS.values()) for top in tops}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mergesmith" and len(parts) > 1 else None


def test_every_module_has_a_layer() -> None:
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    tops -= {"__init__", "__pycache__"}
    assert tops == set(RANK)


def test_imports_point_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _top("mergesmith." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if own is None or own == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = _top(name)
                if top in RANK and RANK[top] > RANK[own]:
                    upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert upward == []
