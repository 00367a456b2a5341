"""The command line is a table of commands; the settings of the whole process are the CLI's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import mergesmith
from mergesmith import _memory, defaults
from mergesmith.cli import _parser, main
from mergesmith.commands import COMMANDS
from tests.test_merge import config_for

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_every_command_of_the_parser_is_in_the_table() -> None:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    assert list(sub.choices or {}) == list(COMMANDS)


def test_help_of_every_command_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "from mergesmith.cli import main\n"
        "for argv in [['--help'], *([name, '--help'] for name in sys.argv[1:])]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    done = run_python(code, *COMMANDS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"


def test_help_shows_the_api_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["multi", "--help"])
    assert f"(default {defaults.size_text(defaults.SHARD_SIZE)})" in capsys.readouterr().out
    args = _parser().parse_args(["tune", "cfg.yml", "--tasks", "t.jsonl"])
    assert (args.batch_size, args.trials, args.sampler) == (
        defaults.TUNE_BATCH_SIZE,
        defaults.TRIALS,
        defaults.SAMPLER,
    )
    assert _parser().parse_args(["eval", "m", "--tasks", "t.jsonl"]).batch_size == defaults.BATCH_SIZE


def test_merge_in_a_program_leaves_the_process_settings_alone_and_the_cli_applies_them(
    zoo: dict[str, Path], tmp_path: Path, write_config: Callable[[str], Path]
) -> None:
    cfg = write_config(config_for("ties", zoo))
    code = (
        "import gc, json, os, sys\n"
        "import mergesmith\n"
        "from mergesmith import _memory\n"
        "from mergesmith.cli import main\n"
        "def state():\n"
        "    return {'tuned': _memory._tuned, 'thp': os.environ.get('THP_MEM_ALLOC_ENABLE'),\n"
        "            'frozen': gc.get_freeze_count() > 0}\n"
        "before = state()\n"
        "mergesmith.merge(sys.argv[1], sys.argv[2] + '/api', progress=False)\n"
        "after_api = state()\n"
        "code = main(['merge', sys.argv[1], sys.argv[2] + '/cli', '--no-progress', '--no-diagnose'])\n"
        "print(json.dumps([before, after_api, state(), code]))\n"
    )
    done = run_python(code, str(cfg), str(tmp_path))
    assert done.returncode == 0, done.stderr
    before, after_api, after_cli, code = json.loads(done.stdout.splitlines()[-1])
    assert before == after_api == {"tuned": False, "thp": None, "frozen": False}
    assert code == 0
    assert after_cli["thp"] == "1" and after_cli["frozen"]
    assert after_cli["tuned"] == (_memory._LIBC is not None)


def test_merge_and_diagnose_tune_the_allocator_only_when_asked(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergesmith.diagnose import diagnose

    calls: list[None] = []
    monkeypatch.setattr(_memory, "tune", lambda: calls.append(None))
    monkeypatch.setattr("gc.freeze", lambda: None)
    config = config_for("ties", zoo)
    mergesmith.merge(config, tmp_path / "plain", progress=False)
    diagnose(config)
    assert calls == []
    mergesmith.merge(config, tmp_path / "tuned", progress=False, tune_memory=True)
    assert calls
    calls.clear()
    assert main(["merge", str(tmp_path / "cfg.yml"), str(tmp_path / "cli")]) == 1  # no such config
    assert calls == []
    (tmp_path / "cfg.yml").write_text(config)
    assert main(["merge", str(tmp_path / "cfg.yml"), str(tmp_path / "cli"), "--no-progress"]) == 0
    assert calls
