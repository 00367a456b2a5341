"""Configs written to break the reader or the planner: each refused quickly, with a ConfigError (or
CompatibilityError) that names the file and the fix, and from the CLI with exit 1 and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest

import mergesmith
from mergesmith import CompatibilityError, ConfigError, load_config
from mergesmith.cli import main
from mergesmith.plan import build_plan


def refused(source: str | Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    return str(info.value)


def validate(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``mergesmith validate path``: it must exit 1 with one error message, no traceback."""
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    return err


def bounded(run: object, *, seconds: float = 5.0, megabytes: int = 500) -> str:
    """The ConfigError message of ``run()``, checking it came within ``seconds`` and allocated
    under ``megabytes`` at its peak."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as info:
            run()  # type: ignore[operator]
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert peak < megabytes << 20, f"peak {peak >> 20} MB"
    return str(info.value)


BASE = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"


# -- reading the YAML ---------------------------------------------------------------------------


def test_a_50_mb_config_is_refused_by_its_size_without_being_parsed(tmp_path: Path) -> None:
    path = tmp_path / "huge.yml"
    with open(path, "w") as f:
        f.write("merge_method: linear\nmodels:\n")
        chunk = "- 12\n" * 100_000
        for _ in range(100):  # 10 million list items, 50 MB
            f.write(chunk)
    size = path.stat().st_size
    assert size > 50_000_000
    message = bounded(lambda: load_config(path))
    assert message.startswith(f"{path}: {size:,} bytes, more than the 1,048,576 (1 MiB)")
    assert "check that this is the right file" in message


def test_a_billion_laughs_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"  # 9**9 'lol' once expanded
    path = tmp_path / "bomb.yml"
    path.write_text(text)
    message = bounded(lambda: load_config(path))
    assert message.startswith(f"{path}:6: it expands to more than 100,000 values (at '&f [*e, *e")
    assert "write the values out plainly" in message


def test_a_config_of_half_a_million_values_is_refused_before_it_is_built(tmp_path: Path) -> None:
    path = tmp_path / "wide.yml"
    path.write_text(BASE + "extra: [" + "1," * 500_000 + "]\n")
    assert path.stat().st_size < 1 << 20
    message = bounded(lambda: load_config(path), megabytes=100)
    assert message == (
        f"{path}:5: the config holds more than 100,000 values; no config needs that: check that this is "
        "the right file"
    )


def test_a_long_string_repeated_by_aliases_is_refused_by_its_characters() -> None:
    text = f"a: &a {'x' * 60_000}\nb: [{', '.join(['*a'] * 30)}]\n"
    message = bounded(lambda: load_config(text))
    assert message.startswith("<config>:2: it expands to more than 1,048,576 characters (at '[*a, *a")


def test_an_alias_inside_its_own_value_is_refused() -> None:
    message = refused("merge_method: linear\nmodels: &m [{model: a}, *m]\n")
    assert message.startswith("<config>:2: an alias refers to the value that contains it (at '&m [{model")


def test_a_config_that_is_not_utf8_is_refused_naming_the_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"merge_method: linear\nmodels:\n  - model: caf\xe9\n")
    message = refused(path)
    assert message == f"{path}: not UTF-8 text at byte 43 (b'\\xe9\\n'); save the config as UTF-8"
    assert validate(path, capsys) == f"error: {message}\n"


def test_a_key_given_twice_is_refused_with_both_lines() -> None:
    message = refused("merge_method: linear\nmodels:\n  - model: a\nmerge_method: ties\n")
    assert message == (
        "<config>:4: key 'merge_method' is given twice in one mapping, on line 1 and line 4; keep one of them"
    )


def test_a_parameter_given_twice_is_refused_with_both_lines() -> None:
    message = refused(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n"
        "      normalize: true\n      weight: 2\n"
    )
    assert message == (
        "<config>:7: key 'weight' is given twice in one mapping, on line 5 and line 7; keep one of them"
    )


def test_a_merge_key_may_be_overridden() -> None:
    config = load_config(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: &p {weight: 1}\n"
        "  - model: b\n    parameters:\n      <<: *p\n      weight: 2\n"
    )
    assert [m.parameters for m in config.models] == [{"weight": 1}, {"weight": 2}]


def test_a_key_with_terminal_escapes_is_shown_escaped() -> None:
    message = refused('merge_method: linear\n"\\e[31mred": 1\n"\\e[31mred": 2\n')
    assert "key '\\x1b[31mred' is given twice" in message
    assert "\x1b" not in message


def test_nesting_deeper_than_64_levels_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = refused(BASE + "extra: " + "[" * 65 + "]" * 65 + "\n")
    assert message.startswith("<config>:5: nested more than 64 levels deep (at '[[]]]]")
    assert message.endswith("a config nests a handful of levels: flatten it")
    path = tmp_path / "deep.yml"
    path.write_text("a: " + "[" * 300_000 + "]" * 300_000 + "\n")  # deeper than any stack
    assert "nested more than 64 levels deep" in bounded(lambda: load_config(path))
    assert "nested more than 64 levels deep" in validate(path, capsys)


def test_aliases_that_nest_deeper_than_64_levels_are_refused() -> None:
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 80))
    message = refused(text)
    assert "aliases nest the values more than 64 levels deep" in message


def test_an_integer_of_more_than_100_digits_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    message = refused(BASE.replace("weight: 1", "weight: " + "7" * 5000))
    assert message == (
        "<config>:4: the integer '7777777777777777777777777777777777777777...' has more than 100 digits; "
        "write a number of ordinary size"
    )
    assert refused(BASE.replace("weight: 1", "weight: " + "1" * 101)).startswith("<config>:4: the integer")
    assert load_config(BASE.replace("weight: 1", "weight: " + "1" * 100)).models[0].parameters["weight"] > 0


def test_a_date_that_is_not_one_is_refused() -> None:
    message = refused(BASE + "name: 2024-13-45\n")
    assert message == "<config>:5: '2024-13-45' looks like a date but is not one; quote it to make it text"


def test_config_text_over_1_mib_is_refused() -> None:
    text = BASE + "#" + "x" * (1 << 20) + "\n"
    message = bounded(lambda: load_config(text))
    assert message.startswith(f"<config>: {len(text):,} characters, more than the 1,048,576 (1 MiB)")


def test_a_config_name_too_long_for_the_file_system_is_not_found() -> None:
    message = refused("x" * 5000 + ".yml")
    assert message.startswith("config file 'xxxx") and message.endswith("...' does not exist")


# -- layer ranges and layer counts ---------------------------------------------------------------


def with_layer_count(source: Path, target: Path, count: int) -> Path:
    """A copy of the model at ``source`` whose config.json declares ``count`` layers."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = count
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_a_billion_layer_range_is_refused_before_it_is_enumerated(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stack.yml"
    path.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {zoo['a']}\n"
        "        layer_range: [0, 1000000000]\n"
    )
    message = bounded(lambda: mergesmith.validate(path), megabytes=100)
    assert message == (
        f"{path}: slices[0].sources[0]: layer_range [0, 1000000000] of {zoo['a']} goes past its layers: "
        "its tensors hold 3 (0 to 2); use a layer_range within [0, 3]"
    )
    assert validate(path, capsys) == f"error: {message}\n"


