"""What --force may replace, outputs that appear while a merge runs, merges racing into one output,
crashes between the renames, signals, write failures, and file-provided text on the terminal."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith.api
import mergesmith.evaluate
import mergesmith.report
from mergesmith import _output
from mergesmith._safetensors import ShardWriter
from mergesmith.api import merge
from mergesmith.cli import main
from mergesmith.errors import ConfigError, OutputError
from mergesmith.plan import parse_size
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base, cfg = tiny.llama_state(0)
    out = {"base": tiny.save(tmp_path / "models" / "base", base, cfg)}
    for i, name in enumerate(("a", "b")):
        out[name] = tiny.save(tmp_path / "models" / name, tiny.finetune(base, 10 + i), cfg)
    return out


def config(models: dict[str, Path]) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("a", "b")],
        "dtype": "float32",
    }


def config_file(models: dict[str, Path], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config(models)))
    return path


def tree(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def merge_args(cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", str(cfg), str(out), "--no-progress", "--no-diagnose", *extra]


# -- what --force replaces --------------------------------------------------------------------------


def test_force_refuses_a_directory_mergesmith_did_not_write(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    cfg = config_file(models, work / "ta.yml")
    (work / "notes.txt").write_text("mine")
    before = tree(work)
    code, _, err = cli(merge_args(cfg, work, "--force"), capsys)
    assert code == 1
    assert err.startswith(f"error: --force: output directory {work} was not written by mergesmith")
    assert "replacing it would delete 2 entries (notes.txt, ta.yml)" in err
    assert "move those files away yourself or choose another directory" in err
    assert "Traceback" not in err
    assert tree(work) == before
    assert hidden(tmp_path) == []


def test_force_refuses_the_current_directory_even_when_it_is_an_earlier_output(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    merge(config(models), out, progress=False)
    before = tree(out)
    monkeypatch.chdir(out)
    with pytest.raises(OutputError) as info:
        merge(config(models), ".", force=True, progress=False)
    assert str(info.value).startswith("--force: output directory . is the current directory or holds it")
    assert "choose a new output directory" in str(info.value)
    assert tree(out) == before


def test_every_output_is_marked_and_force_replaces_marked_or_carded_outputs(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    merge(config(models), out, progress=False)
    marker = json.loads((out / _output.MARKER).read_text())
    assert marker["written_by"] == "mergesmith" and marker["kind"] == "merge"
    # an output written before the marker existed is known by its model card
    (out / _output.MARKER).unlink()
    (out / "notes.txt").write_text("old")
    merge(config(models), out, force=True, progress=False)
    assert not (out / "notes.txt").exists()
    assert (out / _output.MARKER).is_file()

    from mergesmith.extract import extract_lora

    adapter = tmp_path / "adapter"
    extract_lora(models["base"], models["a"], adapter, rank=2)
    assert json.loads((adapter / _output.MARKER).read_text())["kind"] == "lora extract"
    extract_lora(models["base"], models["a"], adapter, rank=1, force=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 1


def test_a_marker_that_is_not_ours_is_not_trusted(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for text in ["[" * 30_000 + "]" * 30_000, '{"written_by": "someone else"}', "\xff\xfe"]:
        (out / _output.MARKER).write_text(text, encoding="latin-1")
        with pytest.raises(OutputError, match=r"was not written by mergesmith .* would delete 2 entries"):
            merge(config(models), out, force=True, progress=False)
        assert (out / "keep.txt").read_text() == "mine"


# -- an output that appears while the merge runs --------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_made_at_the_output_while_merging_is_kept(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """Someone else's files appear at the output while the merge runs."""
    out = tmp_path / "out"
    real = mergesmith.api.execute

    def then_someone_writes_there(*args: Any, **kwargs: Any) -> list[str]:
        warnings = real(*args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("made meanwhile")
        return warnings

    monkeypatch.setattr(mergesmith.api, "execute", then_someone_writes_there)
    with pytest.raises(OutputError) as info:
        merge(config(models), out, force=force, progress=False)
    expected = (
        f"--force: output directory {out} was not written by mergesmith"
        if force
        else f"output directory {out} exists and is not empty"
    )
    assert str(info.value).startswith(expected)
    assert tree(out) == {"theirs.txt": hashlib.sha256(b"made meanwhile").hexdigest()}
    assert hidden(tmp_path) == []


def test_an_output_another_merge_made_meanwhile_is_kept_even_with_force(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    other = tmp_path / "other"
    merge(config(models), other, max_shard_size=20_000, progress=False)
    made = tree(other)
    real = mergesmith.api.execute

    def then_another_merge_finishes(*args: Any, **kwargs: Any) -> list[str]:
        warnings = real(*args, **kwargs)
        other.rename(out)
        return warnings

    monkeypatch.setattr(mergesmith.api, "execute", then_another_merge_finishes)
    with pytest.raises(OutputError) as info:
        merge(config(models), out, force=True, progress=False)
    assert str(info.value).startswith(f"output directory {out} appeared or was replaced while this merge ran")
    assert "it was left as it is" in str(info.value)
    assert tree(out) == made
    assert hidden(tmp_path) == []


# -- locking and racing merges ----------------------------------------------------------------------


def test_a_lock_file_removed_after_it_was_opened_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge that opened the lock file just before its holder finished and removed it must not
    count the removed file's lock: a third merge may hold the new one."""
    out = tmp_path / "out"
    lock = tmp_path / ".out.mergesmith-lock"
    real_flock = _output.fcntl.flock
    third: list[Any] = []

    def flock(fd: int, op: int) -> None:
        if not third:  # between our open and our flock: the holder finishes, a third merge starts
            lock.unlink()
            third.append(_output.output_lock(out))
            third[0].__enter__()
        real_flock(fd, op)

    monkeypatch.setattr(_output.fcntl, "flock", flock)
    try:
        refused = rf"another merge \(pid {os.getpid()}\) is writing this output"
        with pytest.raises(OutputError, match=refused), _output.output_lock(out):
            pass
    finally:
        third[0].__exit__(None, None, None)
    assert not lock.exists()


RACER = """
import sys, time
from pathlib import Path
from mergesmith import _output
from mergesmith.cli import main

check = _output.check_output
calls = []
def check_then_wait(out_dir, inputs, force):
    check(out_dir, inputs, force)
    if not calls:  # the first check, before the lock: both merges have passed it
        calls.append(1)
        Path(sys.argv[1]).touch()
        while not Path(sys.argv[2]).exists():
            time.sleep(0.01)
_output.check_output = check_then_wait
sys.exit(main(["merge", *sys.argv[3:], "--no-progress", "--no-diagnose"]))
"""


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("when", ["together", "one after the other"])
def test_two_merges_into_one_output_one_wins_the_other_is_refused(
    models: dict[str, Path], tmp_path: Path, when: str, force: bool
) -> None:
    cfg = config_file(models, tmp_path / "ta.yml")
    out = tmp_path / "work" / "merged"
    out.parent.mkdir()
    ready = [tmp_path / "ready1", tmp_path / "ready2"]
    go = [tmp_path / "go1", tmp_path / "go2"]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(r), str(g), str(cfg), str(out)]
            + (["--force"] if force else []),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, g in zip(ready, go)
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        assert all(c.poll() is None for c in children)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    go[0].touch()
    if when != "together":
        children[0].wait(timeout=120)
    go[1].touch()
    errs = [c.communicate(timeout=120)[1] for c in children]
    codes = [c.returncode for c in children]
    assert sorted(codes) == [0, 1], errs
    loser = errs[codes.index(1)]
    assert "Traceback" not in loser
    assert (
        # the winner's pid, or no pid when the loser looked between the winner's lock and its pid
        f"another merge (pid {children[codes.index(0)].pid}) is writing this output" in loser
        or f"{out}: another merge is writing this output" in loser
        or f"output directory {out} exists and is not empty" in loser
        or f"output directory {out} appeared or was replaced while this merge ran" in loser
    )
    assert tiny.load_state(out).keys() == tiny.load_state(models["base"]).keys()
    assert hidden(out.parent) == []


# -- replacing an output: one atomic step, or recovered after a crash ---------------------------------


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    assert _output._exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["from_b"]
    assert [p.name for p in b.iterdir()] == ["from_a"]


def test_force_swaps_the_output_in_one_step(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    merge(config(models), out, progress=False)

    def two_renames() -> None:
        raise AssertionError("the old output was moved aside instead of swapped")

    monkeypatch.setattr(_output, "_between_renames", two_renames)
    merge(config(models), out, force=True, max_shard_size=20_000, progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    assert hidden(tmp_path) == []


CRASH = """
import os, sys
from mergesmith import _output
from mergesmith.cli import main
_output._exchange = lambda a, b: False  # a system without renameat2
_output._between_renames = lambda: os._exit(9)  # the process dies between the two renames
sys.exit(main(["merge", sys.argv[1], sys.argv[2], "--force", "--no-progress", "--no-diagnose"]))
"""


def test_a_crash_between_the_renames_is_recovered_by_the_next_run(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_file(models, tmp_path / "ta.yml")
    out = tmp_path / "work" / "out"
    merge(cfg, out, progress=False)
    before = tree(out)
    child = subprocess.Popen([sys.executable, "-c", CRASH, str(cfg), str(out)], cwd=ROOT)
    assert child.wait(timeout=120) == 9
    assert not out.exists()
    aside = out.parent / f".out{_output.PARTIAL}-old-{child.pid}"
    assert tree(aside) == before

    code, _, err = cli(merge_args(cfg, out), capsys)
    assert code == 1
    assert f"note: put back {out.resolve()}, the previous output an interrupted run had moved aside" in err
    assert f"error: output directory {out} exists and is not empty" in err
    assert tree(out) == before
    assert hidden(out.parent) == []


# -- signals --------------------------------------------------------------------------------------

SLOW = """
import signal, sys, time
from pathlib import Path
from mergesmith import _safetensors
from mergesmith.cli import main

write = _safetensors.ShardWriter.write
def slow_write(self, name, tensor):
    write(self, name, tensor)
    Path(sys.argv[1]).touch()
    time.sleep(0.2)
_safetensors.ShardWriter.write = slow_write
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(["merge", *sys.argv[2:], "--no-progress", "--no-diagnose"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("previous", [False, True])
def test_a_signal_mid_merge_cleans_up_and_says_what_was_left(
    models: dict[str, Path], tmp_path: Path, sig: signal.Signals, previous: bool
) -> None:
    cfg = config_file(models, tmp_path / "ta.yml")
    out = tmp_path / "work" / "out"
    if previous:
        merge(cfg, out, progress=False)
    before = tree(out) if previous else None
    started = tmp_path / "started"
    argv = [str(cfg), str(out)] + (["--force"] if previous else [])
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW, str(started), *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not started.exists():
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + sig
    assert "Traceback" not in err
    if previous:
        assert (
            f"interrupted: no output was written; the previous contents of {out} were left untouched" in err
        )
        assert tree(out) == before
    else:
        assert err.strip().endswith("interrupted: no output was written")
        assert not out.exists()
    assert hidden(out.parent) == []


def test_an_interrupted_evaluation_after_the_merge_says_the_model_is_complete(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = config_file(models, tmp_path / "ta.yml")
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    out = tmp_path / "out"

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mergesmith.report, "compare", interrupted)
    code, _, err = cli(merge_args(cfg, out, "--eval", str(task)), capsys)
    assert code == 130
    assert f"interrupted: the merged model in {out} is complete; the evaluation report was not written" in err
    assert "no output was written" not in err
    assert (out / "model.safetensors").is_file()


def test_an_interrupted_diagnosis_says_its_files_may_be_partial(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import mergesmith.diagnose

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mergesmith.diagnose, "write_diagnosis", interrupted)
    diag = tmp_path / "diag"
    argv = ["diagnose", "--base", str(models["base"]), str(models["a"]), "--out", str(diag), "--no-progress"]
    code, _, err = cli(argv, capsys)
    assert code == 130
    assert f"interrupted: {diag} may hold only some of diagnosis.json, diagnosis.html and the plots" in err


# -- write failures -------------------------------------------------------------------------------


class _FullDisk:
    """A file whose writes fail as on a full disk, and whose close fails again flushing them."""

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_force_gives_one_error_and_keeps_the_old_output(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = config_file(models, tmp_path / "ta.yml")
    out = tmp_path / "work" / "out"
    merge(cfg, out, progress=False)
    before = tree(out)
    written: list[str] = []
    write = ShardWriter.write

    def disk_fills_up(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        if len(written) == 3:
            self.f.close()
            self.f = _FullDisk()  # type: ignore[assignment]
        written.append(name)
        write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", disk_fills_up)
    code, _, err = cli(merge_args(cfg, out, "--force"), capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"writing {written[-1]} failed: No space left on device (errno 28 ENOSPC)" in err
    assert "the disk is full; free space or choose an output on another disk" in err
    assert tree(out) == before
    assert hidden(out.parent) == []


def test_a_full_disk_writing_a_lora_extraction_gives_one_error_and_keeps_the_old_adapter(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mergesmith.extract import extract_lora

    out = tmp_path / "work" / "adapter"
    extract_lora(models["base"], models["a"], out, rank=2)
    before = tree(out)
    write_text = Path.write_text

    def full(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name == "extraction_report.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    argv = ["lora", "extract", str(models["base"]), str(models["a"]), str(out), "--rank", "1", "--force"]
    code, _, err = cli(argv, capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "extraction_report.json: cannot write: No space left on device (errno 28 ENOSPC)" in err
    assert tree(out) == before
    assert hidden(out.parent) == []


def test_an_aborted_shard_is_closed_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    writer = ShardWriter(path, {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))})
    writer.write("a", torch.zeros(2))
    writer.abort()
    assert writer.f.closed
    assert not path.exists()


# -- eval --json, diagnose --out, --max-shard-size ---------------------------------------------------


def test_eval_json_is_written_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    scores = tmp_path / "scores.json"
    scores.write_text("old scores")
    score = mergesmith.evaluate.TaskScore("task", 1, 1.0, 0.5, 1.6)
    monkeypatch.setattr(mergesmith.evaluate, "evaluate", lambda *a, **k: [score])

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_output.os, "fsync", full)
    code, _, err = cli(["eval", "model", "--tasks", str(task), "--json", str(scores)], capsys)
    assert code == 1
    assert err.splitlines()[-1].startswith(
        f"error: {scores}: cannot write: No space left on device (errno 28 ENOSPC)"
    )
    assert scores.read_text() == "old scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json", "task.jsonl"]

    monkeypatch.undo()
    monkeypatch.setattr(mergesmith.evaluate, "evaluate", lambda *a, **k: [score])
    assert cli(["eval", "model", "--tasks", str(task), "--json", str(scores)], capsys)[0] == 0
    assert json.loads(scores.read_text())[0]["accuracy"] == 1.0
    nowhere = tmp_path / "missing" / "scores.json"
    code, _, err = cli(["eval", "model", "--tasks", str(task), "--json", str(nowhere)], capsys)
    assert code == 1
    assert err.splitlines()[-1].startswith(
        f"error: {nowhere}: cannot write: No such file or directory (errno 2 ENOENT)"
    )


def test_diagnose_out_inside_an_input_model_is_refused(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree(models["a"])
    diag = models["a"] / "diagnosis"
    argv = ["diagnose", "--base", str(models["base"]), str(models["a"]), "--out", str(diag), "--no-progress"]
    code, out, err = cli(argv, capsys)
    assert code == 1
    assert err.startswith(f"error: output directory {diag} is inside input model {models['a']}")
    assert "choose a directory outside every input model" in err
    assert out == ""  # refused before the models are read
    assert tree(models["a"]) == before and not diag.exists()


@pytest.mark.parametrize("size", ["nan", "inf", "0", "-1", "1.5x", "true", "0.1", "1e300GB"])
def test_bad_max_shard_sizes_are_refused(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str
) -> None:
    cfg = config_file(models, tmp_path / "ta.yml")
    out = tmp_path / "out"
    code, _, err = cli(merge_args(cfg, out, "--max-shard-size", size), capsys)
    assert code == 1
    assert err.startswith(f"error: size {size!r}") or err.startswith(f"error: cannot read size {size!r}")
    assert "write it like 5GB, 500MB or 2GiB" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("size", [True, 0, -5, 1.5])
def test_bad_max_shard_sizes_are_refused_by_the_api(size: Any) -> None:
    with pytest.raises(ConfigError, match="write it like 5GB"):
        parse_size(size)


# -- file-provided text on the terminal -------------------------------------------------------------


def test_tensor_names_from_a_file_are_escaped_on_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weird = "model.\x1b[2J.weight"
    base, cfg = tiny.llama_state(0)
    base[weird] = torch.ones(2)
    tuned = tiny.finetune(base, 1)
    tuned[weird] = torch.tensor([1.0, float("nan")])
    lacking = {k: v for k, v in tuned.items() if k != weird}
    paths = {
        "base": tiny.save(tmp_path / "base", base, cfg),
        "a": tiny.save(tmp_path / "a", tuned, cfg),
        "b": tiny.save(tmp_path / "b", lacking, cfg),
    }

    def write(name: str, members: list[str]) -> Path:
        doc = {
            "merge_method": "task_arithmetic",
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths[m]), "parameters": {"weight": 1.0}} for m in members],
        }
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path

    shown = "model.\\x1b[2J.weight"
    code, out, err = cli(["validate", str(write("ok.yml", ["a"]))], capsys)  # the plan's listing
    assert code == 0 and shown in out and "\x1b" not in out
    code, out, err = cli(["validate", str(write("bad.yml", ["a", "b"]))], capsys)  # an error
    assert code == 1 and err.startswith(f"error: {shown}: missing from {paths['b']}") and "\x1b" not in err
    merged = tmp_path / "merged"
    code, out, err = cli(merge_args(write("ok.yml", ["a"]), merged, "--on-nonfinite", "warn"), capsys)
    assert code == 0  # a warning
    assert f"warning: {shown}: task_arithmetic produced 1 NaN or infinite values" in err
    assert "\x1b" not in err and "\x1b" not in out


def test_task_names_in_a_printed_report_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    from mergesmith.commands._common import print_report as _print_report
    from mergesmith.evaluate import TaskScore
    from mergesmith.report import Entry, build_report

    task = "math\x1b]0;pwned\x07"
    score = {task: TaskScore(task, 4, 0.5, 1.0, 2.7)}
    report = build_report([task], [Entry("p", "p", score)], [Entry("m", "m", score, ("p",))])
    _print_report(report, [])
    out = capsys.readouterr().out
    assert "math\\x1b]0;pwned\\x07" in out
    assert "\x1b" not in out and "\x07" not in out


@pytest.mark.parametrize("command", ["tune", "compare", "eval"])
def test_interrupted_commands_that_write_several_files_say_what_may_be_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    import mergesmith.tune

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    monkeypatch.setattr(mergesmith.tune, "tune", interrupted)
    monkeypatch.setattr(mergesmith.report, "compare", interrupted)
    monkeypatch.setattr(mergesmith.evaluate, "evaluate", interrupted)
    argv, said = {
        "tune": (
            ["tune", "cfg.yml", "--tasks", str(task), "--out", "study"],
            "interrupted: study is partial: study.db keeps the finished trials",
        ),
        "compare": (
            ["compare", "--tasks", str(task), "--parents", "p", "--merged", "m", "--out", "cmp"],
            "interrupted: the report files in cmp may be missing or from an earlier run",
        ),
        "eval": (
            ["eval", "model", "--tasks", str(task), "--json", "scores.json"],
            "interrupted: no scores were written to scores.json",
        ),
    }[command]
    code, _, err = cli(argv, capsys)
    assert code == 130
    assert err.splitlines()[-1].startswith(said)


def test_model_names_in_the_diagnosis_summary_are_escaped(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weird = models["a"].rename(tmp_path / "models" / "ft\x1b[2J")
    code, out, err = cli(["diagnose", "--base", str(models["base"]), str(weird), "--no-progress"], capsys)
    assert code == 0
    assert "ft\\x1b[2J: task vector" in out
    assert "\x1b" not in out and "\x1b" not in err
