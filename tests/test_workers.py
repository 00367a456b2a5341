"""--workers N and --executor ray: the shards merged in other processes give the same bytes as one
process; a failing worker stops the merge with its own message and leaves no output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mergesmith
from mergesmith import _output, executors, shards
from mergesmith.errors import ConfigError, MergesmithError, MethodError, OutputError
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
SHARD = "5KB"

CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.4}}\ndtype: float32\n",
    "ties": "merge_method: ties\nbase_model: {base}\nparameters: {{mode: paper}}\nmodels:\n"
    "  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.4, density: 0.3}}\ndtype: float32\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
    "  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.4, density: 0.7}}\ndtype: float32\nseed: 11\n",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker-models")
    base, cfg = tiny.llama_state(0, num_hidden_layers=2)
    out = {"base": tiny.save(root / "base", base, cfg, tokenizer=True)}
    for i, name in enumerate(("a", "b")):
        out[name] = tiny.save(root / name, tiny.finetune(base, 20 + i), cfg)
    bad = tiny.finetune(base, 22)
    last = sorted(bad)[-1]
    bad[last] = bad[last].clone()
    bad[last].view(-1)[0] = float("nan")
    out["nan"] = tiny.save(root / "nan", bad, cfg)
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def config(tmp_path: Path, models: dict[str, Path], method: str, **swap: str) -> Path:
    paths = {k: str(v) for k, v in models.items()} | swap
    path = tmp_path / f"{method}.yml"
    path.write_text(CONFIGS[method].format(**paths))
    return path


@pytest.mark.parametrize("method", list(CONFIGS))
def test_workers_write_the_same_bytes_as_one_process(
    models: dict[str, Path], tmp_path: Path, method: str, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, models, method)
    outputs = {}
    for n in (1, 2, 3):
        mergesmith.merge(
            cfg, tmp_path / f"out{n}", max_shard_size=SHARD, workers=n, threads=2, progress=False
        )
        outputs[n] = files(tmp_path / f"out{n}")
    assert len([f for f in outputs[1] if f.endswith(".safetensors")]) >= 15
    assert outputs[1] == outputs[2] == outputs[3]
    err = capfd.readouterr().err
    assert "shard 16/16 done by worker" in err
    assert "done by worker 3" in err


def test_each_worker_gets_its_share_of_the_threads(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[shards.ShardTask] = []
    real = executors.run_local

    def spy(task: shards.ShardTask, *args: object) -> None:
        seen.append(task)
        real(task, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(executors, "run_local", spy)
    cfg = config(tmp_path, models, "linear")
    mergesmith.merge(cfg, tmp_path / "out", max_shard_size=SHARD, workers=3, threads=7)
    assert seen[0].threads == 2
    monkeypatch.setattr(mergesmith._threads, "default_threads", lambda: 2)
    mergesmith.merge(cfg, tmp_path / "out2", max_shard_size=SHARD, workers=3)
    assert seen[1].threads == 1


def test_a_failing_worker_stops_the_merge_with_one_clean_error(
    models: dict[str, Path], tmp_path: Path
) -> None:
    cfg = config(tmp_path, models, "linear", b=str(models["nan"]))
    out = tmp_path / "out"
    args = [
        "merge",
        str(cfg),
        str(out),
        "--max-shard-size",
        SHARD,
        "--workers",
        "2",
        "--no-progress",
        "--no-diagnose",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "mergesmith.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "produced 1 NaN or infinite values" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yml"]


def test_a_failing_worker_raises_its_error_class(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = config(tmp_path, models, "linear", b=str(models["nan"]))
    with pytest.raises(MethodError, match="NaN or infinite"):
        mergesmith.merge(cfg, tmp_path / "out", max_shard_size=SHARD, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yml"]


def test_warnings_from_workers_reach_the_model_card_in_order(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = config(tmp_path, models, "linear", b=str(models["nan"]))
    for n in (1, 3):
        mergesmith.merge(cfg, tmp_path / f"out{n}", max_shard_size=SHARD, workers=n, on_nonfinite="warn")
    assert files(tmp_path / "out1") == files(tmp_path / "out3")
    assert "## Warnings" in (tmp_path / "out3" / "README.md").read_text()


# a slowed merge in every process, workers included (sitecustomize runs in each)
SLOW = """
import time
from mergesmith import _safetensors
write = _safetensors.ShardWriter.write
def slow_write(self, name, tensor):
    write(self, name, tensor)
    time.sleep(0.3)
