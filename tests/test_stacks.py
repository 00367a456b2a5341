"""Each layer stack of a model has its own positions: a per-layer gradient spreads over the text
decoder's layers, and separately over the vision encoder's, the encoder's and the decoder's.

The checkpoints are made and saved by transformers itself (tests/tiny_transformers.py); the stacks
each one should have are written out by hand below, from the names transformers saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergesmith
from mergesmith.architecture import architecture_for
from mergesmith.stacks import derive, from_names
from tests import tiny
from tests.tiny_transformers import TYPES, make_tiny, quiet_transformers

DECODER = {"model.layers": 3}
STACKS: dict[str, dict[str, int]] = {
    "llama": DECODER,
    "qwen2": DECODER,
    "qwen3": DECODER,
    "gemma3": {"language_model.model.layers": 3, "vision_tower.encoder.layers": 2},
    "qwen2_vl": {"model.layers": 3, "visual.blocks": 2},  # visual.merger.mlp.{0,2} is no stack
    "qwen2_5_vl": {"model.layers": 3, "visual.blocks": 2},
    "llava": {"language_model.model.layers": 3, "vision_tower.encoder.layers": 2},
    "idefics3": {"model.text_model.layers": 3, "model.vision_model.encoder.layers": 2},
    "mllama": {
        "language_model.model.layers": 3,
        "vision_model.transformer.layers": 4,
        "vision_model.global_transformer.layers": 2,
    },
    "t5": {"encoder.block": 2, "decoder.block": 3},
    "bart": {"model.encoder.layers": 2, "model.decoder.layers": 3},
    "whisper": {"model.encoder.layers": 2, "model.decoder.layers": 3},
    "bert": {"bert.encoder.layer": 3},
    "mixtral": DECODER,
    "qwen3_moe": DECODER,
    "deepseek_v3": DECODER,
    "jamba": DECODER,
    "falcon_h1": DECODER,
    "lfm2": DECODER,
}


def expected_t(name: str, stacks: dict[str, int]) -> float:
    """A tensor's place in [0, 1] along its own stack; 0 for tensors outside every stack."""
    for prefix, count in stacks.items():
        if name.startswith(prefix + "."):
            return int(name[len(prefix) + 1 :].split(".")[0]) / (count - 1)
    return 0.0


def test_every_listed_model_type_has_its_stacks_written_out() -> None:
    assert set(STACKS) == set(TYPES)


@pytest.mark.parametrize("model_type", TYPES)
def test_a_gradient_runs_over_each_stack_by_its_own_positions(model_type: str, tmp_path: Path) -> None:
    import transformers

    auto = make_tiny(model_type, tmp_path / "a", seed=1)
    make_tiny(model_type, tmp_path / "b", seed=2)
    a, b = tiny.load_state(tmp_path / "a"), tiny.load_state(tmp_path / "b")
    plan = mergesmith.merge(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: [1, 0]}}\n"
        f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: [0, 1]}}\ndtype: float32\n",
        tmp_path / "out",
    )
    stacks = STACKS[model_type]
    assert {s.prefix: s.count for s in derive(plan.out_config, list(a)).stacks} == stacks
    merged = tiny.load_state(tmp_path / "out")
    assert set(merged) == set(a)
    for name, value in merged.items():  # weight (1 - t) on a and t on b, t by the tensor's own stack
        t = expected_t(name, stacks)
        expected = (1 - t) * a[name].double() + t * b[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6, msg=name)
    with quiet_transformers():
        model, info = getattr(transformers, auto).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert type(model).__name__ == plan.out_config["architectures"][0]


