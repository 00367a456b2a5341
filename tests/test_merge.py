"""End to end: tiny Llama checkpoints in every layout, merged with every method, loaded by transformers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith
from mergesmith import CheckpointError, CompatibilityError, ConfigError, MethodError, OutputError
from mergesmith.cli import main
from mergesmith.methods import REGISTRY, MergeInputs
from tests import tiny
from tests.test_methods import numpy_slerp, numpy_ties
from tests.test_methods_ram_fusion import np_boosts, np_ram

ALL = ["base", "a", "b", "c", "d"]


def states(zoo: dict[str, Path], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for n in names:
        d = zoo[n]
        if (d / "model.safetensors").exists() or list(d.glob("*.safetensors")):
            out[n] = tiny.load_state(d)
        else:
            out[n] = {}
            for f in sorted(d.glob("*.bin")):
                out[n].update(torch.load(f, weights_only=True))
    return out


def config_for(method: str, zoo: dict[str, Path], extra: str = "") -> str:
    models = {
        "slerp": ["base", "b"],
        "passthrough": ["d"],
        "nuslerp": ["a", "b"],
        "nearswap": ["b"],
        "arcee_fusion": ["b"],
    }.get(method, ["a", "b", "c", "d"])
    weights = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
    lines = [f"merge_method: {method}", f"base_model: {zoo['base']}", "models:"]
    per_model = {i.key for i in REGISTRY[method].model_param_infos}
    for m in models:
        params = []
        if "weight" in per_model:
            params.append(f"weight: {weights.get(m, 0.5)}")
        if "density" in per_model:
            params.append("density: 0.6")
        lines.append(f"  - model: {zoo[m]}")
        if params:
            lines.append(f"    parameters: {{{', '.join(params)}}}")
    if method == "slerp":
        lines.append("parameters: {t: [0.2, 0.8]}")
    if method == "nearswap":
        lines.append("parameters: {t: 0.01}")
    if method == "pcb":
        lines.append("parameters: {density: 0.5}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n" + extra


@pytest.mark.parametrize("method", list(REGISTRY))
def test_every_method_merges_every_layout_and_transformers_loads_it(
    method: str, zoo: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    mergesmith.merge(config_for(method, zoo), out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, len(tiny.VOCAB)) and bool(torch.isfinite(logits).all())
    merged = tiny.load_state(out)
    src = states(zoo, ALL)
    assert set(merged) == set(src["base"])
    name = "model.layers.1.mlp.up_proj.weight"
    base = src["base"][name].numpy()
    if method == "linear":
        expected = sum(w * src[m][name].numpy() for m, w in zip("abcd", [0.4, 0.3, 0.2, 0.1])) / 1.0
    elif method == "task_arithmetic":
        expected = base + sum(w * (src[m][name].numpy() - base) for m, w in zip("abcd", [0.4, 0.3, 0.2, 0.1]))
    elif method == "ties":
        expected = numpy_ties(base, [src[m][name].numpy() for m in "abcd"], [0.4, 0.3, 0.2, 0.1], [0.6] * 4)
    elif method == "slerp":
        # layer 1 of 3: t is halfway along the gradient [0.2, 0.8]
        expected = numpy_slerp(0.5, base, src["b"][name].numpy())
    elif method == "passthrough":
        expected = src["d"][name].numpy()
    elif method in ("ram", "ramplus_tl"):
        models = [src[m][name].numpy() for m in "abcd"]
        boosts = np_boosts(base, models, 0.1, 0.2, 1e-5) if method == "ramplus_tl" else None
        expected = np_ram(base, models, 1e-5, boosts)
    elif method == "arcee_fusion":
        # the outliers of importance take b's value, the rest keep the base's
        taken = merged[name] != src["base"][name]
        assert 0 < float(taken.float().mean()) < 0.5
        torch.testing.assert_close(merged[name][taken], src["b"][name][taken], rtol=1e-5, atol=1e-6)
        return
    else:
        # random methods: entries either keep the base or move; the survivors' share is about density
        changed = (merged[name].numpy() != base).mean()
        assert 0.6 <= changed <= 1.0
        return
    torch.testing.assert_close(
        merged[name], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6
    )


def test_gradient_gives_each_layer_its_value(zoo: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\n"
        "    parameters:\n      weight:\n        - filter: mlp\n          value: [0, 1]\n        - value: 0.5\n"
    )
    out = tmp_path / "out"
    plan = mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a"])
    for layer, w in [(0, 0.0), (1, 0.5), (2, 1.0)]:
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        expected = src["base"][name] + w * (src["a"][name] - src["base"][name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)
        attn = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(
            merged[attn], src["base"][attn] + 0.5 * (src["a"][attn] - src["base"][attn]), rtol=1e-6, atol=1e-7
        )
    weights = {j.name: j.model_params[0]["weight"] for j in plan.jobs}
    assert weights["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert weights["model.embed_tokens.weight"] == pytest.approx(0.5)


def test_bf16_inputs_and_out_dtype(zoo: dict[str, Path], tmp_path: Path) -> None:
    state, cfg = tiny.llama_state(0)
    base = tiny.save(tmp_path / "bbase", state, cfg, dtype=torch.bfloat16)
    other = tiny.save(tmp_path / "bother", tiny.finetune(state, 9), cfg, dtype=torch.bfloat16)
    out = tmp_path / "out"
    mergesmith.merge(
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {other}\n    parameters: {{weight: 1}}\nout_dtype: float16\n",
        out,
    )
    merged = tiny.load_state(out)
    assert all(t.dtype == torch.float16 for t in merged.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    a, b = tiny.load_state(base), tiny.load_state(other)
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = ((a[name].float() + b[name].float()) / 2).half()
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)


def test_different_hidden_size_is_refused_before_reading_weights(zoo: dict[str, Path]) -> None:
    with pytest.raises(CompatibilityError) as info:
        mergesmith.validate(config_for("task_arithmetic", {**zoo, "d": zoo["wide"]}))
    text = str(info.value)
    assert (
        f"hidden_size: {zoo['wide']} ({zoo['wide'] / 'config.json'}) has 48, but {zoo['base']} has 32" in text
    )
    assert "cannot be merged tensor by tensor" in text


def test_tensor_missing_from_one_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    state = tiny.load_state(zoo["a"])
    del state["model.layers.2.mlp.gate_proj.weight"]
    broken = tiny.save(tmp_path / "broken", state, json.loads((zoo["a"] / "config.json").read_text()))
    with pytest.raises(CompatibilityError) as info:
        mergesmith.validate(config_for("ties", {**zoo, "c": broken}))
    assert f"model.layers.2.mlp.gate_proj.weight: missing from {broken}" in str(info.value)


def test_shape_mismatch_names_both_files(zoo: dict[str, Path], tmp_path: Path) -> None:
    state = tiny.load_state(zoo["a"])
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    cfg = json.loads((zoo["a"] / "config.json").read_text())
    broken = tiny.save(tmp_path / "broken", state, cfg)
    with pytest.raises(CompatibilityError) as info:
        mergesmith.validate(config_for("ties", {**zoo, "a": broken}))
    assert str(info.value) == (
        f"model.layers.0.mlp.up_proj.weight: shape (65, 32) in {broken} (model.safetensors), "
        f"but (64, 32) in {zoo['base']} (model.safetensors): these models have different sizes and "
        "cannot be merged tensor by tensor"
    )


def test_missing_model_path(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        mergesmith.validate(config_for("linear", {**zoo, "b": tmp_path / "nope"}))
    assert f"{tmp_path / 'nope'}: no such directory" in str(info.value)


def test_output_inside_an_input_is_refused(zoo: dict[str, Path]) -> None:
    with pytest.raises(OutputError, match="is inside input model"):
        mergesmith.merge(config_for("linear", zoo), zoo["a"] / "merged")
    assert not (zoo["a"] / "merged").exists()


def test_cli_validate_merge_and_methods(
    zoo: dict[str, Path],
    tmp_path: Path,
    write_config: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = write_config(config_for("ties", zoo))
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "method: ties" in out
    assert "model.layers.2.mlp.up_proj.weight [64x32 float32] ties layer 2 (t=1)" in out
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "merged 30 tensors with ties" in capsys.readouterr().out
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in REGISTRY:
        assert f"{name}: " in listing
    bad = write_config("merge_method: nope\n")
    assert main(["validate", str(bad)]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_slices_form_with_layer_ranges(zoo: dict[str, Path], tmp_path: Path) -> None:
    text = f"""
