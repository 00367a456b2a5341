"""Multi-stage merges (mergekit-multi configs): stages in order, checked first, skipped when finished."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith.api
from mergesmith import CompatibilityError, ConfigError, OutputError, _yaml
from mergesmith.cli import main
from mergesmith.config import ModelRef, load_config
from mergesmith.multi import load_multi, multi
from tests import tiny

TWO_STAGES = """\
name: ab
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {b}
    parameters: {{weight: 0.75}}
dtype: float32
---
merge_method: task_arithmetic
base_model: {base}
models:
  - model: ab
    parameters: {{weight: {lam}}}
dtype: float32
"""


def two_stages(zoo: dict[str, Path], lam: float = 2.0) -> str:
    return TWO_STAGES.format(a=zoo["a"], b=zoo["b"], base=zoo["base"], lam=lam)


def expected(zoo: dict[str, Path], lam: float, wa: float = 0.25, wb: float = 0.75) -> dict[str, torch.Tensor]:
    """The two merges worked out by hand: ab = (wa*a + wb*b) / (wa + wb), then base + lam*(ab - base)."""
    a, b, base = (tiny.load_state(zoo[n]) for n in ("a", "b", "base"))
    out = {}
    for name in base:
        ab = (wa * a[name].double() + wb * b[name].double()) / (wa + wb)
        out[name] = base[name].double() + lam * (ab.float().double() - base[name].double())
    return out


def close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=2e-6, msg=name)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The output directory of every stage merged from here on."""
    seen: list[Path] = []
    real = mergesmith.api.merge

    def counting(config: Any, out_dir: Any, **kwargs: Any) -> Any:
        seen.append(Path(out_dir))
        return real(config, out_dir, **kwargs)

    monkeypatch.setattr(mergesmith.api, "merge", counting)
    return seen


