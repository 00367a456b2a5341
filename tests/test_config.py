"""Config validation: every problem reported at once, with its line and a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesmith import ConfigError, load_config
from mergesmith.methods import REGISTRY
from mergesmith.methods.slerp import SlerpParams
from mergesmith.parameters import evaluate, param_infos


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


def test_unknown_method_lists_the_known_ones() -> None:
    (p,) = problems("merge_method: tie\nmodels:\n  - model: a\n")
    assert "line 1: merge_method: unknown method 'tie' (did you mean 'ties'?)" in p
    assert p.endswith("; known methods: " + ", ".join(REGISTRY))
    assert len(REGISTRY) == 30


def test_misspelled_keys_are_rejected_with_a_suggestion() -> None:
    found = problems(
        "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n"
        "      weight: 1\n      densty: 0.5\nout_dtyp: bfloat16\n"
    )
    assert any(p.startswith("line 8: out_dtyp: unknown key (did you mean 'out_dtype'?)") for p in found)
    assert any(
        p.startswith(
            "line 7: models[0].parameters.densty: unknown parameter for ties (did you mean 'density'?)"
        )
        for p in found
    )
    assert len(found) == 2


def test_negative_density_and_t_out_of_range_are_rejected() -> None:
    found = problems(
        "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, density: -0.2}\n"
    )
    assert found == ["line 5: models[0].parameters.density: -0.2 is outside (0, 1]"]
    found = problems(
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: [0, 1.5]\n"
    )
    assert found == ["line 7: parameters.t[1]: 1.5 is outside [0, 1]"]


def test_all_problems_are_reported_together() -> None:
    found = problems(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: one}\n"
        "  - model: b\n    parameters: {weight: 1, normalize: 3}\ndtype: float8\nfoo: 1\n"
    )
    assert len(found) == 4
    text = "\n".join(found)
    assert "weight: expected a number, found 'one'" in text
    assert "normalize applies to the whole merge, not to one model" in text
    assert "unknown dtype 'float8'" in text
    assert "foo: unknown key" in text


def test_missing_required_weight_and_base() -> None:
    found = problems("merge_method: task_arithmetic\nmodels:\n  - model: a\n")
    assert found == [
        "line 1: base_model: task_arithmetic needs a base_model: add base_model: <the model the others were "
        "fine-tuned from>"
    ]
    found = problems(
        "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n    parameters: {weight: 1}\n"
    )
    assert found == [
        "line 3: models[0].parameters.weight: missing: linear needs a weight for a (this model's coefficient)"
    ]


def test_linear_weights_summing_to_zero_with_normalize() -> None:
    found = problems(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters: {weight: -1}\n"
    )
    assert "the weights sum to 0 and normalize is true" in found[0]


def test_slerp_takes_exactly_two_models() -> None:
    found = problems(
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n  - model: c\nparameters: {t: 0.5}\n"
    )
    assert found == ["line 3: models: slerp takes a base_model and exactly 1 other model; found 2"]


def test_yaml_cannot_construct_python_objects() -> None:
    (p,) = problems("merge_method: !!python/object/apply:os.system ['touch /tmp/x']\n")
    assert "not valid YAML" in p


def test_config_file_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml")


def test_mergekit_slerp_config_loads_unchanged() -> None:
    cfg = load_config(
        """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""
    )
    assert cfg.slices is not None and cfg.slices[0].sources[1].layer_range == (0, 40)
    assert cfg.dtype == "float16"


def test_gradients_interpolate_and_filters_match_names() -> None:
    (t_info,) = param_infos(SlerpParams)
    setting = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]
    attn = "model.layers.3.self_attn.q_proj.weight"
    # 5 points over t in [0, 1]: t=0.125 sits halfway between the first two points.
    assert evaluate(t_info, setting, attn, 0.125) == pytest.approx(0.25)
    assert evaluate(t_info, setting, attn, 0.5) == pytest.approx(0.3)
    assert evaluate(t_info, setting, attn, 1.0) == pytest.approx(1.0)
    assert evaluate(t_info, setting, "model.layers.3.mlp.up_proj.weight", 0.9) == 0.5
    assert evaluate(t_info, [{"filter": "mlp", "value": 1}], attn, 0.0) is None


def test_required_merge_wide_parameter_must_be_given() -> None:
    found = problems("merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n")
    assert found == [
        "line 1: parameters.t: missing: slerp needs t (position between the base (0) and the other "
        "model (1)); add it under parameters:"
    ]


def test_slice_without_the_base_model_is_refused() -> None:
    found = problems(
        "merge_method: ties\nbase_model: a\nslices:\n  - sources:\n      - model: b\n        layer_range: [0, 2]\n"
        "      - model: c\n        layer_range: [0, 2]\nparameters: {weight: 1}\n"
    )
    assert found == [
        "line 3: slices[0].sources: ties needs the base model a among the slice's sources, with the same "
        "layer_range as the others"
    ]


def test_mapping_model_reference_keeps_its_revision() -> None:
    cfg = load_config(
        "merge_method: linear\nmodels:\n  - model: {model: {path: org/name, revision: v2}}\n"
        "    parameters: {weight: 1}\n"
    )
    assert str(cfg.models[0].ref) == "org/name@v2"


def test_chat_template_must_be_known_or_jinja() -> None:
    (p,) = problems(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nchat_template: chatmel\n"
    )
    assert p == (
        "line 5: chat_template: expected auto, alpaca, chatml, exaone, llama3, mistral or a Jinja "
        "template text (with a { and 20 characters or more), found 'chatmel'"
    )


def test_problems_are_sorted_by_line() -> None:
    found = problems(
        "merge_method: linear\nfoo: 1\nmodels:\n  - model: a\n    parameters: {weight: x}\nbar: 2\n"
    )
    assert [p.split(":")[0] for p in found] == ["line 2", "line 5", "line 6"]
