"""Layer surgery: passthrough with slices stacks layer ranges of several models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mergesmith
from mergesmith import ConfigError
from tests import tiny


def stack_config(zoo: dict[str, Path], extra: str = "") -> str:
    return f"""
slices:
  - sources:
      - model: {zoo["a"]}
        layer_range: [0, 2]
  - sources:
      - model: {zoo["b"]}
        layer_range: [1, 3]
merge_method: passthrough
{extra}"""


def test_passthrough_stacks_layer_ranges_and_transformers_loads_it(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "stacked"
    mergesmith.merge(stack_config(zoo), out)
    merged = tiny.load_state(out)
    a, b = tiny.load_state(zoo["a"]), tiny.load_state(zoo["b"])
    # layers 0, 1 from a's 0, 1; layers 2, 3 from b's 1, 2; bit for bit
    for out_layer, (src, src_layer) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        prefix = f"model.layers.{src_layer}."
        names = [n for n in src if n.startswith(prefix)]
        assert names
        for name in names:
            got = merged[name.replace(prefix, f"model.layers.{out_layer}.")]
            assert got.dtype == src[name].dtype
            assert torch.equal(got, src[name]), name
    # embeddings from the first slice's model, final norm and head from the last one's
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    assert not any(n.startswith("model.layers.4.") for n in merged)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config["vocab_size"])
    assert bool(torch.isfinite(logits).all())


def test_passthrough_scale_multiplies_the_filtered_tensors(zoo: dict[str, Path], tmp_path: Path) -> None:
    extra = "parameters:\n  scale:\n    - filter: o_proj\n      value: 0\n    - value: 1\n"
    out = tmp_path / "scaled"
    mergesmith.merge(stack_config(zoo, extra), out)
    merged, b = tiny.load_state(out), tiny.load_state(zoo["b"])
    assert not merged["model.layers.3.self_attn.o_proj.weight"].any()
    assert torch.equal(
        merged["model.layers.3.mlp.down_proj.weight"], b["model.layers.2.mlp.down_proj.weight"]
    )


def test_passthrough_of_one_model_copies_it(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    mergesmith.merge(f"merge_method: passthrough\nmodels:\n  - model: {zoo['b']}\n", out)
    merged, b = tiny.load_state(out), tiny.load_state(zoo["b"])
    assert merged.keys() == b.keys()
    assert all(torch.equal(merged[n], b[n]) for n in b)


def test_passthrough_slice_with_two_sources_is_refused(zoo: dict[str, Path]) -> None:
    text = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {zoo['a']}\n        layer_range: [0, 2]\n"
        f"      - model: {zoo['b']}\n        layer_range: [0, 2]\n"
    )
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    assert str(info.value).endswith("slices[0].sources: passthrough takes exactly 1 model; found 2")
