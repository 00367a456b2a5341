"""The output directory: refused when unsafe, written whole or not at all, and what it holds."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith.execute
from mergesmith import _output
from mergesmith.api import merge
from mergesmith.errors import MethodError, OutputError
from tests import tiny


def config_for(zoo: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo["a"]), "parameters": {"weight": 0.5}},
            {"model": str(zoo["b"]), "parameters": {"weight": 0.25}},
        ],
        **extra,
    }


def tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) with the sha256 of its content."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if _output.PARTIAL in p.name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


# -- refused outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside", "nested", "equal"])
def test_output_inside_or_equal_to_an_input_is_refused(zoo: dict[str, Path], where: str) -> None:
    target = {"inside": zoo["a"] / "merged", "nested": zoo["a"] / "x" / "y", "equal": zoo["a"]}[where]
    before = tree(zoo["a"])
    with pytest.raises(OutputError) as info:
        merge(config_for(zoo), target, progress=False)
    msg = str(info.value)
    assert f"output directory {target} is inside input model {zoo['a']}" in msg
    assert "choose a directory outside every input model" in msg
    assert tree(zoo["a"]) == before
    assert sorted(p.name for p in zoo["a"].iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(zoo["a"]) == []
    assert leftovers(zoo["a"].parent) == []


def test_output_equal_to_input_is_refused_even_with_force(zoo: dict[str, Path]) -> None:
    before = tree(zoo["base"])
    with pytest.raises(OutputError, match=r"is inside input model"):
        merge(config_for(zoo), zoo["base"], force=True, progress=False)
    assert tree(zoo["base"]) == before


def test_output_inside_an_input_through_a_symlink_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(zoo["b"], target_is_directory=True)
    before = tree(zoo["b"])
    with pytest.raises(OutputError, match=r"is inside input model"):
        merge(config_for(zoo), link / "out", progress=False)
    assert tree(zoo["b"]) == before


def test_output_containing_an_input_is_refused(zoo: dict[str, Path]) -> None:
    root = zoo["base"].parent
    before = tree(root)
    with pytest.raises(OutputError) as info:
        merge(config_for(zoo), root, force=True, progress=False)
    assert f"input model {zoo['base']} is inside output directory {root}" in str(info.value)
    assert "replacing the output would delete the input" in str(info.value)
    assert tree(root) == before


def test_output_that_is_a_file_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("keep me")
    with pytest.raises(OutputError, match=re.escape(f"output {f} exists and is not a directory")):
        merge(config_for(zoo), f, force=True, progress=False)
    assert f.read_text() == "keep me"


def test_existing_output_without_force_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(OutputError) as info:
        merge(config_for(zoo), out, progress=False)
    msg = str(info.value)
    assert f"output directory {out} exists and is not empty" in msg
    assert "--force" in msg
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert leftovers(tmp_path) == []


def test_existing_empty_output_is_used(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    merge(config_for(zoo), out, progress=False)
    assert (out / "model.safetensors").is_file()


def test_force_replaces_the_output_and_leaves_no_stale_shards(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(config_for(zoo), out, max_shard_size=20_000, progress=False)
    old = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(old) >= 3
    assert old[0] == f"model-00001-of-{len(old):05d}.safetensors"
    (out / "notes.txt").write_text("from the old run")

    merge(config_for(zoo, out_dtype="bfloat16"), out, force=True, progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / "notes.txt").exists()
    assert leftovers(tmp_path) == []
    state = tiny.load_state(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


# -- failures and staging -------------------------------------------------------------------------


def _fail_after(monkeypatch: pytest.MonkeyPatch, n: int) -> list[str]:
    real = mergesmith.execute.merge_job
    seen: list[str] = []

    def failing(plan: Any, job: Any, *args: Any) -> torch.Tensor:
        if len(seen) == n:
            raise RuntimeError("boom in the middle of the merge")
        seen.append(job.name)
        return real(plan, job, *args)

    monkeypatch.setattr(mergesmith.execute, "merge_job", failing)
    return seen


def test_failed_merge_leaves_nothing_behind(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fail_after(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom in the middle of the merge"):
        merge(config_for(zoo), out, max_shard_size=5_000, progress=False)
    assert len(seen) == 3
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_merge_keeps_the_previous_output(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    merge(config_for(zoo), out, progress=False)
    (out / "notes.txt").write_text("from the old run")
    before = tree(out)

    seen = _fail_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="boom"):
        merge(config_for(zoo, out_dtype="bfloat16"), out, force=True, max_shard_size=5_000, progress=False)
    assert len(seen) == 3
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_method_leaves_nothing_behind(zoo: dict[str, Path], tmp_path: Path) -> None:
    """A real MethodError late in the merge (NaN in an input's last tensors) cleans up too."""
    from safetensors.torch import load_file

    state = load_file(str(zoo["a"] / "model.safetensors"))
    state["model.norm.weight"][1] = float("nan")
    models = tmp_path / "models"
    nan_model = tiny.save(models / "nan", state, tiny.llama_config())
    cfg = config_for(zoo)
    cfg["models"][0]["model"] = str(nan_model)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(MethodError) as info:
        merge(cfg, work / "out", max_shard_size=5_000, progress=False)
    assert "model.norm.weight: task_arithmetic produced 1 NaN or infinite values" in str(info.value)
    assert list(work.iterdir()) == []


def test_stale_staging_of_a_dead_process_is_cleaned(zoo: dict[str, Path], tmp_path: Path) -> None:
    merge(config_for(zoo), tmp_path / "out", progress=False)
    pid = dead_pid()
    stale = tmp_path / f".out{_output.PARTIAL}-{pid}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half written")
    stale_old = tmp_path / f".out{_output.PARTIAL}-old-{pid}"
    stale_old.mkdir()
    (stale_old / "config.json").write_text("{}")
    alive = tmp_path / f".out{_output.PARTIAL}-{os.getppid()}"
    alive.mkdir()
    other = tmp_path / f".other{_output.PARTIAL}-{pid}"
    other.mkdir()

    # the output is in place, so the dead run's moved-aside previous output is garbage too
    merge(config_for(zoo), tmp_path / "out", force=True, progress=False)
    assert not stale.exists()
    assert not stale_old.exists()
    # a live process's staging directory and another output's are not touched
    assert alive.is_dir()
    assert other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name, other.name])


