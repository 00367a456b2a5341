"""mergekit's config keys beyond the common ones: accepted with mergekit's meaning, or with a
warning where mergekit accepts and ignores them; other mergekit tools' configs are recognised."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mergesmith import ConfigError, load_config
from mergesmith.cli import main
from mergesmith.config import ConfigWarning


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


SLERP_WITH_WEIGHT = """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters:
      weight: 0.7
parameters:
  t: 0.5
"""


def test_a_parameter_the_method_ignores_is_a_warning_and_dropped() -> None:
    with pytest.warns(ConfigWarning) as caught:
        config = load_config(SLERP_WITH_WEIGHT.format(base="./b", a="./a"))
    expected = (
        "line 7: models[1].parameters.weight: slerp does not use weight, so it has no effect for ./a "
        "(mergekit accepts and ignores it too); remove it to silence this warning"
    )
    assert config.warnings == (expected,)
    assert [str(w.message) for w in caught] == [f"<config>: {expected}"]
    assert config.models[1].parameters == {}


@pytest.mark.parametrize("method", ["model_stock", "karcher", "nearswap", "sce"])
def test_weight_is_ignored_with_a_warning_by_methods_without_weights(method: str) -> None:
    other, extra = ("./b", "parameters: {t: 0.5}\n") if method == "nearswap" else ("./c", "")
    text = (
        f"merge_method: {method}\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters: {{weight: 2}}\n"
        f"  - model: {other}\n{extra}"
    )
    with pytest.warns(ConfigWarning):
        config = load_config(text)
    assert config.warnings == (
        f"line 5: models[0].parameters.weight: {method} does not use weight, so it has no effect for ./a "
        "(mergekit accepts and ignores it too); remove it to silence this warning",
    )


def test_a_name_no_method_takes_is_still_refused_and_lists_every_parameter() -> None:
    (p,) = problems(
        "merge_method: slerp\nbase_model: ./b\nmodels:\n  - model: ./b\n  - model: ./a\n"
        "    parameters: {wieght: 1}\nparameters: {t: 0.5}\n"
    )
    assert p == (
        "line 6: models[1].parameters.wieght: unknown parameter for slerp; its per-model parameters: "
        "none; its merge-wide parameters (top-level parameters:): t"
    )


def test_residual_weight_is_accepted_with_a_warning() -> None:
    text = (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 2]\n"
        "    residual_weight: 0.5\n"
    )
    with pytest.warns(ConfigWarning):
        config = load_config(text)
    assert config.warnings == (
        "line 6: slices[0].residual_weight: has no effect: mergekit accepts residual_weight and ignores "
        "it, and so does mergesmith; remove it to silence this warning",
    )
    assert config.slices is not None and config.slices[0].sources[0].layer_range == (0, 2)


def test_the_cli_prints_the_warning_and_succeeds(
    zoo: dict[str, Path], write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(SLERP_WITH_WEIGHT.format(base=zoo["base"], a=zoo["a"]))
    assert main(["validate", str(path), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: {path}: line 7: models[1].parameters.weight: slerp does not use weight, so it has no "
        f"effect for {zoo['a']} (mergekit accepts and ignores it too)"
    ) in err
    assert "Traceback" not in err and "ConfigWarning" not in err


def test_the_cli_shows_a_warning_once_however_often_the_config_is_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mergesmith.cli import _config_warnings

    text = SLERP_WITH_WEIGHT.format(base="./b", a="./a")
    with _config_warnings():
        for _ in range(3):  # tune reads its config for every trial, merge --eval twice
            load_config(text)
    err = capsys.readouterr().err
    assert err == (
        "warning: <config>: line 7: models[1].parameters.weight: slerp does not use weight, so it has no "
        "effect for ./a (mergekit accepts and ignores it too); remove it to silence this warning\n"
    )


def test_a_mergekit_moe_config_names_the_command_for_it(
    write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        "base_model: ./base\ngate_mode: hidden\ndtype: bfloat16\nexperts:\n  - source_model: ./a\n"
        "    positive_prompts: [code]\n"
    )
    for command in ("merge", "validate"):
        args = [command, str(path)] + (["./out"] if command == "merge" else [])
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err == (
            f"error: {path}: line 4: this is a mergekit-moe config (it has experts and gate_mode:), which "
            "builds a mixture-of-experts model; merge and validate take a merge config (merge_method: ...). "
            "Build it with mergesmith moe CONFIG OUT_DIR\n"
        )


def test_a_mergekit_evolve_config_names_tune() -> None:
    (p,) = problems(
        "genome:\n  models: [./a, ./b]\n  merge_method: ties\n  base_model: ./a\n"
        "tasks:\n  - name: arc\n    weight: 1.0\nlimit: 100\n"
    )
    assert p == (
        "line 1: this is a mergekit-evolve config (it has genome and tasks:); mergesmith's search over "
        "merge parameters is mergesmith tune, which takes a merge config whose searched values are "
        "written {search: [low, high]} (see docs/cli.md, section tune)"
    )


MULTI = """name: first
merge_method: linear
models:
  - model: ./a
  - model: ./b
---
merge_method: slerp
base_model: first
models:
  - model: first
  - model: ./c
