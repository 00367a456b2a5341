"""mergesmith tune: the search space, trials equal to real merges, one plan per study, resuming, and
the Ray executor."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith
from mergesmith import _yaml
from mergesmith.errors import ConfigError
from mergesmith.evaluate import evaluate, load_task
from mergesmith.tune import TrialRunner, search_space, substitute, tune
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "zoo"

CONFIG = f"""
merge_method: ties
base_model: {ZOO / "models" / "base"}
models:
  - model: {ZOO / "models" / "add"}
    parameters:
      weight: {{search: [0.5, 1.5], default: 1.0}}
      density: 0.8
  - model: {ZOO / "models" / "rev"}
    parameters:
      weight: [{{search: [0.5, 1.5]}}, 1.0]
      density: {{search: [0.2, 1.0], log: true}}
parameters:
  normalize: false
dtype: float32
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[str]]:
    """The tune config and short task files (the first 40 prompts of add and rev)."""
    cfg = tmp_path / "tune.yml"
    cfg.write_text(CONFIG)
    tasks = []
    for name in ("add", "rev"):
        lines = (ZOO / "tasks" / f"{name}.jsonl").read_text().splitlines()[:40]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        tasks.append(str(tmp_path / f"{name}.jsonl"))
    return cfg, tasks


def test_search_space_names_ranges_and_substitution() -> None:
    doc = _yaml.load(CONFIG)
    space = search_space(doc)
    assert [(d.name, d.low, d.high, d.log, d.default) for d in space] == [
        ("add.weight", 0.5, 1.5, False, 1.0),
        ("rev.weight[0]", 0.5, 1.5, False, None),
        ("rev.density", 0.2, 1.0, True, None),
    ]
    assert space[2].grid(3) == pytest.approx([0.2, 0.2**0.5, 1.0])
    plain = substitute(doc, space, {"add.weight": 0.7, "rev.weight[0]": 0.6, "rev.density": 0.3})
    assert plain["models"][0]["parameters"] == {"weight": 0.7, "density": 0.8}
    assert plain["models"][1]["parameters"] == {"weight": [0.6, 1.0], "density": 0.3}
    mergesmith.load_config(plain)  # a plain, valid merge config


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("{search: [1.0, 0.5]}", r"search must be \[low, high\] with low < high"),
        ("{search: [0, 1], log: true}", r"a log search needs low > 0"),
        ("{search: [0, 1], step: 0.1}", r"unknown key\(s\) \['step'\] beside search"),
        ("{search: [0, 1], default: 2}", r"default must be a number in \[0, 1\]"),
    ],
)
def test_bad_search_nodes_are_named(node: str, message: str) -> None:
    doc = _yaml.load(f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {node}}}\n")
    with pytest.raises(ConfigError, match=rf"models\.0\.parameters\.weight: {message}"):
        search_space(doc)
    with pytest.raises(ConfigError, match="searches nothing"):
        search_space(_yaml.load("merge_method: linear\nmodels: [{model: a}]\n"))


