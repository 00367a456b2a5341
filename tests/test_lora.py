"""PEFT LoRA adapters as inputs: base + adapter equals peft's merge_and_unload, in configs too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import CheckpointError
from mergesmith.lora import AdaptedCheckpoint, read_adapter
from mergesmith.sources import Checkpoint, ModelSource
from tests import tiny

LLAMA = {
    "vocab_size": 40,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def llama(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).save_pretrained(directory)
    return directory


def adapter(base: Path, directory: Path, seed: int, **lora: Any) -> dict[str, torch.Tensor]:
    """Train-free adapter with random factors; returns peft's merge_and_unload() state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    for name in lora.get("modules_to_save") or ():  # a trained copy differs from the base
        copy = peft_model.get_submodule(f"base_model.model.{name}").modules_to_save["default"]
        with torch.no_grad():
            copy.weight.add_(torch.randn_like(copy.weight) * 0.1)
    peft_model.save_pretrained(directory)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_same_as_peft(view: ModelSource, expected: dict[str, torch.Tensor]) -> None:
    for name in sorted(view.keys()):
        torch.testing.assert_close(view.get(name), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_base_plus_adapter_equals_peft_merge_and_unload(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")
    expected = adapter(
        base,
        tmp_path / "adapter",
        1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        use_rslora=True,
        modules_to_save=["lm_head"],
    )
    view = AdaptedCheckpoint(Checkpoint(base), read_adapter(tmp_path / "adapter"), "base+adapter")
    assert sorted(view.keys()) == sorted(expected)
    assert view.adapter.modules["model.layers.0.self_attn.v_proj.weight"].rank == 2
    assert view.adapter.modules["model.layers.1.self_attn.q_proj.weight"].scaling == pytest.approx(3 / 2)
    assert "lm_head.weight" in view.adapter.replaced
    assert_same_as_peft(view, expected)
    # the adapter really changes the weights it targets, and only those
    plain = Checkpoint(base)
    changed = {n for n in sorted(plain.keys()) if not torch.equal(plain.get(n), view.get(n))}
    assert changed == {
        "model.embed_tokens.weight",
        "lm_head.weight",
        *(
            f"model.layers.{i}.{m}.weight"
            for i in (0, 1)
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        ),
    }


def test_fan_in_fan_out_adapter_on_gpt2(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=32)
    ).save_pretrained(tmp_path / "gpt2")
    expected = adapter(
        tmp_path / "gpt2",
        tmp_path / "adapter",
        2,
        r=3,
        lora_alpha=6,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    view = AdaptedCheckpoint(
        Checkpoint(tmp_path / "gpt2"), read_adapter(tmp_path / "adapter"), "gpt2+adapter"
    )
    assert view.adapter.modules["transformer.h.0.attn.c_attn.weight"].transpose
    assert_same_as_peft(view, {k: v for k, v in expected.items() if k in set(view.keys())})
    # Conv1D layers: PEFT turns fan_in_fan_out on whatever the config says
    import json

    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "fan_in_fan_out": False}))
    view = AdaptedCheckpoint(
        Checkpoint(tmp_path / "gpt2"), read_adapter(tmp_path / "adapter"), "gpt2+adapter"
    )
    assert_same_as_peft(view, {k: v for k, v in expected.items() if k in set(view.keys())})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    base = llama(root / "base")
    out: dict[str, Any] = {"base": base}
    for i, name in enumerate(("code", "chat")):
        out[name] = root / name
        out[f"{name}-merged"] = adapter(
            base, root / name, 10 + i, r=2 + i, lora_alpha=4, target_modules=["q_proj", "up_proj"]
        )
    return out


def test_configs_name_adapters_both_ways(adapters: dict[str, Any], tmp_path: Path) -> None:
    base = adapters["base"]
    text = (
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapters['code']}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {{model: {base}, lora: {adapters['chat']}}}\n    parameters: {{weight: 0.3}}\n"
        "dtype: float32\n"
    )
    out = tmp_path / "out"
    plan = mergesmith.merge(text, out)
    assert [str(r) for r in plan.refs] == [
        str(base),
        f"{base}+{adapters['code']}",
        f"{base}+{adapters['chat']}",
    ]
    merged = tiny.load_state(out)
    plain = {k: v.numpy() for k, v in tiny.load_state(base).items()}
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    ):
        b = plain[name]
        expected = (
            b
            + 0.6 * (adapters["code-merged"][name].numpy() - b)
            + 0.3 * (adapters["chat-merged"][name].numpy() - b)
        )
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    readme = (out / "README.md").read_text()
    assert "adapter_model.safetensors" in readme


