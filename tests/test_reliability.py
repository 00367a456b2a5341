"""Faults and hostile inputs: killed merges, full disks, concurrent merges, NaN/Inf, remote code,
lying headers, symlinks out of a model, and many parents at once."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith
from mergesmith import _output
from mergesmith._safetensors import ShardWriter
from mergesmith.errors import CheckpointError, MethodError, OutputError
from mergesmith.sources import Checkpoint
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base, cfg = tiny.llama_state(0)
    out = {"base": tiny.save(tmp_path / "base", base, cfg)}
    for i, name in enumerate(("a", "b")):
        out[name] = tiny.save(tmp_path / name, tiny.finetune(base, 10 + i), cfg)
    return out


def config(models: dict[str, Path], method: str = "task_arithmetic", weight: float = 1.0) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": weight}} for n in ("a", "b")],
        "dtype": "float32",
    }


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- killed merges ----------------------------------------------------------------------------------

# Runs a merge in a child process whose shard writer pauses after each tensor and says when the
# first one is on disk, so the parent can kill it in the middle of writing.
CHILD = """
import signal, sys, time
from pathlib import Path
from mergesmith import _safetensors
from mergesmith.cli import main

write = _safetensors.ShardWriter.write
def slow_write(self, name, tensor):
    write(self, name, tensor)
    self.f.flush()
    Path(sys.argv[1]).touch()
    time.sleep(0.2)
