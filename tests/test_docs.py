"""The README and the examples stay true: generated table, runnable example configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mergesmith
from mergesmith.docs import generated_tables
from mergesmith.methods import REGISTRY
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yml"))


def test_method_tables_are_generated_from_the_registry() -> None:
    for path, table in generated_tables(str(ROOT)).items():
        text = Path(path).read_text()
        block = re.search(r"<!-- methods-table:start -->\n(.*?)\n<!-- methods-table:end -->", text, re.S)
        assert block is not None, path
        assert block.group(1).strip() == table, f"{path}: run make readme"
        for name in REGISTRY:
            assert f"{name}.md)" in block.group(1), (path, name)


def test_every_method_has_a_doc_page_and_an_example() -> None:
    for name in REGISTRY:
        assert (ROOT / "docs" / "methods" / f"{name}.md").is_file(), name
    used = {mergesmith.load_config(p).method for p in EXAMPLES}
    assert used == set(REGISTRY)


def test_every_example_config_runs_on_the_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {p.stem for p in EXAMPLES} == set(REGISTRY)  # one example per method, named by it
    base = tiny.load_state(ROOT / "zoo" / "models" / "base")
    monkeypatch.chdir(ROOT)  # the examples name the zoo's models relative to the repository
    ran = 0
    for example in EXAMPLES:
        plan = mergesmith.merge(example, tmp_path / "out" / example.stem)
        written = tiny.load_state(tmp_path / "out" / example.stem)
        assert sorted(written) == sorted(j.name for j in plan.jobs)
        if plan.method.name != "passthrough":
            assert written.keys() == base.keys()
        ran += 1
    assert ran == len(EXAMPLES)


def test_the_model_types_page_is_generated_from_the_code() -> None:
    from mergesmith.docs import generated_model_lists
    from mergesmith.stacks import derivable_types

    text = (ROOT / "docs" / "models.md").read_text()
    found = derivable_types()
    for marker, generated in generated_model_lists(str(ROOT)).items():
        block = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", text, re.S)
        assert block is not None, marker
        if (
            marker == "model-derived"
            and found is not None
            and f"transformers {found[0]}:" not in block.group(1)
        ):
            # written with another transformers release: the list has the form, its count its entries
            head, _, listed = block.group(1).partition(":\n\n")
            count = int(re.search(r"(\d+) model types$", head).group(1))  # type: ignore[union-attr]
            assert count == len(listed.split(", ")) > 100
            continue
        assert block.group(1) == generated, f"docs/models.md ({marker}): run make readme"
    section = text.split("<!-- model-rows:start -->\n")[1].split("<!-- model-rows:end -->")[0]
    first_cells = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    listed = re.findall(r"`([\w-]+)`", "\n".join(first_cells))
    assert section.startswith(f"{len(listed)} model types:")
