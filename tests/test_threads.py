"""The thread policy: the cores the load leaves idle, or --threads N."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergesmith import _threads
from mergesmith.errors import ConfigError
from tests import tiny

REAL_QUOTA_CORES = _threads.quota_cores


@pytest.fixture(autouse=True)
def no_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine running the tests may have a CPU quota; these tests set the cores themselves."""
    monkeypatch.setattr(_threads, "quota_cores", lambda: None)


@pytest.mark.parametrize(
    ("load", "want"),
    [(0.0, 8), (0.4, 8), (1.6, 6), (2.4, 6), (7.0, 1), (11.3, 1)],
)
def test_the_default_is_the_cores_the_load_average_leaves_idle(
    load: float, want: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(_threads, "others_running", lambda: 0)
    assert _threads.default_threads() == want


@pytest.mark.parametrize(("load", "running", "want"), [(0.0, 1, 7), (0.1, 5, 3), (6.0, 1, 2), (0.0, 9, 1)])
def test_a_process_the_load_average_has_not_seen_yet_counts(
    load: float, running: int, want: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The busier of the two: the load average lags a process that started seconds ago."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(_threads, "others_running", lambda: running)
    assert _threads.default_threads() == want


def test_running_tasks_are_read_from_proc_stat_without_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    readings = iter([b"4", b"2", b"9", b"2", b"3"])
    real_open = builtins.open

    def fake_open(path: object, *args: object, **kwargs: object) -> object:
        if path == "/proc/stat":
            stat = tmp_path / "stat"
            stat.write_bytes(b"cpu  1 2 3\nprocs_running " + next(readings) + b"\nprocs_blocked 0\n")
            return real_open(stat, *args, **kwargs)  # type: ignore[call-overload]
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", fake_open)
    assert _threads.others_running(gap=0) == 2  # the median of 3, 1, 8, 1, 2
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert _threads.others_running(gap=0) is None


def test_without_a_load_average_or_affinity_every_core_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", unknown)
    monkeypatch.setattr(_threads, "others_running", lambda: None)
    assert _threads.default_threads() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert _threads.default_threads() == 1


def test_using_threads_sets_torch_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(_threads, "default_threads", lambda: 1)
    with _threads.using_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1
    with _threads.using_threads(3) as n:
        assert n == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match=f"threads must be a whole number of at least 1, not {bad!r}"):
            _threads.positive_threads(bad)  # type: ignore[arg-type]


def test_merge_computes_with_the_threads_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mergesmith
    from mergesmith import api

    state, cfg = tiny.llama_state(1)
    base = tiny.save(tmp_path / "base", state, cfg)
    ft = tiny.save(tmp_path / "ft", tiny.finetune(state, 2), cfg)
    seen: list[int] = []
    execute = api.execute

    def spy(*args: object, **kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        execute(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "execute", spy)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": 0.5}}],
    }
    torch.set_num_threads(2)
    try:
        mergesmith.merge(config, tmp_path / "out", threads=1)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ConfigError, match="threads must be a whole number of at least 1, not 0"):
            mergesmith.merge(config, tmp_path / "out2", threads=0)
        assert not (tmp_path / "out2").exists()
    finally:
        torch.set_num_threads(2)


def test_tune_runners_share_the_threads_and_get_the_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergesmith.tune import Objective, _RunnerArgs

    args = _RunnerArgs({}, [], "cpu", Objective({}), batch_size=7, threads=4, add_special_tokens=False)
    assert args.kwargs(2)["threads"] == 2 and args.kwargs(1)["threads"] == 4
    assert args.kwargs(3)["batch_size"] == 7 and args.kwargs(3)["add_special_tokens"] is False
    monkeypatch.setattr(_threads, "default_threads", lambda: 3)
    assert _RunnerArgs({}, [], "cpu", Objective({})).kwargs(2)["threads"] == 1


def test_on_a_few_of_the_machines_cpus_the_machine_wide_load_counts_by_their_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "getloadavg", lambda: (32.0, 0.0, 0.0))
    monkeypatch.setattr(_threads, "others_running", lambda: 8)
    assert _threads.default_threads() == 4  # 32 busy of 64: 4 of these 8
    monkeypatch.setattr(_threads, "others_running", lambda: 64)
    assert _threads.default_threads() == 1  # every CPU of the machine busy


@pytest.mark.parametrize(
    ("v2", "v1", "want"),
    [
        ("200000 100000\n", None, 2),
        ("150000 100000\n", None, 2),  # 1.5 CPUs: rounded up
        ("max 100000\n", None, None),
        (None, ("400000", "100000"), 4),
        (None, ("-1", "100000"), None),  # cgroup v1 without a quota
        (None, None, None),
        ("garbage", None, None),
    ],
)
def test_the_cgroup_cpu_quota_caps_the_cores(
    v2: str | None,
    v1: tuple[str, str] | None,
    want: int | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_quota = REAL_QUOTA_CORES  # not the fixture's stand-in
    monkeypatch.setattr(_threads, "CGROUP_V2", tmp_path / "cpu.max")
    monkeypatch.setattr(_threads, "CGROUP_V1", (tmp_path / "quota", tmp_path / "period"))
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "quota").write_text(v1[0])
        (tmp_path / "period").write_text(v1[1])
    assert read_quota() == want
    monkeypatch.setattr(_threads, "quota_cores", read_quota)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert _threads.cores() == (want if want is not None else 64)
