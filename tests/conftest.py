from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests import tiny


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base tiny Llama and three fine-tunes of it, in several on-disk layouts."""
    root = tmp_path_factory.mktemp("zoo")
    base, cfg = tiny.llama_state(0)
    out = {
        "base": tiny.save(root / "base", base, cfg, tokenizer=True),
        "a": tiny.save(root / "a", tiny.finetune(base, 1), cfg),
        "b": tiny.save(root / "b", tiny.finetune(base, 2), cfg, shards=3),
        "c": tiny.save(root / "c", tiny.finetune(base, 3), cfg, fmt="bin"),
        "d": tiny.save(root / "d", tiny.finetune(base, 4), cfg, fmt="bin", shards=2),
    }
    wide, wide_cfg = tiny.llama_state(5, hidden_size=48, intermediate_size=96)
    out["wide"] = tiny.save(root / "wide", wide, wide_cfg)
    return out


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "merge.yml"
        path.write_text(text)
        return path

    return write


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