def test_output_inside_an_adapter_is_refused(adapters: dict[str, Any]) -> None:
    text = f"merge_method: linear\nmodels:\n  - model: {adapters['base']}+{adapters['code']}\n    parameters: {{weight: 1}}\n"
    with pytest.raises(mergesmith.OutputError, match="is inside input model"):
        mergesmith.merge(text, adapters["code"] / "merged")


def test_adapter_for_another_size_is_refused(adapters: dict[str, Any], tmp_path: Path) -> None:
    wide = llama(tmp_path / "wide", hidden_size=48, intermediate_size=96)
    with pytest.raises(CheckpointError) as info:
        mergesmith.validate(
            f"merge_method: linear\nmodels:\n  - model: {wide}+{adapters['code']}\n    parameters: {{weight: 1}}\n"
        )
    text = str(info.value)
    assert (
        f"{adapters['code'] / 'adapter_model.safetensors'}: model.layers.0.self_attn.q_proj.weight: factors A (2, 32)"
        in text
    )
    assert "but the base's tensor is (48, 48)" in text and "made for a model of another size" in text


def test_adapter_for_other_modules_is_refused(adapters: dict[str, Any], tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=32)
    ).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError) as info:
        mergesmith.validate(
            f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'gpt2'}+{adapters['code']}\n    parameters: {{weight: 1}}\n"
        )
    assert "the adapter changes model.layers.0.self_attn.q_proj.weight, which" in str(info.value)
    assert "trained on another architecture" in str(info.value)


def test_missing_adapter_files_are_named(adapters: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CheckpointError, match=r"no adapter_config\.json; a LoRA input must be a PEFT adapter directory"
    ):
        mergesmith.validate(
            f"merge_method: linear\nmodels:\n  - model: {adapters['base']}+{tmp_path / 'empty'}\n    parameters: {{weight: 1}}\n"
        )


