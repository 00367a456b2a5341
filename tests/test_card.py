"""The model card's metadata is valid Hub metadata; a plan shows itself in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import mergesmith
from mergesmith.card import front_matter, hub_parents
from mergesmith.config import ModelRef
from tests import tiny


def test_local_inputs_are_not_given_as_base_model(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    base, cfg = tiny.llama_state(3)
    a = tiny.save(tmp_path / "a b: c", base, cfg)  # a local path YAML would misread unescaped
    b = tiny.save(tmp_path / "b", tiny.finetune(base, 1), cfg)
    plan = mergesmith.merge(
        f"merge_method: task_arithmetic\nbase_model: '{a}'\nmodels:\n  - model: {b}\n    parameters: {{weight: 1}}\n",
        tmp_path / "out",
    )
    text = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == {"library_name": "transformers", "tags": ["merge", "mergesmith"]}
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.tags == ["merge", "mergesmith"] and card.data.base_model is None
    assert "\n" not in repr(plan)
    assert repr(
        plan
    ) == f"<Plan task_arithmetic of 2 models ({a}, {b}): {len(plan.jobs)} tensors in 1 shard, " + (
        f"{plan.write_bytes / 1e6:.1f} MB>"
    )


def test_hub_inputs_are_listed_base_first_as_a_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # org/name is a local directory here, not a Hub id
    refs = [ModelRef("org/chat"), ModelRef("org/base"), ModelRef("org/name"), ModelRef("org/code", "v2")]
    plan: Any = SimpleNamespace(refs=refs, config=SimpleNamespace(base_model=refs[1]))
    assert hub_parents(plan) == ["org/base", "org/chat", "org/code"]
    meta = yaml.safe_load(front_matter(plan).split("---\n")[1])
    assert meta["base_model"] == ["org/base", "org/chat", "org/code"]
    assert meta["base_model_relation"] == "merge"