slices:
  - sources:
      - model: {zoo["base"]}
        layer_range: [0, 3]
      - model: {zoo["a"]}
        layer_range: [0, 3]
merge_method: slerp
base_model: {zoo["base"]}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
dtype: float32
"""
    out = tmp_path / "out"
    mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a"])
    assert set(merged) == set(src["base"])
    for layer, t in [(0, 0.0), (1, 0.5), (2, 1.0)]:
        name = f"model.layers.{layer}.self_attn.k_proj.weight"
        expected = numpy_slerp(t, src["base"][name].numpy(), src["a"][name].numpy())
        torch.testing.assert_close(
            merged[name], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6
        )


def test_merged_output_never_overwrites_inputs_with_force(zoo: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(zoo["a"], copy)
    with pytest.raises(OutputError):
        mergesmith.merge(config_for("linear", {**zoo, "a": copy}), copy, force=True)
    assert (copy / "model.safetensors").read_bytes() == (zoo["a"] / "model.safetensors").read_bytes()


def test_linear_weights_summing_to_zero_on_some_tensors_are_refused_at_plan_time(
    zoo: dict[str, Path],
) -> None:
    text = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {zoo['b']}\n    parameters:\n      weight:\n        - filter: mlp\n          value: -1\n"
        "        - value: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    assert str(info.value) == (
        "<config>: model.layers.0.mlp.down_proj.weight: the linear weights sum to 0 here and normalize is true, which "
        "divides by zero; change the weights or set normalize: false"
    )


def test_different_hidden_size_reports_the_config_not_every_tensor(zoo: dict[str, Path]) -> None:
    with pytest.raises(CompatibilityError) as info:
        mergesmith.validate(config_for("task_arithmetic", {**zoo, "d": zoo["wide"]}))
    found = info.value.problems
    assert len(found) == 2, found
    assert any(p.startswith("hidden_size:") for p in found)
    assert any(p.startswith("intermediate_size:") for p in found)


def test_named_chat_template_is_written_out(zoo: dict[str, Path], tmp_path: Path) -> None:
    from mergesmith.execute import CHAT_TEMPLATES

    out = tmp_path / "out"
    mergesmith.merge(config_for("linear", zoo, "chat_template: chatml\n"), out)
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unavailable_device_is_refused_before_anything_is_written(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="not a torch device"):
        mergesmith.merge(config_for("linear", zoo), tmp_path / "out", device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            mergesmith.merge(config_for("linear", zoo), tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(REGISTRY))
def test_cuda_merge_matches_cpu_merge(method: str, zoo: dict[str, Path], tmp_path: Path) -> None:
    text = config_for(method, zoo)
    mergesmith.merge(text, tmp_path / "cpu", device="cpu")
    mergesmith.merge(text, tmp_path / "gpu", device="cuda")
    cpu, gpu = tiny.load_state(tmp_path / "cpu"), tiny.load_state(tmp_path / "gpu")
    assert set(cpu) == set(gpu)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_inputs_reach_the_device_ahead_of_their_merge_and_copied_tensors_stay_on_the_cpu(
    zoo: dict[str, Path],
) -> None:
    from mergesmith.execute import InputStream
    from mergesmith.plan import COPY

    plan = mergesmith.validate(config_for("ties", zoo))
    device = torch.device("cuda")
    with InputStream(plan, plan.jobs, device) as stream:
        for job, tensors in stream:
            expected = "cpu" if job.method == COPY else "cuda"
            assert {t.device.type for t in tensors} == {expected}, job.name
            for t, ref in zip(tensors, job.all_inputs()):
                assert torch.equal(t.cpu(), plan.models[ref.model].get(ref.name)), job.name


def test_a_bare_exception_from_a_method_is_a_method_error_naming_where(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(inputs: MergeInputs[Any, Any]) -> torch.Tensor:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(REGISTRY, "linear", dataclasses.replace(REGISTRY["linear"], merge=broken))
    with pytest.raises(MethodError) as info:
        mergesmith.merge(config_for("linear", zoo), tmp_path / "out")
    assert str(info.value) == (
        f"model.embed_tokens.weight: linear failed merging the tensors of {zoo['a']}, {zoo['b']}, "
        f"{zoo['c']}, {zoo['d']}: ZeroDivisionError: division by zero"
    )
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_method_raising_a_mergesmith_error_passes_it_through(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(inputs: MergeInputs[Any, Any]) -> torch.Tensor:
        raise MethodError(f"{inputs.tensor_name}: refused")

    monkeypatch.setitem(REGISTRY, "linear", dataclasses.replace(REGISTRY["linear"], merge=refusing))
    with pytest.raises(MethodError) as info:
        mergesmith.merge(config_for("linear", zoo), tmp_path / "out")
    assert str(info.value) == "model.embed_tokens.weight: refused"