def test_two_stages_give_the_formula_applied_twice(
    zoo: dict[str, Path],
    write_config: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(two_stages(zoo))
    code = main(["multi", str(config), str(tmp_path / "stages"), "--out-path", str(tmp_path / "final")])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.splitlines() == [
        f"stage 1/2: ab -> {tmp_path / 'stages' / 'ab'}",
        f"stage 2/2: final merge -> {tmp_path / 'final'}",
    ]
    assert captured.out == f"merged 2 stage(s) of {config}: ab, final merge\n"
    a, b = tiny.load_state(zoo["a"]), tiny.load_state(zoo["b"])
    close(
        tiny.load_state(tmp_path / "stages" / "ab"),
        {n: 0.25 * a[n].double() + 0.75 * b[n].double() for n in a},
    )
    close(tiny.load_state(tmp_path / "final"), expected(zoo, 2.0))
    recorded = (tmp_path / "final" / "mergesmith_config.yml").read_text()
    assert f"model: {tmp_path / 'stages' / 'ab'}\n" in recorded and "name:" not in recorded


def test_a_list_of_configs_and_named_final_stage(
    zoo: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    """One document holding a list works as several documents; with every stage named, all are
    written under OUT_DIR and --out-path is not needed."""
    config = write_config(
        "- name: top  # listed before the stage it uses\n"
        "  merge_method: task_arithmetic\n"
        f"  base_model: {zoo['base']}\n"
        "  models: [{model: ab, parameters: {weight: 2.0}}]\n"
        "- name: ab\n"
        "  merge_method: linear\n"
        f"  models: [{{model: {zoo['a']}, parameters: {{weight: 0.25}}}}, {{model: {zoo['b']}, parameters: {{weight: 0.75}}}}]\n"
    )
    merged = multi(config, tmp_path / "out")
    assert [s.name for s in merged] == ["ab", "top"]  # ab runs first: top uses it
    close(tiny.load_state(tmp_path / "out" / "top"), expected(zoo, 2.0))


def test_lazy_skips_finished_stages_and_redoes_changed_ones(
    zoo: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path, calls: list[Path]
) -> None:
    out, final = tmp_path / "stages", tmp_path / "final"
    config = write_config(two_stages(zoo))
    multi(config, out, out_path=final)
    assert calls == [out / "ab", final]
    stamps = {p: (p / "model.safetensors").stat().st_mtime_ns for p in calls}

    calls.clear()
    lines: list[str] = []
    assert multi(config, out, out_path=final, say=lines.append) == []
    assert calls == []
    assert lines == [
        f"stage 1/2: ab (finished earlier in {out / 'ab'}; skipped)",
        f"stage 2/2: final merge (finished earlier in {final}; skipped)",
    ]
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in stamps} == stamps

    config.write_text(two_stages(zoo, lam=0.5))  # the final stage changed: it alone is redone
    assert [s.label for s in multi(config, out, out_path=final)] == ["final merge"]
    assert calls == [final]
    assert (out / "ab" / "model.safetensors").stat().st_mtime_ns == stamps[out / "ab"]
    close(tiny.load_state(final), expected(zoo, 0.5))

    calls.clear()  # the first stage changed: the final one, whose config is the same, uses it and is redone
    config.write_text(two_stages(zoo, lam=0.5).replace("weight: 0.75", "weight: 0.25"))
    multi(config, out, out_path=final)
    assert calls == [out / "ab", final]
    close(tiny.load_state(final), expected(zoo, 0.5, wa=0.5, wb=0.5))

    calls.clear()  # without lazy every stage is merged again
    multi(config, out, out_path=final, lazy=False)
    assert calls == [out / "ab", final]


def test_a_stage_not_recorded_as_this_config_is_redone(
    zoo: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path, calls: list[Path]
) -> None:
    out, final = tmp_path / "stages", tmp_path / "final"
    config = write_config(two_stages(zoo))
    multi(config, out, out_path=final)
    (out / "ab" / ".mergesmith").unlink()  # no marker: not known to be complete
    calls.clear()
    multi(config, out, out_path=final)
    assert calls == [out / "ab", final]


def test_every_kind_of_model_reference_can_name_a_stage(
    zoo: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    config = write_config(
        f"name: ab\nmerge_method: linear\nmodels: [{zoo['a']}, {zoo['b']}]\nparameters: {{weight: 1}}\n---\n"
        f"name: cd\nmerge_method: linear\nmodels: [{zoo['c']}, {zoo['d']}]\nparameters: {{weight: 1}}\n---\n"
        "name: sl\nmerge_method: slerp\nbase_model: {model: {path: ab}}\ntokenizer_source: cd\n"
        "slices:\n  - sources:\n      - {model: ab, layer_range: [0, 3]}\n"
        "      - {model: cd, layer_range: [0, 3]}\nparameters: {t: 0.5}\n---\n"
        f"name: ta\nmerge_method: task_arithmetic\nbase_model: {zoo['base']}\n"
        "models: [{model: sl+adapters/x, parameters: {weight: 1}}]\n"
    )
    plan = load_multi(config, tmp_path / "out")
    out = (tmp_path / "out").absolute()
    assert [(s.name, s.needs) for s in plan.stages] == [
        ("ab", ()),
        ("cd", ()),
        ("sl", ("ab", "cd")),
        ("ta", ("sl",)),
    ]
    sl, ta = plan.stages[2].config, plan.stages[3].config
    assert sl.base_model == ModelRef(str(out / "ab"))
    assert sl.tokenizer_source == str(out / "cd")
    assert sl.slices is not None
    assert [s.ref for s in sl.slices[0].sources] == [ModelRef(str(out / "ab")), ModelRef(str(out / "cd"))]
    assert ta.models[0].ref == ModelRef(str(out / "sl"), None, "adapters/x")


def test_cycles_are_refused_before_any_model_is_opened(
    write_config: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mergesmith.plan.open_models", lambda refs: pytest.fail("opened a model"))
    config = write_config(
        "name: x\nmerge_method: linear\nmodels: [y, z]\nparameters: {weight: 1}\n---\n"
        "name: y\nmerge_method: linear\nmodels: [x, z]\nparameters: {weight: 1}\n---\n"
        "name: z\nmerge_method: linear\nmodels: [z, x]\nparameters: {weight: 1}\n"
    )
    with pytest.raises(ConfigError) as exc:
        multi(config, tmp_path / "out")
    assert str(exc.value) == (
        f"{config}: the stages x -> y -> x use each other in a cycle (lines 1, 6); a stage can use only "
        "stages that do not use it: break the cycle"
    )
    assert not (tmp_path / "out").exists()


def test_a_stage_using_itself_is_a_cycle(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    config = write_config("name: x\nmerge_method: passthrough\nmodels: [x]\n")
    with pytest.raises(ConfigError, match=r"the stages x -> x use each other in a cycle \(lines 1\)"):
        load_multi(config, tmp_path / "out")


def test_unknown_and_duplicate_names_are_refused_together(
    zoo: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    config = write_config(
        f"name: ab\nmerge_method: linear\nmodels: [{zoo['a']}, {zoo['b']}]\nparameters: {{weight: 1}}\n---\n"
        f"name: ab\nmerge_method: linear\nmodels: [{zoo['a']}, {zoo['b']}]\nparameters: {{weight: 1}}\n---\n"
        f"merge_method: linear\nmodels: [{zoo['a']}]\nparameters: {{weight: 1}}\n---\n"
        f"merge_method: linear\nmodels: [{zoo['a']}]\nparameters: {{weight: 1}}\n---\n"
        "name: a/b\nmerge_method: linear\nmodels: [ab]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_multi(config, tmp_path / "out", out_path=tmp_path / "final")
    assert str(exc.value).splitlines() == [
        f"3 problems in the config in {config}:",
        "  - line 6: the name 'ab' is given to two stages, on line 1 and here; give each stage its own name",
        "  - line 15: a second stage without a name (the first is on line 11); only the final merge may go "
        "unnamed: name this one",
        "  - line 19: name 'a/b' cannot name a stage; use letters, digits, '.', '_' and '-' (it becomes the "
        "stage's directory name)",
    ]
    config.write_text(
        f"name: ab\nmerge_method: linear\nmodels: [{zoo['a']}, {zoo['b']}]\nparameters: {{weight: 1}}\n---\n"
        f"name: top\nmerge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n  - model: abx\n"
        "    parameters: {weight: 1}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_multi(config, tmp_path / "out")
    assert str(exc.value) == (
        f"{config}: stage top: models[0] (line 10): 'abx' is not a stage of this file (stages: ab), an "
        "existing directory, nor a Hub id (org/name) (did you mean the stage 'ab'?); fix the name"
    )


def test_every_stage_is_checked_before_the_first_is_merged(
    zoo: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path, calls: list[Path]
) -> None:
    """A schema error in a later stage, and a stage whose models do not fit together, stop the run
    before anything is written."""
    first = (
        f"name: ab\nmerge_method: linear\nmodels: [{zoo['a']}, {zoo['b']}]\nparameters: {{weight: 1}}\n---\n"
    )
    config = write_config(first + "name: top\nmerge_method: linear\nmodels: [ab]\nparameters: {wieght: 1}\n")
    with pytest.raises(ConfigError) as exc:
        multi(config, tmp_path / "out")
    alone = "\n" * 5 + "name: top\nmerge_method: linear\nmodels: [ab]\nparameters: {wieght: 1}\n"
    with pytest.raises(ConfigError) as standalone:  # the message the same config gets from merge
        load_config(alone)
    (problem,) = standalone.value.problems
    assert problem.startswith("line 9: parameters.wieght: ")
    assert str(exc.value) == f"{config}: stage top: {problem}"
    config.write_text(
        first
        + f"name: wide\nmerge_method: linear\nmodels: [{zoo['a']}, {zoo['wide']}]\nparameters: {{weight: 1}}\n"
    )
    with pytest.raises(CompatibilityError, match=r"\n  - stage wide: hidden_size: "):
        multi(config, tmp_path / "out")
    assert calls == [] and not (tmp_path / "out").exists()


def test_a_foreign_directory_in_the_way_is_refused_first(
    zoo: dict[str, Path], write_config: Callable[[str], Path], tmp_path: Path, calls: list[Path]
) -> None:
    config = write_config(two_stages(zoo))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputError,
        match="^"
        + re.escape(
            f"stage final merge: mergesmith multi: output directory {tmp_path / 'final'} was not written"
        ),
    ) as info:
        multi(config, tmp_path / "stages", out_path=tmp_path / "final")
    assert "--force" not in str(info.value)  # multi has no --force to suggest
    assert calls == [] and (tmp_path / "final" / "notes.txt").read_text() == "mine"


def test_cli_exit_codes(
    zoo: dict[str, Path],
    write_config: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(two_stages(zoo))
    assert main(["multi", str(config), str(tmp_path / "stages")]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {config}: line 10: this stage has no name, so it is the final merge, which is written to "
        "--out-path: give --out-path DIR (out_path=...), or name the stage to write it to OUT_DIR/<name>\n"
    )
    assert main(["multi", str(config), "--out-path", str(tmp_path / "final")]) == 1
    assert "error: multi: give OUT_DIR" in capsys.readouterr().err

    assert main(["multi", str(config), str(tmp_path / "stages"), "--out-path", str(tmp_path / "stages")]) == 1
    assert capsys.readouterr().err == (
        f"error: {config}: --out-path {tmp_path / 'stages'} is, holds or sits inside "
        f"{tmp_path / 'stages' / 'ab'}, the output of stage ab; the final merge needs a directory of its own: "
        "choose another --out-path\n"
    )
    args = ["multi", str(config), "-I", str(tmp_path / "stages"), "--out-path", str(tmp_path / "final")]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [
        f"  stage 1/2: ab: linear -> {tmp_path / 'stages' / 'ab'}",
        f"  stage 2/2: final merge: task_arithmetic (uses ab) -> {tmp_path / 'final'}",
    ]
    assert not (tmp_path / "stages").exists() and not (tmp_path / "final").exists()
    assert main(args) == 0 and main(args) == 0
    captured = capsys.readouterr()
    assert "merged 0 stage(s)" in captured.out and "Traceback" not in captured.err

    with pytest.raises(SystemExit) as exit_:
        main(["multi"])
    assert exit_.value.code == 2


def test_an_interrupted_run_says_which_stages_are_complete(
    zoo: dict[str, Path],
    write_config: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = mergesmith.api.merge

    def stop_at_final(config: Any, out_dir: Any, **kwargs: Any) -> Any:
        if Path(out_dir).name == "final":
            raise KeyboardInterrupt
        return real(config, out_dir, **kwargs)

    monkeypatch.setattr(mergesmith.api, "merge", stop_at_final)
    config = write_config(two_stages(zoo))
    args = ["multi", str(config), str(tmp_path / "stages"), "--out-path", str(tmp_path / "final")]
    assert main(args) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: the stages written to {tmp_path / 'stages' / 'ab'} are complete; the stage being "
        "merged was not written (its previous output, if any, was left as it was): run the same command "
        "again to go on, finished stages are skipped"
    )
    assert not (tmp_path / "final").exists()
    monkeypatch.setattr(mergesmith.api, "merge", real)
    assert main(args) == 0
    assert (
        capsys.readouterr()
        .err.splitlines()[0]
        .endswith("(finished earlier in " + str(tmp_path / "stages" / "ab") + "; skipped)")
    )
    close(tiny.load_state(tmp_path / "final"), expected(zoo, 2.0))


def test_load_all_reads_every_document_with_the_same_bounds() -> None:
    docs = _yaml.load_all("a: 1\n---\nb:\n  - 2\n---\n")
    assert docs == [{"a": 1}, {"b": [2]}, None]  # the empty document after the last ---
    assert docs[1].lines == {"b": 3} and docs[1]["b"].lines == [4]
    with pytest.raises(ConfigError, match=r"^f\.yml:4: key 'b' is given twice"):
        _yaml.load_all("a: 1\n---\nb: 2\nb: 3\n", where="f.yml")
    deep = "a: 1\n---\n" + "[" * (_yaml.MAX_DEPTH + 1) + "]" * (_yaml.MAX_DEPTH + 1) + "\n"
    with pytest.raises(ConfigError, match=f"nested more than {_yaml.MAX_DEPTH} levels deep"):
        _yaml.load_all(deep)
    with pytest.raises(ConfigError, match=r"^<config>:2: holds several YAML documents"):
        _yaml.load("a: 1\n---\nb: 2\n")  # a single config stays one document


def files_of(directory: Path) -> dict[str, bytes]:
    """The files of a merged model, its card and config copy aside (they name the stage's path)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.name not in ("README.md", "mergesmith_config.yml")
    }


def test_an_interrupted_stage_resumes_from_its_finished_shards_and_workers_change_no_byte(
    zoo: dict[str, Path],
    write_config: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mergesmith import _safetensors

    config = write_config(two_stages(zoo))

    def args(name: str, *extra: str) -> list[str]:
        out = tmp_path / name
        return [
            "multi",
            str(config),
            str(out / "stages"),
            "--out-path",
            str(out / "final"),
            "--max-shard-size",
            "6KB",
            *extra,
        ]

    assert main(args("reference")) == 0
    reference = files_of(tmp_path / "reference" / "final")
    shards = len([n for n in reference if n.endswith(".safetensors")])
    assert shards >= 6
    assert main(args("two-workers", "--workers", "2")) == 0
    assert files_of(tmp_path / "two-workers" / "final") == reference

    real = _safetensors.ShardWriter.__init__
    started: list[Path] = []

    def stop_at_the_fourth_final_shard(self: Any, path: Path, *rest: Any, **kw: Any) -> None:
        if Path(path).parent.name.startswith(".final"):
            started.append(Path(path))
            if len(started) == 4:  # three finished and recorded
                raise KeyboardInterrupt
        real(self, path, *rest, **kw)

    monkeypatch.setattr(_safetensors.ShardWriter, "__init__", stop_at_the_fourth_final_shard)
    capsys.readouterr()
    assert main(args("run")) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    stage = started[0].parent
    assert last == (
        f"interrupted: the stages written to {tmp_path / 'run' / 'stages' / 'ab'} are complete; the stage being "
        f"merged was not written (its previous output, if any, was left as it was), 3 of its {shards} shards "
        f"were kept in {stage}: run the same command again with --resume to go on, finished stages are skipped"
    )
    monkeypatch.setattr(_safetensors.ShardWriter, "__init__", real)
    # the interrupted command's process has exited: its staging directory names a process gone
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stage = stage.rename(stage.with_name(stage.name.rsplit("-", 1)[0] + f"-{int(gone.stdout)}"))
    assert main(args("run", "--resume")) == 0
    err = capsys.readouterr().err
    assert "(finished earlier in " + str(tmp_path / "run" / "stages" / "ab") + "; skipped)" in err
    assert f"resume: kept 3 of {shards} shards" in err
    assert files_of(tmp_path / "run" / "final") == reference
    assert not stage.exists()
