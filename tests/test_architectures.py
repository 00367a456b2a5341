"""The architecture data against tiny real models of each family, built with transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith
from mergesmith.architecture import architecture_for
from tests import tiny

COMMON = {"vocab_size": 96, "max_position_embeddings": 64}
DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**DECODER, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {**DECODER, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {**DECODER, "num_key_value_heads": 2}),
    "gemma": ("GemmaConfig", {**DECODER, "num_key_value_heads": 2, "head_dim": 8}),
    "phi3": ("Phi3Config", {**DECODER, "num_key_value_heads": 2, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64}),
    "gpt_neox": ("GPTNeoXConfig", {**DECODER}),
}


def build(family: str, directory: Path) -> dict[str, torch.Tensor]:
    import transformers

    config_class, kwargs = FAMILIES[family]
    config = getattr(transformers, config_class)(**COMMON, **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return tiny.load_state(directory)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_numbers_come_from_the_family_naming(family: str, tmp_path: Path) -> None:
    import json

    state = build(family, tmp_path / family)
    config = json.loads((tmp_path / family / "config.json").read_text())
    arch = architecture_for(config)
    assert arch.name != "generic transformer", f"{family} is not described in architectures.json"
    assert arch.num_layers(config) == 3
    layers = {arch.layer_of(n) for n in state}
    assert layers == {None, 0, 1, 2}
    outside = [n for n in state if arch.layer_of(n) is None]
    assert any(arch.is_pre(n) for n in outside), outside
    assert all(
        n in arch.vocab_weights
        for n in outside
        if "emb" in n or n.endswith(("wte.weight", "embed_in.weight"))
    )
    name = next(n for n in state if arch.layer_of(n) == 1)
    assert arch.layer_of(arch.with_layer(name, 7)) == 7


@pytest.mark.parametrize("family", list(FAMILIES))
def test_passthrough_stack_of_each_family_loads(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = tmp_path / family
    state = build(family, src)
    out = tmp_path / "stacked"
    mergesmith.merge(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {src}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {src}\n        layer_range: [1, 3]\n",
        out,
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    merged = tiny.load_state(out)
    arch = architecture_for(model.config.to_dict())
    for name, value in state.items():
        if arch.layer_of(name) == 1:
            assert torch.equal(merged[arch.with_layer(name, 2)], value), name
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96)


def test_per_layer_config_lists_follow_the_stacked_layers(tmp_path: Path) -> None:
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    kinds = ["full_attention", "sliding_attention", "full_attention"]
    config = Qwen2Config(
        **COMMON,
        **DECODER,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        layer_types=kinds,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "src")
    out = tmp_path / "stacked"
    mergesmith.merge(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {tmp_path / 'src'}\n"
        f"        layer_range: [0, 2]\n  - sources:\n      - model: {tmp_path / 'src'}\n        layer_range: [1, 3]\n",
        out,
    )
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == [kinds[0], kinds[1], kinds[1], kinds[2]]
    assert written["num_hidden_layers"] == 4
