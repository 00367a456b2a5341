"""The merge report: normalization, ownership, warnings and the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergesmith.errors import ConfigError
from mergesmith.evaluate import TaskScore
from mergesmith.report import Entry, build_report, write_report


def scores(**accuracy: float) -> dict[str, TaskScore]:
    return {t: TaskScore(t, 100, a, 1.0 - a, 2.0) for t, a in accuracy.items()}


BASE = Entry("base", "b", scores(add=0.10, rev=0.05))
ADD = Entry("add", "a", scores(add=0.90, rev=0.04))
REV = Entry("rev", "r", scores(add=0.08, rev=0.80))


def test_normalized_accuracy_is_merged_over_the_owning_parent() -> None:
    good = Entry("good", "g", scores(add=0.81, rev=0.60))
    report = build_report(["add", "rev"], [ADD, REV], [good], base=BASE)
    assert report.owners == {"add": "add", "rev": "rev"}
    assert report.normalized["good"] == pytest.approx({"add": 0.81 / 0.90, "rev": 0.60 / 0.80})
    assert report.average["good"] == pytest.approx((0.9 + 0.75) / 2)
    assert report.warnings == []
    assert report.best() == "good"


def test_collapse_and_below_base_warnings_name_the_model_and_task() -> None:
    bad = Entry("bad", "x", scores(add=0.85, rev=0.02))
    report = build_report(["add", "rev"], [ADD, REV], [bad], base=BASE)
    kinds = sorted((w.kind, w.task) for w in report.warnings)
    assert kinds == [("below_base", "rev"), ("collapse", "rev")]
    collapse = next(w for w in report.warnings if w.kind == "collapse")
    assert "bad: rev collapsed to 2.0% from 80.0% in rev" in collapse.message
    assert "catastrophic interference" in collapse.message


def test_a_merged_model_is_judged_on_the_tasks_of_its_own_parents() -> None:
    # evaluated only on add: rev is not its task, and ownership comes from its parents only
    lora_add = Entry("add LoRA", "la", scores(add=0.70, rev=0.04))
    lora_rev = Entry("rev LoRA", "lr", scores(add=0.08, rev=0.50))
    merged = Entry("loras", "m", scores(add=0.35, rev=0.40), ("add LoRA", "rev LoRA"))
    only_add = Entry("one", "o", scores(add=0.45), ("add", "rev"))
    report = build_report(
        ["add", "rev"],
        [ADD, REV, lora_add, lora_rev],
        [merged, only_add],
        owners={"add": "add", "rev": "rev"},
    )
    assert report.normalized["loras"] == pytest.approx({"add": 0.5, "rev": 0.8})
    assert report.normalized["one"] == pytest.approx({"add": 0.5})


def test_a_collapse_is_judged_on_the_normalized_accuracy_as_printed() -> None:
    # 0.4998 prints as 50.0%: no warning that it is below 50.0%; 0.494 is below as printed
    near = Entry("near", "n", scores(add=0.9 * 0.4998, rev=0.80))
    under = Entry("under", "u", scores(add=0.9 * 0.494, rev=0.80))
    report = build_report(["add", "rev"], [ADD, REV], [near, under])
    assert [(w.model, w.kind) for w in report.warnings] == [("under", "collapse")]
    assert "(49.4% normalized, below 50.0%)" in report.warnings[0].message
    md = report.to_markdown()
    assert "| near (merged) | 45.0% (50.0%) |" in md and "| under (merged) | 44.5% (49.4%) |" in md


@pytest.mark.parametrize(
    ("method", "advice", "never"),
    [
        (None, "lower the other models' weights, or trim with ties or dare_ties", None),
        ("task_arithmetic", "lower the other models' weights, or trim with ties or dare_ties", None),
        ("ties", "or keep less of each with a lower density than this ties merge used", "trim with"),
        (
            "dare_ties",
            "or keep less of each with a lower density than this dare_ties merge used",
            "trim with",
        ),
        ("linear", "or trim with ties or dare_ties", None),
    ],
)
def test_collapse_advice_never_suggests_the_method_already_used(
    method: str | None, advice: str, never: str | None
) -> None:
    bad = Entry("bad", "x", scores(add=0.85, rev=0.02), method=method)
    report = build_report(["add", "rev"], [ADD, REV], [bad])
    (warning,) = report.warnings
    assert warning.message.endswith(advice)
    if never is not None:
        assert never not in warning.message
    assert report.to_dict()["merged"][0]["method"] == method  # type: ignore[index]


def test_the_best_merge_is_one_judged_on_at_least_two_tasks() -> None:
    # "solo" scores best on average, but on one task alone
    solo = Entry("solo", "s", scores(add=0.90), ("add",))
    pair = Entry("pair", "p", scores(add=0.72, rev=0.64), ("add", "rev"))
    report = build_report(["add", "rev"], [ADD, REV], [solo, pair])
    assert report.average["solo"] > report.average["pair"]
    assert report.best() == "pair"
    assert "Best merge: pair (80.0% normalized accuracy on average over 2 tasks)." in report.to_markdown()
    assert build_report(["add", "rev"], [ADD, REV], [solo]).best() is None


def test_merge_eval_checks_the_tasks_before_merging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesmith.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    out = tmp_path / "merged"
    argv = ["merge", str(zoo_config(tmp_path, 1.0)), str(out), "--no-progress", "--no-diagnose"]
    assert main([*argv, "--eval", str(ZOO / "tasks" / "add.jsonl"), str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"error: {bad}:2: expected an object with string prompt and answer" in captured.err
    assert "Traceback" not in captured.err and "merged" not in captured.out
    assert not out.exists()


def test_unknown_parents_and_owners_are_refused() -> None:
    with pytest.raises(ConfigError, match="not a parent"):
        build_report(["add"], [ADD], [], owners={"add": "nobody"})
    with pytest.raises(ConfigError, match="unknown parents"):
        build_report(["add"], [ADD], [Entry("m", "m", scores(add=0.5), ("ghost",))])


def test_report_files(tmp_path: Path) -> None:
    merged = Entry("m", "m", scores(add=0.45, rev=0.40))
    report = build_report(["add", "rev"], [ADD, REV], [merged], base=BASE)
    written = write_report(report, tmp_path)
    assert sorted(p.name for p in written) == ["eval_report.json", "eval_report.md", "eval_report.png"]
    data = json.loads((tmp_path / "eval_report.json").read_text())
    assert data["normalized_accuracy"]["m"] == pytest.approx({"add": 0.5, "rev": 0.5})
    assert [w["kind"] for w in data["warnings"]] == []
    md = (tmp_path / "eval_report.md").read_text()
    assert "| m (merged) | 45.0% (50.0%) | 40.0% (50.0%) | 50.0% |" in md
    assert "| add (parent) | **90.0%** | 4.0% |" in md
    assert (tmp_path / "eval_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_report_write_keeps_the_earlier_report_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from mergesmith import _output
    from mergesmith.errors import OutputError

    report = build_report(
        ["add", "rev"], [ADD, REV], [Entry("m", "m", scores(add=0.45, rev=0.40))], base=BASE
    )
    write_report(report, tmp_path)
    before = (tmp_path / "eval_report.md").read_text()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_output.os, "fsync", full)
    worse = build_report(["add", "rev"], [ADD, REV], [Entry("m", "m", scores(add=0.1, rev=0.1))], base=BASE)
    with pytest.raises(
        OutputError, match=r"eval_report.md: cannot write: No space left on device .*disk is full"
    ):
        write_report(worse, tmp_path)
    assert (tmp_path / "eval_report.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval_report.json",
        "eval_report.md",
        "eval_report.png",
    ]
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"file/sub: cannot create the report directory: Not a directory"):
        write_report(worse, tmp_path / "file" / "sub")


ZOO = Path(__file__).resolve().parent.parent / "zoo"


def zoo_config(tmp_path: Path, weight: float) -> Path:
    text = f"""