def test_a_trial_equals_the_merge_written_to_disk_and_its_evaluation(
    setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    cfg, tasks = setup
    doc = _yaml.load(cfg.read_text())
    runner = TrialRunner(doc, tasks)
    # the first trial sorts each trimmed task vector's magnitudes; the second looks its thresholds up
    first = {"add.weight": 0.9, "rev.weight[0]": 1.1, "rev.density": 0.7}
    values = {"add.weight": 1.3, "rev.weight[0]": 0.7, "rev.density": 0.4}
    for i, trial in enumerate((first, values)):
        state = runner.merged_state(trial)
        mergesmith.merge(substitute(doc, search_space(doc), trial), tmp_path / f"merged{i}")
        written = tiny.load_state(tmp_path / f"merged{i}")
        assert state.keys() == written.keys()
        for name, tensor in written.items():
            assert torch.equal(state[name], tensor), name
    kept = [store for stores in runner.reuse.values() for store in stores if "sorted_magnitudes" in store]
    assert len(kept) == 2 * len(state)  # both models trim every tensor (density below 1)
    got = runner.run(values)
    want = {s.task: s.accuracy for s in evaluate(tmp_path / "merged1", [load_task(t) for t in tasks])}
    assert got == want
    assert runner.run(values) == got  # the cached parents are not changed by a trial


def test_trials_keep_nothing_between_them_where_memory_is_short(
    setup: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergesmith import _memory

    cfg, tasks = setup
    doc = _yaml.load(cfg.read_text())
    values = {"add.weight": 1.3, "rev.weight[0]": 0.7, "rev.density": 0.4}
    roomy = TrialRunner(doc, tasks)
    monkeypatch.setattr(_memory, "available", lambda: 1 << 20)  # 1 MiB free: less than twice the copies
    short = TrialRunner(doc, tasks)
    assert roomy.keeps and not short.keeps
    for _ in range(2):
        kept, anew = roomy.merged_state(values), short.merged_state(values)
        assert kept.keys() == anew.keys()
        assert all(torch.equal(kept[name], anew[name]) for name in kept)
    assert short.reuse == {} and any("sorted_magnitudes" in s for v in roomy.reuse.values() for s in v)


def test_trials_that_cannot_win_stop_scoring_early_and_the_best_is_unchanged(
    setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    import optuna

    cfg, tasks = setup
    common: dict[str, Any] = {
        "trials": 9,
        "sampler": "grid",
        "grid_steps": 2,
        "batch_size": 10,  # 4 batches per task, scored add, rev, add, rev, ...
        "write_best": False,
        "progress": None,
    }
    full = tune(cfg, tasks, tmp_path / "full", **common)
    early = tune(cfg, tasks, tmp_path / "early", stop_early=True, **common)
    assert full.stopped_early == 0 and early.stopped_early >= 2
    assert (early.best_values, early.best_objective) == (full.best_values, full.best_objective)

    def trials(name: str) -> dict[str, Any]:
        study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / name / 'study.db'}")
        return {json.dumps(t.params, sort_keys=True): t for t in study.trials}

    whole, cut = trials("full"), trials("early")
    assert whole.keys() == cut.keys() and len(whole) == 9
    for key, t in cut.items():
        if t.state == optuna.trial.TrialState.PRUNED:
            # the bound it stopped at is above what full scoring gives, and below the best
            assert whole[key].value <= t.intermediate_values[0] < full.best_objective
            assert t.user_attrs["examples_scored"] < 80 == whole[key].user_attrs["examples_scored"]
        else:
            assert t.value == whole[key].value


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_the_runner_maps_the_parents_files_rather_than_copying_them(setup: tuple[Path, list[str]]) -> None:
    cfg, tasks = setup
    runner = TrialRunner(_yaml.load(cfg.read_text()), tasks)
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 6:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            spans.append((low, high, fields[5]))
    for (model, name), tensor in runner.cache.items():
        where = [f for low, high, f in spans if low <= tensor.data_ptr() < high]
        assert where == [str((Path(model) / "model.safetensors").resolve())], name


def test_a_model_with_tied_embeddings_keeps_them_tied_and_scores_as_written(
    tmp_path: Path,
) -> None:
    base, cfg = tiny.llama_state(0, tie_word_embeddings=True)
    base.pop("lm_head.weight", None)  # stored once, under the embedding's name
    tiny.save(tmp_path / "base", base, cfg, tokenizer=True)
    tiny.save(tmp_path / "a", tiny.finetune(base, 1, scale=0.5), cfg, tokenizer=True)
    task = tmp_path / "t.jsonl"
    task.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in [("ab", "c"), ("ba", "ab")])
    )
    doc = _yaml.load(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'base'}\n    parameters: {{weight: {{search: [0, 1]}}}}\n"
        f"  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1.0}}\n"
    )
    runner = TrialRunner(doc, [str(task)])
    net = runner.net
    assert net.lm_head.weight.data_ptr() == net.model.embed_tokens.weight.data_ptr()
    values = {search_space(doc)[0].name: 0.3}
    scored = runner.trial(values)
    mergesmith.merge(substitute(doc, search_space(doc), values), tmp_path / "merged")
    want = {s.task: s.accuracy for s in evaluate(tmp_path / "merged", [load_task(task)])}
    assert scored.accuracy == want and scored.scored == 2
    for name, tensor in tiny.load_state(tmp_path / "merged").items():
        assert torch.equal(net.state_dict()[name], tensor.float()), name