def test_a_huge_layer_range_of_a_model_that_declares_it_is_refused(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    big = with_layer_count(zoo["a"], tmp_path / "big", 10**9)
    config = load_config(
        f"merge_method: linear\nslices:\n  - sources:\n      - model: {big}\n        layer_range: [0, 1000000000]\n"
        f"      - model: {big}\n        layer_range: [0, 1000000000]\nparameters: {{weight: 1}}\n"
    )
    start = time.perf_counter()
    with pytest.raises(CompatibilityError) as info:
        build_plan(config)
    assert time.perf_counter() - start < 5
    text = str(info.value)
    assert (
        f"{big / 'config.json'}: num_hidden_layers is 1000000000, but the tensors of {big} hold 3 layers"
        in text
    )
    assert "layer_range [0, 1000000000] of " in text and "its tensors hold 3 (0 to 2)" in text


def test_a_layer_count_in_config_json_that_the_tensors_lack_is_refused_for_slices(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    wrong = with_layer_count(zoo["a"], tmp_path / "wrong", 32)
    config = load_config(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {wrong}\n        layer_range: [0, 2]\n"
    )
    with pytest.raises(CompatibilityError) as info:
        build_plan(config)
    assert str(info.value) == (
        f"{wrong / 'config.json'}: num_hidden_layers is 32, but the tensors of {wrong} hold 3 layers; "
        "slices are placed by layer, so they would be wrong: set num_hidden_layers to 3 in config.json, "
        "or use the checkpoint that goes with this config.json"
    )


def test_a_layer_count_in_config_json_that_the_tensors_lack_is_refused_for_gradients(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    a = with_layer_count(zoo["a"], tmp_path / "a", 32)
    b = with_layer_count(zoo["c"], tmp_path / "b", 32)
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  weight: WEIGHT\n"
    with pytest.raises(CompatibilityError) as info:
        build_plan(load_config(text.replace("WEIGHT", "[1, 2]")))
    assert info.value.problems == [
        f"{m / 'config.json'}: num_hidden_layers is 32, but the tensors of {m} hold 3 layers; gradients are "
        "placed by layer, so they would be wrong: set num_hidden_layers to 3 in config.json, or use the "
        "checkpoint that goes with this config.json"
        for m in (a, b)
    ]
    plain = build_plan(load_config(text.replace("WEIGHT", "1")))  # no gradient: layer positions do not matter
    assert {j.t for j in plain.jobs if j.layer is not None} == {0.0, 0.5, 1.0}


# -- tune configs and options --------------------------------------------------------------------

TUNE = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: SEARCH}\n  - model: b\n"


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (
            "{search: [0, .inf]}",
            "search must be [low, high] with low < high, both finite numbers, found [0, inf]",
        ),
        (
            "{search: [-.inf, 1]}",
            "search must be [low, high] with low < high, both finite numbers, found [-inf, 1]",
        ),
        (
            "{search: [-1.0e+308, 1.0e+308]}",
            "search must be [low, high] with low < high, both finite numbers, found [-1e+308, 1e+308]",
        ),
        ("{search: [0, 1], default: true}", "default must be a number in [0, 1], found True"),
        ("{search: [0.1, 1], log: [1]}", "log must be true or false, found [1]"),
    ],
)
def test_a_search_range_that_is_not_finite_is_refused(search: str, expected: str) -> None:
    from mergesmith import _yaml
    from mergesmith.tune import search_space

    with pytest.raises(ConfigError) as info:
        search_space(_yaml.load(TUNE.replace("SEARCH", search)))
    assert str(info.value) == f"tune config: models.0.parameters.weight: {expected}"