merge_method: task_arithmetic
base_model: {ZOO / "models" / "base"}
models:
  - model: {ZOO / "models" / "add"}
    parameters: {{weight: {weight}}}
  - model: {ZOO / "models" / "rev"}
    parameters: {{weight: {weight}}}
dtype: float32
"""
    path = tmp_path / f"ta-{weight}.yml"
    path.write_text(text)
    return path


def test_merge_eval_warns_when_a_merge_destroys_a_skill_and_not_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesmith.cli import main

    tasks = [str(ZOO / "tasks" / "add.jsonl"), str(ZOO / "tasks" / "rev.jsonl")]
    reports = {}
    for weight in (1.0, 6.0):
        out = tmp_path / f"merged-{weight}"
        assert (
            main(["merge", str(zoo_config(tmp_path, weight)), str(out), "--no-progress", "--eval", *tasks])
            == 0
        )
        reports[weight] = json.loads((out / "eval_report.json").read_text())
        assert (out / "eval_report.md").is_file() and (out / "eval_report.png").is_file()
    good, bad = reports[1.0], reports[6.0]
    assert [p["name"] for p in good["parents"]] == ["add", "rev"] and good["base"]["name"] == "base"
    assert good["warnings"] == []
    assert good["average_normalized_accuracy"]["merged"] >= 0.7
    collapsed = {w["task"] for w in bad["warnings"] if w["kind"] == "collapse"}
    assert collapsed, bad["warnings"]
    for task in collapsed:
        assert bad["normalized_accuracy"]["merged"][task] < 0.5
    printed = capsys.readouterr().out
    assert "catastrophic interference" in printed and "eval_report.md" in printed


def test_compare_cli_puts_the_models_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mergesmith.cli import main

    merged = tmp_path / "merged"
    assert main(["merge", str(zoo_config(tmp_path, 1.0)), str(merged), "--no-progress"]) == 0
    capsys.readouterr()
    argv = [
        "compare",
        "--tasks",
        str(ZOO / "tasks" / "add.jsonl"),
        str(ZOO / "tasks" / "rev.jsonl"),
        "--base",
        str(ZOO / "models" / "base"),
        "--parents",
        str(ZOO / "models" / "add"),
        f"reverser={ZOO / 'models' / 'rev'}",
        "--merged",
        f"ta={merged}",
        "--out",
        str(tmp_path / "cmp"),
    ]
    assert main(argv) == 0
    data = json.loads((tmp_path / "cmp" / "compare_report.json").read_text())
    assert data["owners"] == {"add": "add", "rev": "reverser"}
    acc = {
        e["name"]: {t: s["accuracy"] for t, s in e["scores"].items()}
        for e in [*data["parents"], *data["merged"]]
    }
    assert data["normalized_accuracy"]["ta"] == pytest.approx(
        {"add": acc["ta"]["add"] / acc["add"]["add"], "rev": acc["ta"]["rev"] / acc["reverser"]["rev"]}
    )
    assert data["merged"][0]["method"] == "task_arithmetic"  # read from the merged model's config
    captured = capsys.readouterr()
    assert "| ta (merged) |" in captured.out
    progress = captured.err.splitlines()
    assert progress[0] == f"model 1/4: {ZOO / 'models' / 'base'}" and progress[-3] == f"model 4/4: {merged}"
    assert progress[-2:] == ["  task 1/2: add (200 examples)", "  task 2/2: rev (200 examples)"]


@pytest.mark.parametrize("inside", ["merged", "merged/reports", "adapter"])
def test_compare_never_writes_into_an_input_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inside: str
) -> None:
    from mergesmith.cli import main

    for name in ("merged", "adapter"):
        (tmp_path / name).mkdir()
    argv = ["compare", "--tasks", str(ZOO / "tasks" / "add.jsonl"), "--parents", str(ZOO / "models" / "add")]
    argv += ["--merged", f"m={tmp_path / 'merged'}", f"la={ZOO / 'models' / 'base'}+{tmp_path / 'adapter'}"]
    assert main([*argv, "--out", str(tmp_path / inside)]) == 1
    err = capsys.readouterr().err
    assert f"is inside input model {tmp_path / inside.split('/')[0]}" in err and "Traceback" not in err
    assert not (tmp_path / "merged" / "reports").exists()
    assert list((tmp_path / "merged").iterdir()) == []