def test_modules_select_a_stack_of_a_sequence_to_sequence_model(tmp_path: Path) -> None:
    make_tiny("t5", tmp_path / "a", seed=1)
    make_tiny("t5", tmp_path / "b", seed=2)
    a, b = tiny.load_state(tmp_path / "a"), tiny.load_state(tmp_path / "b")
    mergesmith.merge(
        "merge_method: linear\nmodules:\n"
        f"  encoder.block:\n    models:\n      - model: {tmp_path / 'a'}\n        parameters: {{weight: 1}}\n"
        f"  decoder.block:\n    models:\n      - model: {tmp_path / 'b'}\n        parameters: {{weight: 1}}\n",
        tmp_path / "out",
    )
    merged = tiny.load_state(tmp_path / "out")
    for name, value in merged.items():  # tensors outside every stack go with the first module
        source = b if name.startswith("decoder.block.") else a
        assert torch.equal(value, source[name]), name


def test_a_stack_is_sliced_by_its_own_layers_and_its_count_key_rewritten(tmp_path: Path) -> None:
    import json

    from transformers import AutoModelForImageTextToText

    make_tiny("qwen2_vl", tmp_path / "a", seed=1)
    a = tiny.load_state(tmp_path / "a")
    src = tmp_path / "a"
    mergesmith.merge(
        "merge_method: passthrough\nmodules:\n"
        f"  model.layers:\n    slices:\n      - sources: [{{model: {src}, layer_range: [0, 3]}}]\n"
        f"      - sources: [{{model: {src}, layer_range: [2, 3]}}]\n"
        f"  visual.blocks:\n    models: [{{model: {src}}}]\n",
        tmp_path / "out",
    )
    merged = tiny.load_state(tmp_path / "out")
    for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight"):
        assert torch.equal(merged[f"model.layers.3.{suffix}"], a[f"model.layers.2.{suffix}"])
    assert torch.equal(merged["visual.blocks.1.attn.qkv.weight"], a["visual.blocks.1.attn.qkv.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["vision_config"]["depth"] == 2
    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert len(model.model.language_model.layers) == 4


def test_tied_and_vocabulary_tensors_come_from_the_definition(tmp_path: Path) -> None:
    make_tiny("t5", tmp_path / "t5", seed=1)
    keys = list(tiny.load_state(tmp_path / "t5"))
    import json

    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    arch = architecture_for(config, keys=keys)
    assert arch.tied["lm_head.weight"] == "shared.weight"
    assert {"shared.weight", "lm_head.weight"} <= set(arch.vocab_weights)
    assert arch.modules == ("encoder.block", "decoder.block")


def test_without_a_definition_each_name_prefix_is_its_own_stack() -> None:
    names = [f"text.layers.{i}.w" for i in range(4)] + [f"image.blocks.{i}.w" for i in range(2)]
    names += ["head.mlp.0.weight", "head.mlp.2.weight", "embed.weight"]
    assert [s.prefix for s in from_names(names).stacks] == ["text.layers", "image.blocks"]
    arch = architecture_for({"model_type": "not-a-transformers-type"}, keys=names)
    assert arch.modules == ("text.layers", "image.blocks")
    assert arch.module("image.blocks").layer_of("image.blocks.1.w") == 1
    assert arch.module("text.layers").layer_of("image.blocks.1.w") is None


def test_a_config_asking_for_a_million_layers_is_not_built() -> None:
    names = [f"model.layers.{i}.w" for i in range(2)]
    derived = derive({"model_type": "llama", "num_hidden_layers": 10**6}, names)
    assert derived.source == "tensor names"


def _word_tokenizer(directory: Path, tokens: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=tokens[0]).save_pretrained(str(directory))


def test_a_union_vocabulary_realigns_the_rows_of_a_vision_language_model(tmp_path: Path) -> None:
    import json

    from transformers import AutoModelForImageTextToText

    from tests.tiny_transformers import VOCAB

    tokens = [f"t{i}" for i in range(VOCAB)]
    make_tiny("qwen2_vl", tmp_path / "a", seed=1)
    _word_tokenizer(tmp_path / "a", tokens)
    make_tiny("qwen2_vl", tmp_path / "b", seed=2)  # b adds two tokens, with rows of their own
    b_state = tiny.load_state(tmp_path / "b")
    grown = {
        n: torch.cat([b_state[n], torch.randn(2, 32)])
        for n in ("model.embed_tokens.weight", "lm_head.weight")
    }
    b_config = json.loads((tmp_path / "b" / "config.json").read_text())
    b_config["text_config"]["vocab_size"] = VOCAB + 2
    b_dir = tiny.save(tmp_path / "b2", {**b_state, **grown}, b_config)
    _word_tokenizer(b_dir, [*tokens, "<img>", "<box>"])
    a = tiny.load_state(tmp_path / "a")
    text = (
        f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {tmp_path / 'a'}\n  - model: {b_dir}\n"
        "dtype: float32\ntokenizer_source: union\n"
    )
    with pytest.raises(mergesmith.CompatibilityError, match=r"text_config\.vocab_size"):
        mergesmith.validate(text.replace("tokenizer_source: union\n", ""))
    mergesmith.merge(text, tmp_path / "out")
    merged = tiny.load_state(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == VOCAB + 2
    for name, rows in grown.items():
        assert merged[name].shape[0] == VOCAB + 2
        torch.testing.assert_close(merged[name][:VOCAB], (a[name] + rows[:VOCAB]) / 2)
        torch.testing.assert_close(merged[name][VOCAB:], rows[VOCAB:])  # only b has them: b's rows
    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 2


def test_diagnose_keeps_the_layers_of_each_stack_apart(tmp_path: Path) -> None:
    from mergesmith.diagnose import diagnose

    for name, seed in (("base", 1), ("a", 2), ("b", 3)):
        make_tiny("qwen2_vl", tmp_path / name, seed=seed)
    report = diagnose(
        f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels:\n"
        f"  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1, density: 0.5}}\n"
        f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 1, density: 0.5}}\n",
        sample=0,
    )
    stacked = [k for k in report.layers if k not in ("embed", "other")]
    assert sorted(stacked) == sorted(
        [f"model.layers {i}" for i in range(3)] + [f"visual.blocks {i}" for i in range(2)]
    )


def test_multi_token_prediction_layers_after_the_decoder_take_the_gradients_last_value(
    tmp_path: Path,
) -> None:
    """DeepSeek-V3 stores its multi-token-prediction layer as ``model.layers.N`` after its N
    decoder layers (``num_nextn_predict_layers: 1``): the gradient spreads over the N decoder layers
    as for any model, and the extra layer takes its last value."""
    import json

    from safetensors.torch import save_file

    for name, seed in (("a", 1), ("b", 2)):
        make_tiny("deepseek_v3", tmp_path / name, seed=seed)
        state = tiny.load_state(tmp_path / name)
        extra = {
            k.replace("model.layers.2.", "model.layers.3."): v + 1
            for k, v in state.items()
            if ".layers.2." in k
        }
        extra["model.layers.3.eh_proj.weight"] = torch.randn(
            32, 64, generator=torch.Generator().manual_seed(seed)
        )
        save_file({**state, **extra}, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    config = (
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: [1, 0]}}\n"
    )
    config += f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: [0, 1]}}\ndtype: float32\n"

    def count_extra(n: int) -> None:
        for name in ("a", "b"):
            cfg_file = tmp_path / name / "config.json"
            cfg_file.write_text(
                json.dumps({**json.loads(cfg_file.read_text()), "num_nextn_predict_layers": n})
            )

    count_extra(0)  # a config that does not count the extra layer: a layer-count mismatch
    with pytest.raises(
        mergesmith.MergesmithError, match=r"num_hidden_layers is 3, but the tensors of .* hold 4"
    ):
        mergesmith.validate(config)
    count_extra(1)  # as DeepSeek-V3's config.json says
    mergesmith.merge(config, tmp_path / "out")
    a, b, merged = (tiny.load_state(tmp_path / n) for n in ("a", "b", "out"))
    assert any(k.startswith("model.layers.3.") for k in merged)
    for name, value in merged.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = 0.0 if layer is None else min(1.0, layer / 2)
        expected = (1 - t) * a[name].double() + t * b[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6, msg=name)