def tune_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    path = tmp_path / "tune.yml"
    path.write_text(
        TUNE.replace("SEARCH", "{search: [0, 1]}") + "    parameters: {weight: {search: [0, 2]}}\n"
    )
    args = ["tune", str(path), "--tasks", str(tmp_path / "math.jsonl"), str(tmp_path / "code.jsonl")]
    args += ["--out", str(tmp_path / "out"), *options]
    return validate_run(args, capsys)


def validate_run(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--penalty", "nan"], "--penalty must be a finite number, found nan"),
        (["--penalty", "inf"], "--penalty must be a finite number, found inf"),
        (
            ["--task-weight", "math=abc"],
            "--task-weight 'math=abc': expected a number, e.g. --task-weight TASK=2",
        ),
        (
            ["--task-weight", "math=true"],
            "--task-weight 'math=True': expected a number, e.g. --task-weight TASK=2",
        ),
        (["--task-weight", "math=.inf"], "--task-weight 'math=.inf': expected a finite number"),
        (
            ["--task-weight", "math=[1, 2]"],
            "--task-weight 'math=[1, 2]': expected one value (a number, true/false or text)",
        ),
        (
            ["--task-weight", "math"],
            "--task-weight 'math': write it as KEY=VALUE, e.g. --task-weight density=0.5",
        ),
        (
            ["--task-weight", "math=" + "9" * 2000],
            f"--task-weight 'math={'9' * 75}...': the value is 2,000 characters; give a short value",
        ),
        (["--task-weight", "maths=2"], "--task-weight 'maths': no such task; the tasks are 'math', 'code'"),
        (["--seed", "-1"], "--seed must be a whole number in [0, 2**32), found -1"),
        (
            ["--workers", "100000"],
            f"--workers 100000: far more local worker processes than this machine's {os.cpu_count() or 1} "
            f"CPUs, each holding a model; use at most --workers {max(8, 4 * (os.cpu_count() or 1))} (about "
            "one a CPU is best), or --executor ray to spread them over machines",
        ),
        (
            ["--sampler", "grid", "--grid-steps", "1000"],
            "--grid-steps 1000 over 2 searched values makes 1000**2 grid points, more than 100,000; use fewer steps or the tpe sampler",
        ),
    ],
)
def test_tune_options_out_of_range_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], expected: str
) -> None:
    assert tune_cli(tmp_path, capsys, *options) == expected


def test_a_deeply_nested_option_value_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = tune_cli(tmp_path, capsys, "--task-weight", "math=" + "[" * 400 + "]" * 400)
    assert message.startswith("--task-weight 'math':1: nested more than 64 levels deep")


# -- any malformed config: a ConfigError, never a crash -----------------------------------------


def test_an_empty_list_as_a_parameter_is_a_config_error() -> None:
    message = refused(BASE.replace("weight: 1", "weight: []"))
    assert message == "<config>: line 4: models[0].parameters.weight: an empty list gives no value"