def test_evaluating_base_plus_adapter_loads_peft_merge_reading_only_changed_tensors(
    adapters: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from mergesmith.evaluate import load_model

    base = tmp_path / "base"
    shutil.copytree(adapters["base"], base)
    tiny.save_tokenizer(base)
    read: list[str] = []
    original = AdaptedCheckpoint.get

    def counted(self: AdaptedCheckpoint, name: str) -> torch.Tensor:
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(AdaptedCheckpoint, "get", counted)
    net, _tok = load_model(f"{base}+{adapters['code']}")
    state = net.state_dict()
    for name, want in adapters["code-merged"].items():
        torch.testing.assert_close(state[name], want.float(), rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(read) == sorted(n for n in state if n.endswith(("q_proj.weight", "up_proj.weight")))


def handmade(directory: Path, config: Any, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter directory written by hand: ``config`` as JSON (or text) and ``tensors``."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "adapter_config.json").write_text(text)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


Q = "base_model.model.model.layers.0.self_attn.q_proj"
PLAIN = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("a", "b", "found"),
    [
        (torch.ones(2, 32, dtype=torch.int8), torch.ones(32, 2), f"{Q}.lora_A.weight is torch.int8"),
        (torch.ones(2, 32), torch.ones(32, 2, dtype=torch.bool), f"{Q}.lora_B.weight is torch.bool"),
        (torch.ones(0, 32), torch.ones(32, 0), "factors A (0, 32) and B (32, 0) do not chain"),
        (torch.ones(64), torch.ones(32, 2), "factors A (64,) and B (32, 2) must both be matrices (2-D)"),
        (torch.ones(1, 2, 32), torch.ones(32, 2), "factors A (1, 2, 32) and B (32, 2) must both be matrices"),
        (torch.ones(2, 32), torch.ones(32, 3), "factors A (2, 32) and B (32, 3) do not chain"),
    ],
)
def test_malformed_factors_are_refused_from_the_header(
    tmp_path: Path, a: torch.Tensor, b: torch.Tensor, found: str
) -> None:
    ad = handmade(tmp_path / "ad", PLAIN, {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b})
    with pytest.raises(CheckpointError) as info:
        read_adapter(ad)
    text = str(info.value)
    assert text.startswith(f"{ad / 'adapter_model.safetensors'}: ") and found in text
    assert "floating point" in text or "corrupt" in text


@pytest.mark.parametrize(
    ("config", "found"),
    [
        ({**PLAIN, "r": 4}, "has rank 2 (A (2, 32), B (32, 2)), but r in adapter_config.json says 4"),
        ({**PLAIN, "rank_pattern": {"q_proj": 3}}, "has rank 2 (A (2, 32), B (32, 2)), but rank_pattern"),
        (
            {"target_modules": ["q_proj"]},
            "has rank 2 (A (2, 32), B (32, 2)), but adapter_config.json gives no r, so PEFT's default 8 applies",
        ),
    ],
)
def test_rank_disagreeing_with_the_config_is_refused(tmp_path: Path, config: Any, found: str) -> None:
    ad = handmade(
        tmp_path / "ad",
        config,
        {f"{Q}.lora_A.weight": torch.ones(2, 32), f"{Q}.lora_B.weight": torch.ones(32, 2)},
    )
    with pytest.raises(CheckpointError) as info:
        read_adapter(ad)
    text = str(info.value)
    assert f"{ad / 'adapter_model.safetensors'}: module model.layers.0.self_attn.q_proj {found}" in text
    assert "fix adapter_config.json or save the adapter again with PEFT" in text


def test_target_modules_matching_nothing_in_the_base_are_refused(
    adapters: dict[str, Any], tmp_path: Path
) -> None:
    ad = handmade(tmp_path / "ad", {**PLAIN, "target_modules": ["c_attn"]}, {})
    with pytest.raises(CheckpointError) as info:
        AdaptedCheckpoint(Checkpoint(adapters["base"]), read_adapter(ad), "x")
    text = str(info.value)
    assert f'{ad / "adapter_model.safetensors"}: target_modules ["c_attn"] match no module of' in text
    assert "the adapter was made for another architecture" in text


def quantized(directory: Path, base: Path, config: dict[str, Any] | None = None) -> Path:
    import json

    state = tiny.load_state(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].to(torch.int8)
    cfg = {**json.loads((base / "config.json").read_text()), **(config or {})}
    return tiny.save(directory, state, cfg)


def test_a_quantized_base_is_refused(adapters: dict[str, Any], tmp_path: Path) -> None:
    ad = read_adapter(adapters["code"])
    int8 = quantized(tmp_path / "int8", adapters["base"])
    with pytest.raises(CheckpointError) as info:
        AdaptedCheckpoint(Checkpoint(int8), ad, "x")
    assert (
        f"{ad.file}: model.layers.0.self_attn.q_proj.weight is torch.int8 in {int8}, not a float of 16 bits or "
        "more (a quantized model); apply the adapter to the unquantized base model"
    ) in str(info.value)
    bnb = quantized(tmp_path / "bnb", adapters["base"], {"quantization_config": {"load_in_8bit": True}})
    with pytest.raises(CheckpointError) as info:
        AdaptedCheckpoint(Checkpoint(bnb), ad, "x")
    assert str(info.value) == (
        f"{bnb / 'config.json'}: has a quantization_config: the weights are quantized and cannot be merged "
        "as they are; merge the unquantized (float16, bfloat16 or float32) model instead"
    )


def test_a_float8_base_with_scales_is_refused(adapters: dict[str, Any], tmp_path: Path) -> None:
    import json

    ad = read_adapter(adapters["code"])
    state = tiny.load_state(adapters["base"])
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    state[f"{name}_scale_inv"] = torch.ones(1, 1)
    fp8 = tiny.save(tmp_path / "fp8", state, json.loads((adapters["base"] / "config.json").read_text()))
    with pytest.raises(CheckpointError) as info:
        AdaptedCheckpoint(Checkpoint(fp8), ad, "x")
    assert str(info.value) == (
        f"{fp8}: tensor '{name}_scale_inv' (in model.safetensors) is quantization data for "
        f"'{name[: -len('.weight')]}': the weights are quantized and cannot be merged as they are; merge the "
        "unquantized (float16, bfloat16 or float32) model instead"
    )
    # with quant_method "fp8" in config.json the weights are dequantized as read, but an adapter
    # is still applied to unquantized bases only
    cfg = json.loads((adapters["base"] / "config.json").read_text())
    qc = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    tiny.save(tmp_path / "fp8q", state, {**cfg, "quantization_config": qc})
    with pytest.raises(CheckpointError) as info:
        AdaptedCheckpoint(Checkpoint(tmp_path / "fp8q"), ad, "x")
    assert str(info.value) == (
        f"{tmp_path / 'fp8q' / 'config.json'}: the base model is FP8-quantized; an adapter "
        "is applied to unquantized weights only: apply it to the bfloat16 base model"
    )
    del state[f"{name}_scale_inv"]
    tiny.save(fp8, state, json.loads((adapters["base"] / "config.json").read_text()))
    with pytest.raises(
        CheckpointError, match=f"{name} is torch.float8_e4m3fn in {fp8}, not a float of 16 bits"
    ):
        AdaptedCheckpoint(Checkpoint(fp8), ad, "x")


def test_a_config_names_every_bad_adapter_at_once(adapters: dict[str, Any], tmp_path: Path) -> None:
    one = handmade(tmp_path / "one", '{"r": 2, "lora_alpha": null}', {})
    two = handmade(tmp_path / "two", {**PLAIN, "use_dora": True}, {})
    base = adapters["base"]
    with pytest.raises(CheckpointError) as info:
        mergesmith.validate(
            f"merge_method: linear\nmodels:\n  - model: {base}+{one}\n    parameters: {{weight: 1}}\n"
            f"  - model: {base}+{two}\n    parameters: {{weight: 1}}\n"
        )
    text = str(info.value)
    assert text.startswith("2 problems reading the input models:\n")
    assert f"\n  - {one / 'adapter_config.json'}: lora_alpha is null; expected a finite number" in text
    assert (
        f"\n  - {two / 'adapter_config.json'}: DoRA (use_dora: true) cannot be applied by mergesmith" in text
    )


def test_fan_in_fan_out_follows_the_layer_as_in_peft(adapters: dict[str, Any], tmp_path: Path) -> None:
    import json
    import shutil

    ad = shutil.copytree(adapters["code"], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    # nn.Linear layers: PEFT turns fan_in_fan_out off and applies B @ A untransposed
    view = AdaptedCheckpoint(Checkpoint(adapters["base"]), read_adapter(ad), "x")
    assert_same_as_peft(view, adapters["code-merged"])


@pytest.mark.parametrize(
    ("config", "found"),
    [
        ("[1, 2]", "holds a JSON list, not an object of LoRA settings"),
        ('{"r": 2, "lora_alpha": 4', "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
        ('{"r": 2, "lora_alpha": null}', "lora_alpha is null; expected a finite number"),
        ('{"r": 2, "lora_alpha": "16"}', 'lora_alpha is "16"; expected a finite number'),
        ('{"r": 2, "lora_alpha": true}', "lora_alpha is true; expected a finite number"),
        ('{"r": 2, "lora_alpha": NaN}', "lora_alpha is NaN; expected a finite number"),
        ('{"r": 0}', "r is 0; expected a whole number of at least 1"),
        ('{"r": 2.5}', "r is 2.5; expected a whole number of at least 1"),
        ('{"r": 2, "fan_in_fan_out": "yes"}', 'fan_in_fan_out is "yes"; expected true or false'),
        (
            '{"r": 2, "alpha_pattern": {"q_(proj": 3}}',
            'alpha_pattern pattern "q_(proj" is not a regular expression',
        ),
        ('{"r": 2, "rank_pattern": {"q_proj": 0}}', 'rank_pattern["q_proj"] is 0; expected a whole number'),
        ('{"r": 2, "rank_pattern": [1]}', "rank_pattern is [1]; expected a mapping of module pattern"),
        ('{"r": 2, "target_modules": 3}', "target_modules is 3; expected a list of module names"),
        ('{"r": 2, "use_dora": true}', "DoRA (use_dora: true) cannot be applied by mergesmith"),
        (
            '{"r": 2, "trainable_token_indices": [3]}',
            "trainable tokens (trainable_token_indices: [3]) cannot",
        ),
        ('{"r": 2, "peft_type": "IA3"}', 'peft_type "IA3" is not LoRA'),
        (
            '{"r": 2, "target_modules": "(\\\\w+\\\\.?)*x"}',
            'target_modules "(\\\\w+\\\\.?)*x" repeats a group that itself repeats',
        ),
        ('{"r": 2, "rank_pattern": {"(.*)*_proj": 4}}', 'rank_pattern pattern "(.*)*_proj" repeats a group'),
        ('{"r": 2, "target_modules": "' + "q" * 3000 + '"}', "is 3000 characters long, more than 2000"),
    ],
)
def test_adapter_config_is_checked_whole(tmp_path: Path, config: str, found: str) -> None:
    ad = handmade(tmp_path / "ad", config, {})
    with pytest.raises(CheckpointError) as info:
        read_adapter(ad)
    text = str(info.value)
    assert text.startswith(f"{ad / 'adapter_config.json'}: ") and found in text
    assert any(
        fix in text
        for fix in (
            "correct adapter_config.json or save the adapter again with PEFT",
            "repair the file or save the adapter again with PEFT",
            "use a plain LoRA adapter",
            "only LoRA adapters can be applied",
        )
    )


def test_every_config_problem_is_reported_at_once(tmp_path: Path) -> None:
    ad = handmade(tmp_path / "ad", '{"r": -1, "lora_alpha": "x", "alpha_pattern": {"[": 1}}', {})
    with pytest.raises(CheckpointError) as info:
        read_adapter(ad)
    text = str(info.value)
    cfg = ad / "adapter_config.json"
    assert text.startswith("3 problems reading the input models:\n")
    assert f"\n  - {cfg}: r is -1; expected a whole number of at least 1" in text
    assert f'\n  - {cfg}: lora_alpha is "x"; expected a finite number' in text
    assert f'\n  - {cfg}: alpha_pattern pattern "[" is not a regular expression' in text


def test_missing_settings_take_peft_defaults(adapters: dict[str, Any], tmp_path: Path) -> None:
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = shutil.copytree(adapters["chat"], tmp_path / "ad")  # rank 3
    cfg = json.loads((ad / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    read = read_adapter(ad)
    assert read.modules["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(8 / 3)
    want = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapters["base"]), ad)
        .merge_and_unload()
        .state_dict()
    )
    assert_same_as_peft(AdaptedCheckpoint(Checkpoint(adapters["base"]), read, "x"), want)


def test_a_whole_tensor_of_another_size_is_refused(adapters: dict[str, Any], tmp_path: Path) -> None:
    stored = "base_model.model.model.norm.modules_to_save.default.weight"
    ad = handmade(tmp_path / "ad", PLAIN, {stored: torch.ones(16)})
    with pytest.raises(CheckpointError) as info:
        AdaptedCheckpoint(Checkpoint(adapters["base"]), read_adapter(ad), "x")
    assert str(info.value) == (
        f"{ad / 'adapter_model.safetensors'}: {stored} has shape (16,), but model.norm.weight is (32,) in "
        f"{adapters['base']}; the adapter was made for a model of another size"
    )


def test_an_adapted_model_reads_its_base_through_the_adapter(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")
    adapter(base, tmp_path / "adapter", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    plain = Checkpoint(base)
    view: ModelSource = AdaptedCheckpoint(plain, read_adapter(tmp_path / "adapter"), "base+adapter")
    assert view.name == "base+adapter" and view.config == plain.config and view.dir == plain.dir
    assert view.dirs == [base, tmp_path / "adapter"]
    assert view.weight_files == [*plain.weight_files, tmp_path / "adapter" / "adapter_model.safetensors"]
    assert view.side_file("config.json") == plain.side_file("config.json") == base / "config.json"
    changed, kept = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert view.entry(changed) is None and plain.entry(changed) is not None
    assert view.entry(kept) == plain.entry(kept) is not None