def test_staged_output_removes_the_stage_on_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyError), _output.staged_output(out) as stage:
        assert stage.parent == tmp_path.resolve()
        assert stage.name == f".out{_output.PARTIAL}-{os.getpid()}"
        (stage / "x").write_text("y")
        raise KeyError("stop")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_creates_missing_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with _output.staged_output(out) as stage:
        (stage / "x").write_text("y")
    assert (out / "x").read_text() == "y"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


# -- what the output holds ------------------------------------------------------------------------


def test_output_contents(zoo: dict[str, Path], tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    text = (
        "merge_method: task_arithmetic\n"
        f"base_model: {zoo['base']}\n"
        "models:\n"
        f"  - model: {zoo['a']}\n"
        "    parameters:\n"
        "      weight: 0.5\n"
        f"  - model: {zoo['b']}\n"
        "    parameters:\n"
        "      weight: 0.25\n"
        "dtype: float32\n"
        "out_dtype: bfloat16\n"
    )
    config_path = write_config(text)
    out = tmp_path / "out"
    plan = merge(config_path, out, max_shard_size=20_000, progress=False, full_digests=True)

    # config.json: the base's, with the output dtype
    base_cfg = json.loads((zoo["base"] / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    assert base_cfg["torch_dtype"] == "float32"
    assert out_cfg == {**base_cfg, "torch_dtype": "bfloat16"}

    # tokenizer files: copied from the base, byte for byte
    tok_files = [n for n in mergesmith.execute.TOKENIZER_FILES if (zoo["base"] / n).is_file()]
    assert "tokenizer.json" in tok_files
    assert "tokenizer_config.json" in tok_files
    for name in tok_files:
        assert (out / name).read_bytes() == (zoo["base"] / name).read_bytes()

    # the config as written
    assert (out / "mergesmith_config.yml").read_text() == text

    # model card: method and the sha256 of every input file
    readme = (out / "README.md").read_text()
    assert "**Task arithmetic**" in readme
    assert "merge_method: task_arithmetic" in readme
    assert f"base_model: {zoo['base']}" in readme
    inputs = [zoo["base"] / "model.safetensors", zoo["a"] / "model.safetensors"]
    inputs += sorted(zoo["b"].glob("model-*.safetensors"))
    assert len(inputs) == 5
    for f in inputs:
        assert f"`{f.name}` `sha256:{sha256(f)}`" in readme
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.splitlines() if line.startswith("| /")}
    assert rows[str(zoo["base"])].split(" | ")[1] == "base"
    assert rows[str(zoo["a"])].split(" | ")[1] == "merged"
    assert "quick:" not in readme
    assert rows[str(zoo["b"])].count("`model-0000") == 3
    assert "`?`" not in readme

    # shards and their index
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = tiny.load_state(out)
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    per_shard: dict[str, int] = {}
    for name, file in index["weight_map"].items():
        assert (out / file).is_file()
        per_shard[file] = per_shard.get(file, 0) + state[name].numel() * state[name].element_size()
    assert all(size <= 20_000 for size in per_shard.values())
    assert {j.name for j in plan.jobs} == set(state)

    # the tensors: the base's names, in bf16, with the task-arithmetic values
    from safetensors.torch import load_file

    base = load_file(str(zoo["base"] / "model.safetensors"))
    a = load_file(str(zoo["a"] / "model.safetensors"))
    b: dict[str, torch.Tensor] = {}
    for f in zoo["b"].glob("model-*.safetensors"):
        b.update(load_file(str(f)))
    assert set(state) == set(base)
    for name, t in state.items():
        assert t.dtype == torch.bfloat16
        want = base[name] + (0.5 * (a[name] - base[name]) + 0.25 * (b[name] - base[name]))
        torch.testing.assert_close(t, want.to(torch.bfloat16), rtol=0, atol=0)

    # nothing else: no staging directories, no stray files
    expected = {
        *shards,
        "model.safetensors.index.json",
        "config.json",
        "README.md",
        "mergesmith_config.yml",
        _output.MARKER,
    }
    assert {p.name for p in out.iterdir()} == expected | set(tok_files)
    assert leftovers(tmp_path) == []


def test_quick_digest_changes_with_the_file_and_full_digest_is_sha256(tmp_path: Path) -> None:
    from mergesmith.card import file_digest

    f = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * 20_000  # 5 MB: head, middle and tail are distinct regions
    f.write_bytes(bytes(data))
    quick = file_digest(f)
    assert quick.startswith("quick:") and len(quick) == len("quick:") + 64
    assert file_digest(f, full=True) == f"sha256:{hashlib.sha256(data).hexdigest()}"
    data[-1] ^= 1  # a change in the last MiB
    f.write_bytes(bytes(data))
    assert file_digest(f) != quick
    data[-1] ^= 1
    data.append(0)  # a change of size
    f.write_bytes(bytes(data))
    assert file_digest(f) != quick


def test_default_card_labels_quick_digests(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(config_for(zoo), out, progress=False)
    readme = (out / "README.md").read_text()
    assert "`model.safetensors` `quick:" in readme
    assert "--full-digests" in readme


def test_progress_bar_counts_tensors_and_bytes(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = merge(config_for(zoo), tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    n = len(plan.jobs)
    assert f"{n}/{n} tensors" in err
    total = f"{plan.write_bytes / 1e3:.0f}k"  # tqdm shows 3 significant digits
    assert plan.write_bytes > 100_000
    assert f"{total}/{total}" in err