_safetensors.ShardWriter.write = slow_write
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_workers_and_removes_the_stage(
    models: dict[str, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW)
    cfg = config(tmp_path, models, "linear")
    out = tmp_path / "out"
    main = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from mergesmith.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = [
        "merge",
        str(cfg),
        str(out),
        "--max-shard-size",
        SHARD,
        "--workers",
        "2",
        "--no-progress",
        "--no-diagnose",
    ]
    child = subprocess.Popen(
        [sys.executable, "-c", main, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"},
        stderr=subprocess.PIPE,
        text=True,
    )
    stage = out.parent / f".{out.name}{_output.PARTIAL}-{child.pid}"
    deadline = time.monotonic() + 120
    while not any(stage.glob(".model-*.partial-*")):
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    workers = {int(p.name.rsplit("-", 1)[1]) for p in stage.glob(".model-*.partial-*")}
    child.send_signal(sig)
    assert child.wait(timeout=60) == 128 + sig
    assert "interrupted: no output was written" in (child.stderr.read() if child.stderr else "")
    assert not stage.exists() and not out.exists()
    time.sleep(0.5)
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_refuses_a_plan_that_is_not_the_parents(models: dict[str, Path], tmp_path: Path) -> None:
    plan = mergesmith.validate(config(tmp_path, models, "linear"), max_shard_size=SHARD)
    fp = shards.fingerprint(plan)
    task = shards.task_for(
        plan, tmp_path, fp, device=torch.device("cpu"), thresholds=None, on_nonfinite="error", threads=1
    )
    assert len(shards.plan_of(task).shards) == len(plan.shards)
    with pytest.raises(MergesmithError, match="shard layout differs"):
        shards.plan_of(replace(task, max_shard_size=10**9))
    with pytest.raises(MergesmithError, match="config text differs"):
        shards.plan_of(replace(task, fingerprint={**fp, "config": "0"}))


def test_a_stage_other_nodes_cannot_see_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".probe").write_text("token")
    task = shards.ShardTask("", "", 0, 1, {}, str(tmp_path), (), probe=(".probe", "other"))
    with pytest.raises(OutputError, match="storage every node sees"):
        shards.check_probe(task)
    shards.check_probe(replace(task, probe=(".probe", "token")))


def test_ray_is_named_with_its_install_command_when_missing(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'mergesmith\[ray\]'"):
        mergesmith.merge(config(tmp_path, models, "linear"), tmp_path / "out", executor="ray")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_ray_address_is_refused_at_once(models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=rf"nothing answers at the Ray cluster address {address} "):
            mergesmith.merge(
                config(tmp_path, models, "linear"), tmp_path / "out", executor="ray", ray_address=address
            )
    assert time.monotonic() - start < 15
    assert not (tmp_path / "out").exists()


def test_bad_worker_options_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = config(tmp_path, models, "linear")
    with pytest.raises(ConfigError, match="workers"):
        mergesmith.merge(cfg, tmp_path / "out", workers=0)
    with pytest.raises(ConfigError, match="unknown executor"):
        mergesmith.merge(cfg, tmp_path / "out", executor="dask")


def test_ray_tasks_write_the_same_bytes_as_one_process(models: dict[str, Path], tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    outputs = {}
    for method in ("ties", "dare_ties"):
        cfg = config(tmp_path, models, method)
        mergesmith.merge(cfg, tmp_path / f"{method}-1", max_shard_size=SHARD, workers=1)
        outputs[method] = files(tmp_path / f"{method}-1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for method in ("ties", "dare_ties"):
            cfg = config(tmp_path, models, method)
            mergesmith.merge(cfg, tmp_path / f"{method}-ray", max_shard_size=SHARD, executor="ray")
            assert files(tmp_path / f"{method}-ray") == outputs[method]
    finally:
        ray.shutdown()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert json.loads((tmp_path / "ties-ray" / ".mergesmith").read_text())["written_by"] == "mergesmith"
