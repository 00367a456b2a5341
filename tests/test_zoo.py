"""The shipped model zoo: its files, its rebuild, and its scores under `mergesmith eval`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

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


# A retrained weight may differ from the shipped one by float rounding that depends on the CPU's
# vector units (up to a few 1e-6 measured across CPU types), which can flip a float16 rounding by
# one or two units in the last place: 2e-3 relative covers that, and no real change to the build.
WEIGHT_RTOL, WEIGHT_ATOL = 2e-3, 1e-5
# Accuracies are over 200 held-out examples each: tolerate 4 of them answered differently.
ACCURACY_ATOL = 0.02


@pytest.mark.slow
def test_rebuilding_one_skill_reproduces_the_shipped_files(tmp_path: Path) -> None:
    """The build is reproducible: the add fine-tune and adapter, retrained from the shipped base,
    equal the shipped tensors within float rounding, every other file byte for byte, and score
    the shipped accuracies. (On the CPU type that built the zoo, the weights are byte-identical
    too; across CPU types they need not be.)"""
    from safetensors.torch import load_file

    shutil.copytree(ZOO / "models" / "base", tmp_path / "models" / "base")
    report = build_module().build(tmp_path, ["add"])
    rebuilt = [
        n for n in MANIFEST if n.startswith(("models/add/", "adapters/add/", "tasks/", "models/base/"))
    ]
    assert len(rebuilt) > 10
    weights = [n for n in rebuilt if n.endswith(".safetensors")]
    assert len(weights) == 3  # base, fine-tune, adapter
    for name in rebuilt:
        if name in weights:
            got, shipped = load_file(tmp_path / name), load_file(ZOO / name)
            assert sorted(got) == sorted(shipped), name
            for key, tensor in shipped.items():
                assert got[key].dtype == tensor.dtype, (name, key)
                torch.testing.assert_close(
                    got[key].float(), tensor.float(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=f"{name} {key}"
                )
        else:
            assert sha256(tmp_path / name) == MANIFEST[name], name
    for kind in ("base", "add", "add LoRA"):
        for metric, shipped_value in BUILD_REPORT[kind].items():
            tolerance = 1e-3 * shipped_value if metric == "relative_norm" else ACCURACY_ATOL
            assert abs(report[kind][metric] - shipped_value) <= tolerance, (kind, metric)


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


def test_zoo_models_name_their_architecture(tmp_path: Path) -> None:
    """config.json lists the class that loads the weights, as save_pretrained writes it: mergekit
    (and transformers' Auto classes) read it to know the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for skill in ("base", *SKILLS):
        config = json.loads((ZOO / "models" / skill / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"], skill
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    )
    build_module().save_model(tiny, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