def completed(db: Path) -> list[tuple[int, str]]:
    """The finished trials (scored to the end, or stopped early) and their values."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT t.number, group_concat(p.param_name || '=' || p.param_value, ',') FROM trials t "
            "JOIN trial_params p ON p.trial_id = t.trial_id WHERE t.state IN ('COMPLETE', 'PRUNED') "
            "GROUP BY t.trial_id ORDER BY t.number"
        ).fetchall()
    return [(int(n), str(p)) for n, p in rows]


def test_a_killed_study_resumes_without_repeating_finished_trials(
    setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    cfg, tasks = setup
    out = tmp_path / "study"
    argv = ["tune", str(cfg), "--tasks", *tasks, "--trials", "20", "--sampler", "grid", "--grid-steps", "2"]
    argv += ["--out", str(out), "--no-best"]
    child = subprocess.Popen(
        [sys.executable, "-m", "mergesmith.cli", *argv], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while True:
        assert child.poll() is None, "the study ended before it could be killed"
        assert time.monotonic() < deadline
        if (out / "study.db").exists():
            try:
                if len(completed(out / "study.db")) >= 3:
                    break
            except sqlite3.OperationalError:  # tables not created yet, or locked
                pass
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = completed(out / "study.db")
    assert 3 <= len(before) < 9

    result = tune(cfg, tasks, out, trials=20, sampler="grid", grid_steps=2, write_best=False, progress=None)
    after = completed(out / "study.db")
    assert after[: len(before)] == before  # the finished trials are kept as they were
    # the starting values and every point of the 2 x 2 x 2 grid, each exactly once
    assert len(after) == 9 and result.trials == 9
    assert len({p for _, p in after}) == 9
    assert result.best_objective == max(result.best_objective, result.default_objective or 0.0)


def test_ray_with_two_workers_finds_the_same_best_trial(
    setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    cfg, tasks = setup
    common: dict[str, Any] = {"trials": 10, "sampler": "grid", "grid_steps": 2, "seed": 3, "progress": None}
    cfg.write_text(CONFIG.replace("density: {search: [0.2, 1.0], log: true}", "density: 0.5").replace(
        "weight: [{search: [0.5, 1.5]}, 1.0]", "weight: 1.0"
    ).replace("density: 0.8", "density: {search: [0.3, 0.9]}"))  # fmt: skip
    local = tune(cfg, tasks, tmp_path / "local", write_best=False, **common)
    ray = tune(cfg, tasks, tmp_path / "ray", executor="ray", workers=2, **common)
    assert local.trials == ray.trials == 5  # the starting values and a 2 x 2 grid
    assert ray.best_values == local.best_values
    assert ray.best_objective == local.best_objective
    summary = json.loads((tmp_path / "ray" / "tune_summary.json").read_text())
    assert summary["best"]["objective"] == local.best_objective
    best = tmp_path / "ray" / "best"
    assert (best / "model.safetensors").is_file() and (best / "eval_report.md").is_file()
    assert (tmp_path / "ray" / "best.yml").is_file() and (tmp_path / "ray" / "search.png").is_file()


def test_two_local_worker_processes_find_the_same_best_trial(
    setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    cfg, tasks = setup
    common: dict[str, Any] = {
        "trials": 5,
        "sampler": "grid",
        "grid_steps": 2,
        "seed": 3,
        "progress": None,
        "write_best": False,
    }
    cfg.write_text(CONFIG.replace("density: {search: [0.2, 1.0], log: true}", "density: 0.5").replace(
        "weight: [{search: [0.5, 1.5]}, 1.0]", "weight: 1.0"
    ).replace("density: 0.8", "density: {search: [0.3, 0.9]}"))  # fmt: skip
    alone = tune(cfg, tasks, tmp_path / "alone", **common)
    pool = tune(cfg, tasks, tmp_path / "pool", workers=2, **common)
    assert alone.trials == pool.trials == 5
    assert (pool.best_values, pool.best_objective) == (alone.best_values, alone.best_objective)


def test_tune_says_each_step_and_gives_its_runner_the_batch_size_and_threads(
    setup: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, tasks = setup
    built: list[tuple[int, int, bool]] = []
    init = TrialRunner.__init__

    def spy(self: TrialRunner, *args: Any, **kwargs: Any) -> None:
        built.append((kwargs["batch_size"], kwargs["threads"], kwargs["add_special_tokens"]))
        init(self, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "__init__", spy)
    lines: list[str] = []
    out = tmp_path / "out"
    tune(
        cfg,
        tasks,
        out,
        trials=3,
        sampler="grid",
        grid_steps=2,
        batch_size=7,
        threads=1,
        progress=lines.append,
    )
    assert built == [(7, 1, True)]
    trials = [line for line in lines if line.startswith("trial ")]
    assert [t.split(" (#")[0] for t in trials] == ["trial 1/3", "trial 2/3", "trial 3/3"]
    assert f"model 1/3: {ZOO / 'models' / 'base'}" in lines and "  task 2/2: rev (40 examples)" in lines
    assert f"merging and evaluating the best values into {out / 'best'}" in lines
    report = json.loads((out / "best" / "eval_report.json").read_text())
    assert report["merged"][0]["method"] == "ties"


# -- the tune config's lines, and one plan per study ------------------------------------------------


def test_tune_config_errors_name_the_lines_of_the_tune_config(tmp_path: Path) -> None:
    cfg = tmp_path / "tune.yml"
    body = f"""# searched: add's weight

