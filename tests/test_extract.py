"""LoRA extraction: full rank reproduces the fine-tune; low rank errs by the truncated-SVD bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesmith import CompatibilityError, ConfigError, MethodError, OutputError
from mergesmith.cli import main
from mergesmith.extract import extract_lora
from mergesmith.lora import AdaptedCheckpoint, read_adapter
from mergesmith.sources import Checkpoint
from tests import tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("extract")
    base, cfg = tiny.llama_state(3)
    tuned = tiny.finetune(base, 4)
    return tiny.save(root / "base", base, cfg), tiny.save(root / "tuned", tuned, cfg)


def test_full_rank_reproduces_the_fine_tune_and_peft_loads_it(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tuned = pair
    reports = extract_lora(base, tuned, tmp_path / "adapter", rank=64, save_others=True)
    assert all(r.relative_error < 1e-5 for r in reports)
    view = AdaptedCheckpoint(Checkpoint(base), read_adapter(tmp_path / "adapter"), "x")
    want = tiny.load_state(tuned)
    for name, value in want.items():
        torch.testing.assert_close(view.get(name), value, rtol=1e-4, atol=1e-5, msg=name)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    for name, value in want.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_low_rank_error_is_the_truncated_svd_bound(
    pair: tuple[Path, Path], tmp_path: Path, rank: int
) -> None:
    base, tuned = pair
    reports = {r.module: r for r in extract_lora(base, tuned, tmp_path / "adapter", rank=rank)}
    b, t = tiny.load_state(base), tiny.load_state(tuned)
    view = AdaptedCheckpoint(Checkpoint(base), read_adapter(tmp_path / "adapter"), "x")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        name = f"{module}.weight"
        delta = (t[name] - b[name]).double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        bound = np.sqrt((s[rank:] ** 2).sum() / (s**2).sum())
        got = (view.get(name) - b[name]).double().numpy()
        error = np.linalg.norm(delta - got) / np.linalg.norm(delta)
        assert reports[module].rank == rank
        assert reports[module].relative_error == pytest.approx(bound, rel=1e-4)
        assert error == pytest.approx(bound, rel=1e-3)
    assert "model.embed_tokens.weight" not in view.adapter.replaced  # skipped without save_others


def test_energy_picks_the_smallest_rank_per_module(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    reports = extract_lora(base, tuned, tmp_path / "adapter", energy=0.5)
    b, t = tiny.load_state(base), tiny.load_state(tuned)
    for r in reports:
        name = f"{r.module}.weight"
        s = np.linalg.svd((t[name] - b[name]).double().numpy(), compute_uv=False)
        share = np.cumsum(s**2) / (s**2).sum()
        assert r.rank == int(np.argmax(share >= 0.5)) + 1
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] or len({r.rank for r in reports}) == 1


def test_cli_extract_and_its_errors(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = pair
    assert main(["lora", "extract", str(base), str(tuned), str(tmp_path / "a"), "--rank", "2"]) == 0
    assert "extracted 21 modules into" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="rank must be at least 1, found 0"):
        extract_lora(base, tuned, tmp_path / "b", rank=0)
    with pytest.raises(OutputError):
        extract_lora(base, tuned, tuned / "adapter", rank=2)
    assert not (tuned / "adapter").exists()


def test_gpt2_conv1d_weights_are_extracted_with_fan_in_fan_out(tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=32)
    ).save_pretrained(tmp_path / "base")
    state = tiny.finetune(tiny.load_state(tmp_path / "base"), 5)
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    save_file(state, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", rank=32)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    merged = model.merge_and_unload().state_dict()
    name = "transformer.h.1.attn.c_attn.weight"
    torch.testing.assert_close(merged[name], state[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_model_holding_nan_or_inf_is_refused_naming_the_tensor(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float
) -> None:
    base, tuned = pair
    state = tiny.load_state(tuned)
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][0, :3] = value
    bad = tiny.save(tmp_path / "bad", state, json.loads((tuned / "config.json").read_text()))
    out = tmp_path / "adapter"
    assert main(["lora", "extract", str(base), str(bad), str(out), "--rank", "2"]) == 1
    assert capsys.readouterr().err == (
        f"error: {bad}: tensor {name} holds 3 NaN or infinite values, which no adapter can reproduce; "
        "repair or replace that model\n"
    )
    assert not out.exists()
    # the same from the base's side, and for tensors stored whole
    assert main(["lora", "extract", str(bad), str(tuned), str(out), "--rank", "2", "--save-others"]) == 1
    assert f"error: {bad}: tensor {name} holds 3 NaN" in capsys.readouterr().err
    state = tiny.load_state(tuned)
    state["model.norm.weight"][5] = value
    norm = tiny.save(tmp_path / "norm", state, json.loads((tuned / "config.json").read_text()))
    assert main(["lora", "extract", str(base), str(norm), str(out), "--rank", "2", "--save-others"]) == 1
    assert f"error: {norm}: tensor model.norm.weight holds 1 NaN" in capsys.readouterr().err
    assert not out.exists()


def test_a_difference_that_overflows_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    config = json.loads((tuned / "config.json").read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    low, high = tiny.load_state(base), tiny.load_state(tuned)
    low[name][1, 1], high[name][1, 1] = -3e38, 3e38
    with pytest.raises(MethodError) as info:
        extract_lora(
            tiny.save(tmp_path / "low", low, config),
            tiny.save(tmp_path / "high", high, config),
            tmp_path / "a",
            rank=2,
        )
    assert str(info.value) == (
        f"{name}: the difference between {tmp_path / 'high'} and {tmp_path / 'low'} overflows float32; "
        "extract from the model's own base"
    )
    assert not (tmp_path / "a").exists()


def test_tensor_names_from_the_files_are_printed_escaped(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    state = tiny.load_state(tuned)
    state["model.evil\x1b[2J.weight"] = torch.ones(2)
    odd = tiny.save(tmp_path / "odd", state, json.loads((tuned / "config.json").read_text()))
    with pytest.raises(CompatibilityError) as info:
        extract_lora(base, odd, tmp_path / "a", rank=2)
    assert str(info.value) == (
        f"model.evil\\x1b[2J.weight: in {odd} but not in {base}; extract from the model's own base"
    )
