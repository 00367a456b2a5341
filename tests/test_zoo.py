"""The shipped model zoo: its files, its rebuild, and its scores under `mergesmith eval`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from mergesmith.cli import main
from mergesmith.evaluate import evaluate, load_task

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "zoo"
MANIFEST = json.loads((ZOO / "MANIFEST.json").read_text())
BUILD_REPORT = json.loads((ZOO / "build_report.json").read_text())
SKILLS = ["add", "rev", "sort", "shift"]


def build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zoo_build", ZOO / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_files_match_the_manifest() -> None:
    shipped = sorted(
        str(p.relative_to(ZOO))
        for sub in ("models", "adapters", "tasks")
        for p in (ZOO / sub).rglob("*")
        if p.is_file()
    )
    assert shipped == sorted(MANIFEST)
    for name, digest in MANIFEST.items():
        assert sha256(ZOO / name) == digest, name
    size = sum((ZOO / n).stat().st_size for n in MANIFEST)
    assert size < 10_000_000, f"the zoo grew to {size / 1e6:.1f} MB"


def test_each_fine_tune_is_good_at_its_skill_only() -> None:
    for skill in SKILLS:
        # task vectors stay small: ||theta - theta_base|| / ||theta_base||
        for kind, largest_norm in ((skill, 0.05), (f"{skill} LoRA", 0.12)):
            scores = BUILD_REPORT[kind]
            assert scores[skill] >= 0.85, (kind, scores)
            assert max(scores[s] for s in SKILLS if s != skill) <= 0.1, (kind, scores)
            assert scores["relative_norm"] < largest_norm, (kind, scores)
    assert max(BUILD_REPORT["base"][s] for s in SKILLS) <= 0.1


@pytest.mark.slow
def test_rebuilding_one_skill_gives_the_shipped_files(tmp_path: Path) -> None:
    """The build is deterministic: the add fine-tune and adapter, retrained from the shipped base,
    are byte-identical to the shipped ones (same CPU type and PyTorch version)."""
    shutil.copytree(ZOO / "models" / "base", tmp_path / "models" / "base")
    assert build_module().main(["--out", str(tmp_path), "--only", "add"]) == 0
    rebuilt = [
        n for n in MANIFEST if n.startswith(("models/add/", "adapters/add/", "tasks/", "models/base/"))
    ]
    assert len(rebuilt) > 10
    for name in rebuilt:
        assert sha256(tmp_path / name) == MANIFEST[name], name


def test_mergesmith_eval_reproduces_the_build_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = [load_task(ZOO / "tasks" / f"{s}.jsonl") for s in SKILLS]
    for model in ("add", "sort"):
        scores = evaluate(ZOO / "models" / model, tasks, batch_size=64)
        assert {s.task: s.accuracy for s in scores} == {s: BUILD_REPORT[model][s] for s in SKILLS}, model
    lora = f"{ZOO / 'models' / 'base'}+{ZOO / 'adapters' / 'rev'}"
    out = tmp_path / "scores.json"
    assert main(["eval", lora, "--tasks", str(ZOO / "tasks" / "rev.jsonl"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["accuracy"] == BUILD_REPORT["rev LoRA"]["rev"]
    assert "rev" in capsys.readouterr().out
