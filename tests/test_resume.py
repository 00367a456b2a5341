"""--resume: a merge killed with SIGKILL at any point and resumed writes the same bytes as one
that ran through; a changed shard on disk is merged again, a changed plan starts over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import mergesmith
from mergesmith import _output
from mergesmith._output import MANIFEST
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
SHARD = "5KB"  # about one tensor per shard: 21 tensors in 16 shards

# The CLI in a child process whose shard writer pauses after each tensor and each closed shard,
# so that the test can kill it at a chosen point.
CHILD = """
import signal, sys, time
from mergesmith import _safetensors
from mergesmith.cli import main

write, close = _safetensors.ShardWriter.write, _safetensors.ShardWriter.close
def slow_write(self, name, tensor):
    write(self, name, tensor)
    self.f.flush()
    time.sleep(0.05)
def slow_close(self):
    close(self)
    time.sleep(0.15)
_safetensors.ShardWriter.write, _safetensors.ShardWriter.close = slow_write, slow_close
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(["merge", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume-models")
    base, cfg = tiny.llama_state(0, num_hidden_layers=2)
    out = {"base": tiny.save(root / "base", base, cfg, tokenizer=True)}
    for i, name in enumerate(("a", "b")):
        out[name] = tiny.save(root / name, tiny.finetune(base, 10 + i), cfg)
    return out


def write_config(path: Path, models: dict[str, Path], method: str = "dare_ties", weight: float = 0.6) -> Path:
    path.write_text(
        f"merge_method: {method}\n"
        f"base_model: {models['base']}\n"
        "models:\n"
        f"  - model: {models['a']}\n"
        f"    parameters: {{weight: {weight}, density: 0.5}}\n"
        f"  - model: {models['b']}\n"
        "    parameters: {weight: 0.4, density: 0.7}\n"
        "dtype: float32\n"
        "seed: 7\n"
    )
    return path


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def stage_of(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}{_output.PARTIAL}-{pid}"


def done_shards(stage: Path) -> list[str]:
    try:
        return list(json.loads((stage / MANIFEST).read_text())["done"])
    except (OSError, ValueError, KeyError):
        return []


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mergesmith.cli", "merge", *args, "--no-progress", "--no-diagnose"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def signal_when(
    cfg: Path, out: Path, ready: Callable[[Path], bool], sig: int, *extra: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Start the slowed CLI merge and send it ``sig`` once ``ready(stage)``; return the stage it
    had and what it printed and returned on the way out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(cfg), str(out), "--max-shard-size", SHARD, "--no-progress", "--no-diagnose", *extra]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    stage = stage_of(out, child.pid)
    deadline = time.monotonic() + 120
    try:
        while not ready(stage):
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the merge never reached the point to signal it at"
            time.sleep(0.01)
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    return stage, subprocess.CompletedProcess(child.args, child.returncode, "", err)


def kill_when(cfg: Path, out: Path, ready: Callable[[Path], bool], *extra: str) -> Path:
    """Start the slowed CLI merge, SIGKILL it once ``ready(stage)``; return the stage it left."""
    stage, _ = signal_when(cfg, out, ready, signal.SIGKILL, *extra)
    assert stage.is_dir() and not out.exists()
    return stage


def resumes_to_the_reference(
    cfg: Path, out: Path, kept: int, reference: dict[str, bytes], tmp_path: Path
) -> None:
    """``--resume`` keeps the ``kept`` finished shards and writes the uninterrupted run's bytes."""
    done = cli(str(cfg), str(out), "--max-shard-size", SHARD, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resume: kept {kept} of 16 shards" in done.stderr
    assert files(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml", "out"]


def after(k: int) -> Callable[[Path], bool]:
    return lambda stage: len(done_shards(stage)) >= k


def mid_shard(stage: Path) -> bool:
    """A shard file is being written (after the first two), under its partial name."""
    return len(done_shards(stage)) >= 2 and any(stage.glob(".model-*.safetensors.partial-*"))


@pytest.fixture(scope="module")
def reference(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "merge.yml", models)
    done = cli(str(cfg), str(root / "out"), "--max-shard-size", SHARD)
    assert done.returncode == 0, done.stderr
    found = files(root / "out")
    assert len([n for n in found if n.endswith(".safetensors")]) >= 15
    return found


@pytest.mark.parametrize(
    "point",
    [after(0), after(1), after(4), after(9), after(14), mid_shard],
    ids=["0", "1", "4", "9", "14", "mid"],
)
def test_a_killed_merge_resumes_to_the_same_bytes(
    models: dict[str, Path], reference: dict[str, bytes], tmp_path: Path, point: Callable[[Path], bool]
) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    stage = kill_when(cfg, out, lambda s: (s / MANIFEST).is_file() and point(s))
    resumes_to_the_reference(cfg, out, len(done_shards(stage)), reference, tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_merge_keeps_its_finished_shards_for_resume(
    models: dict[str, Path], reference: dict[str, bytes], tmp_path: Path, sig: int
) -> None:
    """Ctrl-C or SIGTERM: the stage with its finished shards stays (the output does not appear),
    the message says how to go on, and --resume finishes with the same bytes."""
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    stage, ended = signal_when(cfg, out, after(4), sig)
    assert ended.returncode == 128 + sig, ended.stderr
    kept = len(done_shards(stage))
    assert stage.is_dir() and not out.exists() and 4 <= kept < 16
    assert (
        f"interrupted: no output was written; {kept} of 16 finished shards were kept in {stage}"
        in ended.stderr
    )
    assert "--resume" in ended.stderr and "Traceback" not in ended.stderr
    resumes_to_the_reference(cfg, out, kept, reference, tmp_path)


def test_an_interrupt_before_any_shard_is_finished_leaves_nothing(
    models: dict[str, Path], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    stage, ended = signal_when(
        cfg, out, lambda s: (s / MANIFEST).is_file() and not done_shards(s), signal.SIGINT
    )
    assert ended.returncode == 130, ended.stderr
    assert "interrupted: no output was written\n" in ended.stderr or ended.stderr.endswith(
        "no output was written"
    )
    assert not stage.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]


def test_a_resumed_merge_keeps_the_finished_shards_files(
    models: dict[str, Path], reference: dict[str, bytes], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    stage = kill_when(cfg, out, after(6))
    first = sorted(done_shards(stage))[0]
    inode = (stage / first).stat().st_ino
    plan = mergesmith.merge(cfg, out, max_shard_size=SHARD, resume=True)
    assert len(plan.shards) == 16
    assert (out / first).stat().st_ino == inode  # kept, not written again
    assert files(out) == reference


def test_a_finished_shard_changed_on_disk_is_merged_again(
    models: dict[str, Path], reference: dict[str, bytes], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    stage = kill_when(cfg, out, after(5))
    kept = len(done_shards(stage))
    victim = stage / done_shards(stage)[2]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    done = cli(str(cfg), str(out), "--max-shard-size", SHARD, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resume: kept {kept - 1} of 16 shards" in done.stderr
    assert "1 finished shard(s) changed on disk and are merged again" in done.stderr
    assert files(out) == reference


def test_a_changed_config_does_not_reuse_shards(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    kill_when(cfg, out, after(5))
    write_config(cfg, models, weight=0.5)
    done = cli(str(cfg), str(out), "--max-shard-size", SHARD, "--resume")
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("resume:")]
    assert line == [
        f"resume: the interrupted merge into {out.name} was of another plan (the config text differs); starting over"
    ]
    fresh = tmp_path / "fresh"
    assert cli(str(cfg), str(fresh), "--max-shard-size", SHARD).returncode == 0
    assert files(out) == files(fresh)


def test_a_changed_seed_or_shard_size_does_not_reuse_shards(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    kill_when(cfg, out, after(3))
    done = cli(str(cfg), str(out), "--max-shard-size", SHARD, "--resume", "--seed", "8")
    assert done.returncode == 0, done.stderr
    assert "(the seed differs); starting over" in done.stderr


def test_without_resume_a_stale_stage_is_removed_and_said_so(
    models: dict[str, Path], reference: dict[str, bytes], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    stage = kill_when(cfg, out, after(4))
    kept = len(done_shards(stage))
    done = cli(str(cfg), str(out), "--max-shard-size", SHARD)
    assert done.returncode == 0, done.stderr
    notes = [ln for ln in done.stderr.splitlines() if ln.startswith("note: removed")]
    assert notes == [
        f"note: removed {stage.name}, an interrupted merge into out with {kept} of 16 shards done; "
        "--resume would have kept them"
    ]
    assert not stage.exists()
    assert files(out) == reference


def test_resume_with_nothing_to_resume_merges_from_the_start(
    models: dict[str, Path], reference: dict[str, bytes], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    done = cli(str(cfg), str(tmp_path / "out"), "--max-shard-size", SHARD, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resume: no interrupted merge into out was found; merging from the start" in done.stderr
    assert files(tmp_path / "out") == reference


def test_resume_with_workers_and_killed_workers(
    models: dict[str, Path], reference: dict[str, bytes], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "merge.yml", models)
    out = tmp_path / "out"
    kill_when(cfg, out, after(3), "--workers", "2")  # the workers die with it (their parent is gone)
    done = cli(str(cfg), str(out), "--max-shard-size", SHARD, "--resume", "--workers", "3")
    assert done.returncode == 0, done.stderr
    assert "resume: kept" in done.stderr
    assert files(out) == reference


def test_an_unreadable_progress_file_starts_over(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesmith import shards

    plan = mergesmith.validate(write_config(tmp_path / "merge.yml", models), max_shard_size=SHARD)
    fp = shards.fingerprint(plan)
    stage = tmp_path / f".out{_output.PARTIAL}-1"
    stage.mkdir()
    for text in ("{not json", '{"fingerprint": [], "done": {}, "thresholds": null}', "[1, 2]"):
        (stage / MANIFEST).write_text(text)
        (stage / "model-00001-of-00016.safetensors").write_bytes(b"x")
        progress = shards.Progress.start(plan, stage, fp)
        assert progress.todo() == list(range(16))
        assert list(stage.iterdir()) == []
        err = capsys.readouterr().err
        assert (
            err == "resume: the interrupted merge into out (its progress file is unreadable); starting over\n"
        )