_safetensors.ShardWriter.write = slow_write
# as in a terminal: a background test runner may start children with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(["merge", sys.argv[2], sys.argv[3], "--no-progress"]))
"""


def start_merge(tmp_path: Path, cfg: Path, out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp_path / "first-tensor-written"
    marker.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(marker), str(cfg), str(out)], cwd=ROOT, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.02)
    return child, marker


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_merge_leaves_no_output_and_the_next_run_cleans_up(
    models: dict[str, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    cfg = tmp_path / "ta.yml"
    cfg.write_text(json.dumps(config(models)))
    out = tmp_path / "out" / "merged"
    child, _ = start_merge(tmp_path, cfg, out)
    stage = out.parent / f".merged{_output.PARTIAL}-{child.pid}"
    assert stage.is_dir() and any(stage.glob(".*.safetensors.partial-*"))  # mid-write, under a hidden name
    child.send_signal(sig)
    code = child.wait(timeout=30)
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert stage.exists()  # nothing could clean up: the hidden name marks it incomplete
    else:  # Ctrl-C, and SIGTERM like it: the merge removes its own partial output and its lock
        assert code == 128 + sig
        assert hidden(out.parent) == []
    mergesmith.merge(cfg, out)
    assert hidden(out.parent) == []  # the dead run's stage and lock are gone
    merged = tiny.load_state(out)
    base = tiny.load_state(models["base"])
    assert merged.keys() == base.keys()


def test_a_second_merge_into_the_same_output_is_refused_while_the_first_runs(
    models: dict[str, Path], tmp_path: Path
) -> None:
    cfg = tmp_path / "ta.yml"
    cfg.write_text(json.dumps(config(models)))
    out = tmp_path / "merged"
    child, _ = start_merge(tmp_path, cfg, out)
    try:
        with pytest.raises(OutputError, match=rf"another merge \(pid {child.pid}\) is writing this output"):
            mergesmith.merge(cfg, out, force=True)
    finally:
        child.wait(timeout=60)
    assert child.returncode == 0
    assert tiny.load_state(out).keys() == tiny.load_state(models["base"]).keys()


# -- write failures -------------------------------------------------------------------------------


def test_full_disk_gives_the_path_and_errno_and_leaves_nothing(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    write = ShardWriter.write

    def disk_fills_up(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        if len(written) == 3:  # the disk fills up at the fourth tensor
            self.f.close()
            self.f = _FullFile()  # type: ignore[assignment]
        written.append(name)
        write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", disk_fills_up)
    out = tmp_path / "merged"
    with pytest.raises(OutputError) as info:
        mergesmith.merge(config(models), out)
    msg = str(info.value)
    assert f"writing {written[-1]} failed" in msg
    assert "(errno 28 ENOSPC): the disk is full; free space or choose an output on another disk" in msg
    assert ".mergesmith-partial-" in msg and "model.safetensors" in msg
    assert not out.exists() and hidden(tmp_path) == []


class _FullFile:
    """A file object whose writes fail as on a full disk."""

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        pass


def test_unwritable_output_parent_names_the_path(models: dict[str, Path], tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "sub" / "merged"  # an ancestor that is a file: ENOTDIR even for root
        with pytest.raises(
            OutputError, match=r"cannot create the output's parent directory: .* \(errno 20 ENOTDIR\)"
        ):
            mergesmith.merge(config(models), out)
        return
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match=r"errno 13 EACCES\): permission denied"):
        mergesmith.merge(config(models), locked / "merged")


# -- NaN, Inf and overflow ------------------------------------------------------------------------


def test_nan_in_an_input_is_named_and_warn_mode_writes_and_records_it(
    models: dict[str, Path], tmp_path: Path
) -> None:
    state = tiny.load_state(models["a"])
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])
    tiny.save(models["a"], state, tiny.llama_config())
    with pytest.raises(MethodError) as info:
        mergesmith.merge(config(models), tmp_path / "out")
    msg = str(info.value)
    assert f"{name}: task_arithmetic produced 2 NaN or infinite values" in msg
    assert f"non-finite inputs: {models['a']}: {name} (2 values)" in msg
    assert "--on-nonfinite warn" in msg
    assert not (tmp_path / "out").exists()

    mergesmith.merge(config(models), tmp_path / "out", on_nonfinite="warn")
    merged = tiny.load_state(tmp_path / "out")
    assert int((~torch.isfinite(merged[name])).sum()) == 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Warnings" in card and f"{name}: task_arithmetic produced 2 NaN" in card


def test_infinities_made_by_the_method_blame_the_parameters(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        MethodError, match=r"every input is finite: check the parameters for divisions by zero"
    ):
        mergesmith.merge(config(models, weight=1e300), tmp_path / "out")


def test_float16_overflow_is_reported(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = {**config(models, weight=4e6), "out_dtype": "float16"}
    with pytest.raises(MethodError, match=r"overflow float16 \(max 65504\)"):
        mergesmith.merge(cfg, tmp_path / "out")


# -- hostile model directories --------------------------------------------------------------------


def test_remote_code_in_a_model_is_never_run(models: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    cfg = json.loads((models["a"] / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
        "AutoConfig": "modeling_evil.EvilConfig",
    }
    (models["a"] / "config.json").write_text(json.dumps(cfg))
    (models["a"] / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    mergesmith.validate(config(models))
    mergesmith.merge(config(models), tmp_path / "out")
    assert not marker.exists()
    assert not list((tmp_path / "out").glob("*.py"))


def test_header_declaring_a_terabyte_tensor_is_refused_without_allocating(tmp_path: Path) -> None:
    d = tmp_path / "m"
    header = {"w": {"dtype": "F32", "shape": [1 << 19, 1 << 19], "data_offsets": [0, 1 << 40]}}
    raw = json.dumps(header).encode()
    d.mkdir()
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(64))
    tracemalloc.start()
    try:
        with pytest.raises(
            CheckpointError,
            match=r"model.safetensors: tensor 'w' declares .* \(1099511627776 bytes\) .* corrupt or truncated",
        ):
            Checkpoint(d)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_index_shard_that_is_a_symlink_out_of_the_model_is_refused(tmp_path: Path) -> None:
    base, cfg = tiny.llama_state(0)
    d = tiny.save(tmp_path / "m", base, cfg, shards=2)
    shard = d / "model-00002-of-00002.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere)
    with pytest.raises(
        CheckpointError, match=r"a symlink to .*elsewhere.safetensors, outside the model directory"
    ):
        Checkpoint(d)
    inside = d / "sub" / "real.safetensors"
    inside.parent.mkdir()
    elsewhere.rename(inside)
    shard.unlink()
    shard.symlink_to(inside)  # a link that stays inside the model is fine
    assert sorted(Checkpoint(d).keys()) == sorted(base)


# -- load -----------------------------------------------------------------------------------------


def test_twelve_parents_keep_memory_and_open_files_bounded(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    base, cfg = tiny.llama_state(0, num_hidden_layers=6, hidden_size=128, intermediate_size=1024)
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    paths = {"base": tiny.save(tmp_path / "base", base, cfg, shards=3)}
    for i in range(12):
        paths[f"p{i}"] = tiny.save(tmp_path / f"p{i}", tiny.finetune(base, 100 + i), cfg, shards=3)
    doc = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths[f"p{i}"]), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(12)
        ],
    }
    me = psutil.Process()
    start_rss, start_fds = me.memory_info().rss, me.num_fds()
    peak = {"rss": start_rss, "fds": start_fds}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], me.memory_info().rss)
            peak["fds"] = max(peak["fds"], me.num_fds())
            time.sleep(0.005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        plan = mergesmith.merge(doc, tmp_path / "out", progress=False)
    finally:
        done.set()
        watcher.join()
    assert len(plan.models) == 13 and len(plan.jobs) == len(base)
    inputs = 13 * nbytes
    grew = peak["rss"] - start_rss
    # The inputs are 13 x 10.7 MB; the merge holds one tensor's inputs (13 x 0.5 MB at most) at a time.
    print(
        f"12 parents: RSS grew {grew / 1e6:.1f} MB for {inputs / 1e6:.0f} MB of inputs; {peak['fds'] - start_fds} more open files"
    )
    assert grew < inputs / 3, f"RSS grew {grew / 1e6:.0f} MB for {inputs / 1e6:.0f} MB of inputs"
    # 13 models x 3 shards are 39 files: they are opened when read, not all held open
    assert peak["fds"] - start_fds <= 12, peak