parameters: {t: 0.5}
"""


def test_several_yaml_documents_name_mergesmith_multi(
    write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(MULTI)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {path}:6: holds several YAML documents (separated by ---) where one is expected; "
        "this is a file of several merges: run it with mergesmith multi, which runs each merge in turn\n"
    )
    assert "not valid YAML" not in err


def test_a_list_of_configs_names_mergesmith_multi() -> None:
    listed = (
        "- "
        + MULTI.split("---\n")[0].replace("\n", "\n  ").rstrip()
        + "\n- merge_method: linear\n  models: [./a]\n"
    )
    (p,) = problems(listed)
    assert (
        p
        == "the file is a list of 2 merge configs, not one: run it with mergesmith multi, which runs each merge in turn"
    )


@pytest.fixture
def mystery(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama and a fine-tune whose config.json names an architecture mergesmith does not know."""
    from tests import tiny

    base, cfg = tiny.llama_state(0)
    cfg = {**cfg, "model_type": "mystery", "architectures": ["MysteryForCausalLM"]}
    return (
        tiny.save(tmp_path / "base", base, cfg),
        tiny.save(tmp_path / "a", tiny.finetune(base, 1), cfg),
    )


def test_override_architecture_picks_the_architecture_row(mystery: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    import mergesmith

    base, a = mystery
    plain = f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters: {{weight: 1}}\n"
    assert mergesmith.validate(plain).arch.name == "generic transformer"
    override = plain.replace(
        f"base_model: {base}\n", f"base_model: {{model: {base}, override_architecture: LlamaForCausalLM}}\n"
    ).replace(
        f"  - model: {base}\n", f"  - model: {{model: {base}, override_architecture: LlamaForCausalLM}}\n"
    )
    config = load_config(override)
    assert config.base_model is not None and config.base_model.architecture == "LlamaForCausalLM"
    plan = mergesmith.merge(override, tmp_path / "out")
    assert plan.arch.name == "decoder (Llama style)"
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["model_type"] == "mystery"


def test_override_architecture_must_be_a_name_and_agree(mystery: tuple[Path, Path]) -> None:
    base, a = mystery
    (p,) = problems(f"merge_method: linear\nmodels:\n  - model: {{model: {a}, override_architecture: 3}}\n")
    assert p == (
        "line 3: models[0].model.override_architecture: expected an architecture class name such as "
        "LlamaForCausalLM, found 3"
    )
    with pytest.raises(ConfigError) as info:
        import mergesmith

        mergesmith.validate(
            f"merge_method: linear\nmodels:\n  - model: {{model: {a}, override_architecture: GPT2LMHeadModel}}\n"
            f"  - model: {{model: {base}, override_architecture: LlamaForCausalLM}}\nparameters: {{weight: 1}}\n"
        )
    assert info.value.problems == [
        "the models name different override_architecture values (GPT2LMHeadModel, LlamaForCausalLM); "
        "mergesmith merges models of one architecture: give them all the same one"
    ]


def test_a_default_module_merges_with_its_own_parameters_over_the_top_level(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    import mergesmith
    from tests import tiny

    text = f"""merge_method: linear
modules:
  default:
    models:
      - model: {zoo["a"]}
      - model: {zoo["b"]}
        parameters: {{weight: 0.5}}
    parameters:
      weight:
        - filter: mlp
          value: 3.0
      normalize: false
parameters:
  weight: 1.0
  normalize: true
"""
    config = load_config(text)
    assert config.modules == (("default", 3),)
    mergesmith.merge(text, tmp_path / "out")
    a, b, out = tiny.load_state(zoo["a"]), tiny.load_state(zoo["b"]), tiny.load_state(tmp_path / "out")
    assert out.keys() == a.keys()
    for name, merged in out.items():
        wa = 3.0 if "mlp" in name else 1.0  # the module's condition, else the top-level weight
        expected = wa * a[name] + 0.5 * b[name]  # the module's normalize: false wins
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    assert any("mlp" in n for n in out) and any("mlp" not in n for n in out)


def test_a_module_of_slices_is_the_slices_form(zoo: dict[str, Path], tmp_path: Path) -> None:
    import mergesmith
    from tests import tiny

    text = (
        f"merge_method: passthrough\nmodules:\n  default:\n    slices:\n      - sources:\n"
        f"          - model: {zoo['a']}\n            layer_range: [1, 2]\n"
    )
    mergesmith.merge(text, tmp_path / "out")
    a, out = tiny.load_state(zoo["a"]), tiny.load_state(tmp_path / "out")
    torch.testing.assert_close(
        out["model.layers.0.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"]
    )
    assert not any(n.startswith("model.layers.1.") for n in out)


def test_a_module_the_architecture_lacks_lists_its_modules(
    zoo: dict[str, Path], write_config: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        f"merge_method: linear\nparameters: {{weight: 1}}\nmodules:\n  text_decoder:\n"
        f"    models: [{zoo['a']}, {zoo['b']}]\n  vision_tower:\n    models: [{zoo['a']}]\n"
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: 2 problems in the config in {path}:\n"
        "  - line 4: modules.text_decoder: the decoder (Llama style) architecture has no module "
        "'text_decoder'; its modules: default\n"
        "  - line 6: modules.vision_tower: the decoder (Llama style) architecture has no module "
        "'vision_tower'; its modules: default\n"
    )


def test_modules_are_one_input_form_of_three() -> None:
    (p,) = problems(
        "merge_method: linear\nparameters: {weight: 1}\nmodels: [./a]\nmodules:\n  default:\n    models: [./a]\n"
    )
    assert p == "line 4: modules: give one of models, slices or modules, not several"
    (p,) = problems(
        "merge_method: linear\nparameters: {weight: 1}\nmodules:\n  default:\n    models: [./a]\n"
        "    slices:\n      - sources: [{model: ./a, layer_range: [0, 1]}]\n"
    )
    assert p == "line 4: modules.default: give either models or slices (one of them, not both)"
    (p,) = problems(
        "merge_method: ties\nbase_model: ./b\nmodules:\n  default:\n    models:\n      - model: ./a\n"
        "        parameters: {densty: 0.5, weight: 1}\n"
    )
    assert p.startswith(
        "line 7: modules.default.models[0].parameters.densty: unknown parameter for ties (did you mean 'density'?)"
    )