def test_a_model_name_longer_than_a_path_can_be_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "long.yml"
    path.write_text(BASE.replace("model: a", "model: " + "x" * 3000 + "@main"))
    message = validate(path, capsys)
    assert message == (
        f"error: {path}: line 3: models[0].model: model reference '{'x' * 60}'... is longer than a path "
        "can be (255 bytes a name, 4096 in all); check the path or Hub id\n"
    )


def test_a_model_name_with_control_characters_is_a_config_error() -> None:
    message = refused(BASE.replace("model: a", 'model: "a\\0b\\e[2J"'))
    assert message == (
        "<config>: line 3: models[0].model: model reference 'a\\x00b\\x1b[2J' holds a NUL character, which "
        "no path or Hub id can hold; write the path or Hub id plainly"
    )


def test_an_unknown_key_with_terminal_escapes_is_shown_escaped() -> None:
    message = refused(BASE + '"\\e]0;owned\\a": 1\n')
    assert message == "<config>: line 5: \\x1b]0;owned\\x07: unknown key"


def test_a_huge_wrong_value_is_quoted_short() -> None:
    message = refused(BASE + "dtype: " + "f" * 500_000 + "\n")
    assert message == (
        f"<config>: line 5: dtype: unknown dtype '{'f' * 60}'...; use one of float32, float16, bfloat16, float64"
    )


HOSTILE = [None, "", [], {}, [None], [[]], {"": None}, 10**99, -(10**99), 1e308, ".inf", True, "x" * 5000]


def test_any_node_replaced_by_a_hostile_value_is_refused_cleanly(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each node of a valid config (every level: top, models, parameters, slices) in turn replaced
    by a wrong type, a huge number, an empty value or null: validate passes or exits 1 with one
    short message naming the file, never a traceback."""
    import yaml

    docs: list[dict[str, object]] = [
        {
            "merge_method": "ties",
            "base_model": str(zoo["base"]),
            "models": [{"model": str(zoo["a"]), "parameters": {"weight": [0.5, 1], "density": 0.5}}],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        {
            "merge_method": "slerp",
            "base_model": str(zoo["base"]),
            "slices": [
                {
                    "sources": [
                        {"model": str(zoo["base"]), "layer_range": [0, 2]},
                        {"model": str(zoo["a"]), "layer_range": [1, 3]},
                    ],
                    "parameters": {"t": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]},
                }
            ],
        },
    ]
    path = tmp_path / "hostile.yml"
    checked = 0
    for doc, value in [(d, v) for d in docs for v in HOSTILE]:
        for where in _nodes(doc):
            changed = json.loads(json.dumps(doc))
            node = changed
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = value
            text = yaml.safe_dump(changed).replace("'.inf'", ".inf")
            path.write_text(text)
            code = main(["validate", str(path)])
            err = capsys.readouterr().err
            checked += 1
            if code == 0:
                continue
            assert code == 1, (where, err)
            assert err.startswith("error: ") and "Traceback" not in err, (where, err)
            assert len(err) < 3000 and "\x1b" not in err, (where, err[:200])
    assert checked > 200


def _nodes(doc: object, where: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found: list[tuple[str | int, ...]] = [where] if where else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _nodes(value, (*where, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _nodes(value, (*where, i))
    return found


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("nan", "size 'nan' is not a finite number; write it like 5GB, 500MB or 2GiB"),
        ("1e999GB", "size '1e999GB' is not a finite number; write it like 5GB, 500MB or 2GiB"),
        ("0.1", "size '0.1' must be at least one byte; write it like 5GB, 500MB or 2GiB"),
        (0, "size 0 must be at least one byte; write it like 5GB, 500MB or 2GiB"),
        (
            True,
            "cannot read size True: it is not a number of bytes or text; write it like 5GB, 500MB or 2GiB",
        ),
    ],
)
def test_a_shard_size_that_is_not_a_finite_size_is_refused(size: object, expected: str) -> None:
    from mergesmith.plan import parse_size

    with pytest.raises(ConfigError) as info:
        parse_size(size)  # type: ignore[arg-type]
    assert str(info.value) == expected


def test_a_tune_config_holding_a_date_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tune.yml"
    path.write_text(TUNE.replace("SEARCH", "{search: [0, 1]}") + "name: 2024-01-01\n")
    args = ["tune", str(path), "--tasks", str(tmp_path / "math.jsonl"), "--out", str(tmp_path / "out")]
    assert validate_run(args, capsys) == (
        f"{path}: holds a value that is not plain data ('Object of type date is not JSON serializable'); "
        "use only mappings, lists, text, numbers and booleans (quote dates)"
    )