merge_method: ties
base_model: {ZOO / "models" / "base"}
models:
  - model: {ZOO / "models" / "add"}
    parameters:
      weight:
        search: [0.5, 1.5]
        default: 1.0
      density: 0.8

  - model: {ZOO / "models" / "rev"}
    parameters:
      weight: 1.0
      densty: 0.5
"""
    cfg.write_text(body)
    with pytest.raises(ConfigError) as info:
        tune(cfg, [str(ZOO / "tasks" / "add.jsonl")], tmp_path / "out", progress=None)
    assert info.value.problems == [
        "line 16: models[1].parameters.densty: unknown parameter for ties (did you mean 'density'?); its "
        "per-model parameters: weight, density; its merge-wide parameters (top-level parameters:): normalize, "
        "lambda, rescale, int8_mask, mode"
    ]
    assert str(info.value).startswith(f"{cfg}: line 16: ")
    cfg.write_text(body.replace("search: [0.5, 1.5]", "search: [1.5, 0.5]").replace("densty", "density"))
    with pytest.raises(ConfigError) as info:
        tune(cfg, [str(ZOO / "tasks" / "add.jsonl")], tmp_path / "out", progress=None)
    assert str(info.value) == (
        f"{cfg}: line 8: models.0.parameters.weight: search must be [low, high] with low < high, both "
        "finite numbers, found [1.5, 0.5]"
    )
    assert not (tmp_path / "out").exists()


def test_a_study_plans_once_and_each_trial_resolves_only_its_values(
    setup: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergesmith import sources, vocab

    cfg, tasks = setup
    opened: list[str] = []
    vocabs: list[str] = []
    init, read_vocab = sources.Checkpoint.__init__, vocab.read_vocab

    def opening(self: sources.Checkpoint, *args: Any, **kwargs: Any) -> None:
        opened.append(str(args[0] if args else kwargs["directory"]))
        init(self, *args, **kwargs)

    def reading(directory: Path) -> Any:
        vocabs.append(str(directory))
        return read_vocab(directory)

    monkeypatch.setattr(sources.Checkpoint, "__init__", opening)
    monkeypatch.setattr(vocab, "read_vocab", reading)
    during: list[tuple[int, int]] = []
    trial = TrialRunner.trial

    def counted(self: TrialRunner, *args: Any, **kwargs: Any) -> Any:
        before = (len(opened), len(vocabs))
        try:
            return trial(self, *args, **kwargs)
        finally:
            during.append((len(opened) - before[0], len(vocabs) - before[1]))

    monkeypatch.setattr(TrialRunner, "trial", counted)
    common: dict[str, Any] = {"sampler": "grid", "grid_steps": 2, "write_best": False, "progress": None}
    tune(cfg, tasks, tmp_path / "one", trials=1, **common)
    once = (len(opened), len(vocabs))
    opened.clear()
    vocabs.clear()
    tune(cfg, tasks, tmp_path / "three", trials=3, **common)
    assert during == [(0, 0)] * 4  # no trial opens a checkpoint or reads a tokenizer
    assert (len(opened), len(vocabs)) == once
    models = sorted(str(ZOO / "models" / m) for m in ("base", "add", "rev"))
    assert sorted(opened) == models and sorted(vocabs) == models  # once each, for the whole study


def test_a_trial_merges_what_a_plan_built_anew_for_its_values_merges(
    setup: tuple[Path, list[str]],
) -> None:
    from mergesmith.execute import merge_job, read_inputs, whole_model_thresholds
    from mergesmith.plan import build_plan

    cfg, tasks = setup
    doc = _yaml.load(cfg.read_text())
    space = search_space(doc)
    runner = TrialRunner(doc, tasks)
    trials = [
        {"add.weight": 0.9, "rev.weight[0]": 1.1, "rev.density": 0.7},
        {"add.weight": 1.3, "rev.weight[0]": 0.7, "rev.density": 0.4},
        {"add.weight": 0.5, "rev.weight[0]": 1.5, "rev.density": 1.0},
    ]
    for values in trials:
        config = mergesmith.load_config(substitute(doc, space, values))
        fresh = build_plan(config)
        assert runner.plan.with_parameters(config).jobs == fresh.jobs
        thresholds = whole_model_thresholds(fresh, torch.device("cpu"))
        want = {
            job.name: merge_job(fresh, job, read_inputs(fresh, job), torch.device("cpu"), thresholds)
            for job in fresh.jobs
        }
        got = runner.merged_state(values)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[name], want[name]) for name in want), values


def test_a_plan_takes_new_parameter_values_but_not_a_new_layout(zoo: dict[str, Path]) -> None:
    from mergesmith.plan import build_plan

    models = f"""merge_method: linear
