"""The README and the examples stay true: generated table, runnable example configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mergesmith
from mergesmith.docs import methods_table
from mergesmith.methods import REGISTRY
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yml"))


def test_readme_method_table_is_generated_from_the_registry() -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- methods-table:start -->\n(.*?)\n<!-- methods-table:end -->", text, re.S)
    assert block is not None
    assert block.group(1).strip() == methods_table()


def test_every_method_has_a_doc_page_and_an_example() -> None:
    for name in REGISTRY:
        assert (ROOT / "docs" / "methods" / f"{name}.md").is_file(), name
    used = {mergesmith.load_config(p).method for p in EXAMPLES}
    assert used == set(REGISTRY)


def test_every_example_config_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(EXAMPLES) == 7
    base, cfg = tiny.llama_state(0, num_hidden_layers=4)
    models = tmp_path / "models"
    tiny.save(models / "base", base, cfg, tokenizer=True)
    for i, name in enumerate(["code", "chat", "math"]):
        tiny.save(models / name, tiny.finetune(base, 20 + i), cfg)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for example in EXAMPLES:
        plan = mergesmith.merge(example, tmp_path / "out" / example.stem)
        written = tiny.load_state(tmp_path / "out" / example.stem)
        assert sorted(written) == sorted(j.name for j in plan.jobs)
        if plan.method.name != "passthrough":
            assert written.keys() == base.keys()
        ran += 1
    assert ran == len(EXAMPLES)