models:
  - model: {zoo["a"]}
    parameters:
      weight: [{{filter: mlp, value: W_A}}, {{value: [1.0, W_B]}}]
  - model: {zoo["b"]}
    parameters:
      weight: W_C
parameters:
  normalize: NORMALIZE
"""
    slices = f"""merge_method: linear
slices:
  - sources:
      - model: {zoo["a"]}
        layer_range: [0, 3]
        parameters: {{weight: W_A}}
      - model: {zoo["b"]}
        layer_range: [0, 3]
    parameters: {{weight: [W_B, 1.0]}}
parameters:
  weight: W_C
  normalize: NORMALIZE
"""

    def config(text: str, a: float, b: float, c: float, normalize: str = "false") -> Any:
        values = {"W_A": str(a), "W_B": str(b), "W_C": str(c), "NORMALIZE": normalize}
        for key, value in values.items():
            text = text.replace(key, value)
        return mergesmith.load_config(text)

    for text in (models, slices):
        plan = build_plan(config(text, 0.5, 2.0, 0.3))
        for values in [(1.5, -1.0, 0.25), (0.0, 3.0, 1.0)]:
            again = plan.with_parameters(config(text, *values))
            assert again.jobs == build_plan(config(text, *values)).jobs
            assert again.with_parameters(config(text, 0.5, 2.0, 0.3)).jobs == plan.jobs
        normalized = build_plan(config(text, 1.0, 1.0, 1.0, "true"))
        summing_to_zero = config(text, 1.0, -1.0, -1.0, "true")  # the layer-0 weights cancel
        with pytest.raises(ConfigError) as fresh:
            build_plan(summing_to_zero)
        with pytest.raises(ConfigError) as reused:
            normalized.with_parameters(summing_to_zero)
        assert reused.value.problems == fresh.value.problems and fresh.value.problems
        with pytest.raises(ValueError, match="more than its parameter values"):
            plan.with_parameters(config(text, 0.5, 2.0, 0.3, "true"))
        with pytest.raises(ValueError, match="more than its parameter values"):
            plan.with_parameters(config(text.replace(str(zoo["b"]), str(zoo["c"])), 0.5, 2.0, 0.3))


def test_a_plan_of_modules_takes_new_parameter_values(tmp_path: Path) -> None:
    from mergesmith.plan import build_plan
    from tests.test_modules_multimodal import MODULES_YAML, tiny_mistral3

    text = MODULES_YAML.format(a=tiny_mistral3(tmp_path, 1), b=tiny_mistral3(tmp_path, 2))
    plan = build_plan(mergesmith.load_config(text))
    for old, new in [
        ("[0.8, 0.2]", "[0.3, 0.6]"),
        ("weight: 0.9", "weight: 0.4"),
        ("weight: 0.5", "weight: 0.7"),
    ]:
        changed = mergesmith.load_config(text.replace(old, new))
        assert plan.with_parameters(changed).jobs == build_plan(changed).jobs != plan.jobs


def test_resuming_fails_the_trials_a_dead_run_left_running_and_asks_their_values_again(
    tmp_path: Path,
) -> None:
    import optuna

    from mergesmith.tune.study import _recover

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    space = {"w": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.enqueue_trial({"w": 0.25})
    study.ask(space)  # never told: the run died
    resumed = optuna.load_study(study_name="s", storage=storage)
    assert _recover(resumed) == 1
    assert [t.state for t in resumed.trials] == [
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.WAITING,
    ]
    assert resumed.ask(space).params == {"w": 0.25}
    assert _recover(optuna.load_study(study_name="s", storage=storage)) == 1  # the one asked just now


def test_tune_in_a_program_sets_back_the_threads_and_leaves_the_allocator(
    setup: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergesmith import _memory

    cfg, tasks = setup
    calls: list[None] = []
    monkeypatch.setattr(_memory, "tune", lambda: calls.append(None))
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    tune(cfg, tasks, tmp_path / "out", trials=1, threads=other, write_best=False, progress=None)
    assert torch.get_num_threads() == before
    assert calls == []
    tune(cfg, tasks, tmp_path / "tuned", trials=1, write_best=False, progress=None, tune_memory=True)
    assert calls


def test_a_search_range_the_parameter_refuses_part_of_is_a_config_error_before_any_trial(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "tune.yml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {ZOO / 'models' / 'base'}\nmodels:\n"
        f"  - model: {ZOO / 'models' / 'add'}\n"
        "    parameters:\n      weight: 1.0\n      density: {search: [0.5, 3.0], default: 0.9}\n"
        f"  - model: {ZOO / 'models' / 'rev'}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    with pytest.raises(ConfigError) as info:
        tune(cfg, [str(ZOO / "tasks" / "add.jsonl")], tmp_path / "out", progress=None)
    assert info.value.problems == [
        "line 7: models[0].parameters.density: 3 is outside (0, 1] (the search range [0.5, 3] of add.density "
        "reaches 3; keep it within the values the parameter takes)"
    ]
    assert str(info.value).startswith(f"{cfg}: line 7: ")
    assert not (tmp_path / "out").exists()


def test_a_trial_whose_values_together_are_refused_names_the_values(tmp_path: Path) -> None:
    """Each range is valid at its ends, but two values together are not (linear weights summing
    to 0 with normalize): the error names the trial's values, not lines of a rendered config."""
    cfg = tmp_path / "tune.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n"
        f"  - model: {ZOO / 'models' / 'add'}\n    parameters: {{weight: {{search: [-1, 1], default: 0.5}}}}\n"
        f"  - model: {ZOO / 'models' / 'rev'}\n    parameters: {{weight: {{search: [-1, 1], default: 0.5}}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        tune(
            cfg, [str(ZOO / "tasks" / "add.jsonl")], tmp_path / "out", trials=9, sampler="grid", progress=None
        )
    (problem,) = info.value.problems
    assert problem.startswith("trial values add.weight=") and "rev.weight=" in problem
    assert "the weights sum to 0" in problem and "line " not in problem and "<config>" not in str(info.value)


def test_a_config_warning_is_printed_once_for_the_whole_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesmith.cli import main

    cfg = tmp_path / "tune.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {ZOO / 'models' / 'base'}\nmodels:\n"
        f"  - model: {ZOO / 'models' / 'add'}\n"
        "    parameters:\n      weight: {search: [0.2, 2.0], default: 1.0}\n      density: 0.5\n"
        f"  - model: {ZOO / 'models' / 'rev'}\n    parameters: {{weight: 1.0}}\n"
    )
    args = ["tune", str(cfg), "--tasks", str(ZOO / "tasks" / "add.jsonl"), "--trials", "2"]
    assert main([*args, "--out", str(tmp_path / "out"), "--no-best"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warned == [
        f"warning: {cfg}: line 7: models[0].parameters.density: task_arithmetic does not use density, so it "
        "has no effect for "
        + str(ZOO / "models" / "add")
        + " (mergekit accepts and ignores it too); remove it "
        "to silence this warning"
    ]
