"""mergekit's modules: form on multimodal architectures: a text decoder, a vision tower and a
projector merged each with its own models and parameters, gradients over each module's own layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergesmith.cli import main
from mergesmith.config import load_config
from mergesmith.errors import ConfigError
from mergesmith.plan import build_plan
from tests import tiny

TEXT_LAYERS = 4
VISION_LAYERS = 3
TEXT_LAYER = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.up_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
]
VISION_LAYER = [
    "ffn_norm",
    "feed_forward.down_proj",
    "feed_forward.gate_proj",
    "feed_forward.up_proj",
    "attention_norm",
    "attention.k_proj",
    "attention.o_proj",
    "attention.q_proj",
    "attention.v_proj",
]


def mistral3_names() -> list[str]:
    """The tensor names of a Mistral 3 vision-language checkpoint (as mergekit's definition has them)."""
    names = ["language_model.model.embed_tokens.weight", "language_model.model.norm.weight"]
    names.append("language_model.lm_head.weight")
    names += [f"language_model.model.layers.{i}.{w}.weight" for i in range(TEXT_LAYERS) for w in TEXT_LAYER]
    names += ["vision_tower.patch_conv.weight", "vision_tower.ln_pre.weight"]
    names += [
        f"vision_tower.transformer.layers.{i}.{w}.weight" for i in range(VISION_LAYERS) for w in VISION_LAYER
    ]
    names += [
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.weight",
        "multi_modal_projector.norm.weight",
        "multi_modal_projector.patch_merger.merging_layer.weight",
    ]
    return names


def mistral3_config() -> dict[str, object]:
    return {
        "model_type": "mistral3",
        "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": {
            "model_type": "mistral",
            "num_hidden_layers": TEXT_LAYERS,
            "hidden_size": 4,
            "vocab_size": 8,
        },
        "vision_config": {"model_type": "pixtral", "num_hidden_layers": VISION_LAYERS, "hidden_size": 4},
        "torch_dtype": "float32",
    }


def tiny_mistral3(root: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = {
        n: torch.randn((8, 4) if "embed_tokens" in n or "lm_head" in n else (4, 4), generator=gen)
        for n in mistral3_names()
    }
    return tiny.save(root / f"m{seed}", state, mistral3_config())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mm")
    return tiny_mistral3(root, 1), tiny_mistral3(root, 2)


def grad(values: list[float], t: float) -> float:
    """A gradient's value at t in [0, 1], interpolated over its evenly spaced knots."""
    pos = t * (len(values) - 1)
    i = min(int(pos), len(values) - 2)
    return values[i] + (pos - i) * (values[i + 1] - values[i])


def layer_t(name: str) -> float:
    """t of a tensor: its layer over its own module's layer count; 0 outside the layer stacks."""
    for prefix, count in (
        ("language_model.model.layers.", TEXT_LAYERS),
        ("vision_tower.transformer.layers.", VISION_LAYERS),
    ):
        if name.startswith(prefix):
            return int(name[len(prefix) :].split(".")[0]) / (count - 1)
    return 0.0


MODULES_YAML = """merge_method: linear
parameters: {{weight: 0.5}}
modules:
  text_decoder:
    models:
      - model: {a}
        parameters: {{weight: [0.8, 0.2]}}
      - model: {b}
        parameters: {{weight: 0.2}}
  vision_tower:
    models:
      - model: {a}
        parameters: {{weight: 0.1}}
      - model: {b}
        parameters: {{weight: 0.9}}
  multi_modal_projector:
    models: [{a}, {b}]
"""


def expected_weights(name: str) -> tuple[float, float]:
    if name.startswith("vision_tower."):
        return 0.1, 0.9
    if name.startswith("multi_modal_projector."):
        return 0.5, 0.5
    return grad([0.8, 0.2], layer_t(name)), 0.2


def test_each_module_merges_with_its_own_models_and_parameters(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = pair
    cfg = tmp_path / "merge.yml"
    cfg.write_text(MODULES_YAML.format(a=a, b=b))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    got, sa, sb = tiny.load_state(out), tiny.load_state(a), tiny.load_state(b)
    assert sorted(got) == sorted(mistral3_names())
    for name in mistral3_names():
        wa, wb = expected_weights(name)
        want = (wa * sa[name] + wb * sb[name]) / (wa + wb)
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_without_modules_every_module_merges_with_its_own_layer_count(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = pair
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [1.0, 0.0]}}\n"
        f"  - model: {b}\n    parameters: {{weight: [0.0, 1.0]}}\n"
    )
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    got, sa, sb = tiny.load_state(out), tiny.load_state(a), tiny.load_state(b)
    assert sorted(got) == sorted(mistral3_names())
    for name in mistral3_names():
        t = layer_t(name)
        want = (1 - t) * sa[name] + t * sb[name]
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6, msg=name)
    # the vision tower's last layer is its end of the gradient, though the text decoder is longer
    last = f"vision_tower.transformer.layers.{VISION_LAYERS - 1}.attention.q_proj.weight"
    torch.testing.assert_close(got[last], sb[last])


def test_module_parameters_are_the_modules_own(pair: tuple[Path, Path]) -> None:
    a, b = pair
    config = load_config(MODULES_YAML.format(a=a, b=b))
    assert [name for name, _ in config.module_configs] == [
        "text_decoder",
        "vision_tower",
        "multi_modal_projector",
    ]
    jobs = {j.name: j for j in build_plan(config).jobs}
    assert sorted(jobs) == sorted(mistral3_names())
    # each job's layer and t are its module's: the vision tower's last layer is t = 1
    last = jobs[f"vision_tower.transformer.layers.{VISION_LAYERS - 1}.ffn_norm.weight"]
    assert (last.layer, last.t) == (VISION_LAYERS - 1, 1.0)
    text = jobs["language_model.model.layers.1.mlp.up_proj.weight"]
    assert (text.layer, text.t) == (1, 1 / (TEXT_LAYERS - 1))
    assert [dict(p) for p in jobs["vision_tower.ln_pre.weight"].model_params] == [
        {"weight": 0.1},
        {"weight": 0.9},
    ]
    assert [dict(p) for p in jobs["multi_modal_projector.norm.weight"].model_params] == [
        {"weight": 0.5},
        {"weight": 0.5},
    ]


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_plan(load_config(text))
    return str(info.value)


def test_an_unknown_module_is_refused_with_the_known_ones(pair: tuple[Path, Path]) -> None:
    a, b = pair
    text = MODULES_YAML.format(a=a, b=b).replace("vision_tower:", "vision_encoder:")
    assert refusal(text) == (
        "<config>: line 10: modules.vision_encoder: the Mistral 3 (vision-language) architecture has no module "
        "'vision_encoder'; its modules: text_decoder, multi_modal_projector, vision_tower"
    )


def test_every_module_must_be_named(pair: tuple[Path, Path]) -> None:
    a, b = pair
    text = MODULES_YAML.format(a=a, b=b).split("  vision_tower:")[0]
    assert refusal(text) == (
        "<config>: line 4: modules: the Mistral 3 (vision-language) architecture's modules "
        "multi_modal_projector, vision_tower are not given; name every module (text_decoder, "
        "multi_modal_projector, vision_tower), as the output holds the tensors of every module"
    )


def test_slices_need_modules_on_a_multimodal_architecture(pair: tuple[Path, Path]) -> None:
    a, _ = pair
    text = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
    )
    assert refusal(text) == (
        "<config>: slices: the Mistral 3 (vision-language) architecture has several modules (text_decoder, "
        "multi_modal_projector, vision_tower); give slices per module under modules:"
    )


def test_a_modules_config_is_checked_module_by_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        "merge_method: linear\nmodules:\n  text_decoder:\n    models:\n      - model: ./a\n"
        "        parameters: {weight: 1}\n  vision_tower:\n    models: [./a]\n"
    )
    assert main(["validate", str(cfg)]) == 1
    assert capsys.readouterr().err == (
        f"error: {cfg}: line 8: modules.vision_tower.models[0].parameters.weight: missing: linear needs a "
        "weight for ./a (this model's coefficient)\n"
    )


def test_llava_modules_split_by_prefix() -> None:
    from mergesmith.architecture import architecture_for

    arch = architecture_for({"model_type": "llava"})
    assert arch.modules == ("text_decoder", "vision_tower", "multi_modal_projector")
    vision = arch.module("vision_tower")
    name = "vision_tower.vision_model.encoder.layers.5.self_attn.q_proj.weight"
    assert arch.module_of(name) == "vision_tower" and vision.layer_of(name) == 5
    assert vision.num_layers({"vision_config": {"num_hidden_layers": 24}}) == 24
    assert arch.module("text_decoder").num_layers({"text_config": {"num_hidden_layers": 32}}) == 32
    assert arch.module_of("multi_modal_projector.linear_1.weight") == "multi_modal_projector"
    assert arch.module("multi_modal_projector").layer_of("multi_modal_projector.linear_1.weight") is None
    assert arch.module_of("image_newline") == "text_decoder"  # under no prefix: the first module


def test_a_layout_the_row_does_not_describe_is_read_from_the_model_definition(tmp_path: Path) -> None:
    # transformers 4.52+ names Mistral 3 tensors model.language_model. / model.vision_tower.: not the
    # layout of the architectures.json row, so the stacks come from transformers' definition instead
    state = {
        "model." + n.replace("language_model.model.", "language_model."): torch.ones(4, 4)
        for n in mistral3_names()
    }
    state = {n.replace("model.language_model.lm_head", "lm_head"): v for n, v in state.items()}
    a = tiny.save(tmp_path / "new", state, mistral3_config())
    plan = build_plan(
        load_config(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [1, 2]}}\n")
    )
    assert plan.arch.modules == ("model.language_model.layers", "model.vision_tower.transformer.layers")
    t = {job.name: job.t for job in plan.jobs}
    assert len(t) == len(state)
    for name in state:  # each stack's layers spread over [0, 1] by that stack's own count
        parts = name.split(".")
        if name.startswith("model.language_model.layers."):
            expected = int(parts[3]) / (TEXT_LAYERS - 1)
        elif name.startswith("model.vision_tower.transformer.layers."):
            expected = int(parts[4]) / (VISION_LAYERS - 1)
        else:
            expected = 0.0
        assert t[name] == pytest.approx(expected), name


SLICES_YAML = """merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 2]}}]
      - sources: [{{model: {b}, layer_range: [1, 4]}}]
  vision_tower:
    models: [{{model: {b}}}]
  multi_modal_projector:
    models: [{{model: {a}}}]
"""


def test_a_module_s_slices_stack_its_layers_and_rewrite_its_layer_count(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    import json

    a, b = pair
    cfg = tmp_path / "merge.yml"
    cfg.write_text(SLICES_YAML.format(a=a, b=b))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    got, sa, sb = tiny.load_state(out), tiny.load_state(a), tiny.load_state(b)
    text = "language_model.model.layers."
    sources = [(sa, 0), (sa, 1), (sb, 1), (sb, 2), (sb, 3)]
    want = {
        f"{text}{i}.{w}.weight": s[f"{text}{j}.{w}.weight"]
        for i, (s, j) in enumerate(sources)
        for w in TEXT_LAYER
    }
    for name in mistral3_names():
        if name.startswith(text):
            continue
        first = name.startswith(("multi_modal_projector.", "language_model.model.embed_tokens"))
        want[name] = (sa if first else sb)[
            name
        ]  # pre-layer tensors from the first slice, the rest from the last
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    written = json.loads((out / "config.json").read_text())
    assert written["text_config"]["num_hidden_layers"] == 5
    assert written["vision_config"]["num_hidden_layers"] == VISION_LAYERS


GEMMA_TEXT = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.q_norm",
    "self_attn.k_proj",
    "self_attn.k_norm",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "mlp.up_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
    "post_feedforward_layernorm",
]
GEMMA_VISION_PARTS = ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", "self_attn.k_proj"]
GEMMA_VISION_PARTS += ["self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj"]
GEMMA_VISION = [f"{w}.{k}" for w in GEMMA_VISION_PARTS for k in ("bias", "weight")]


def gemma3_names() -> list[str]:
    """A Gemma 3 vision-language checkpoint's tensor names (lm_head tied to the embeddings, so absent)."""
    names = ["language_model.model.embed_tokens.weight", "language_model.model.norm.weight"]
    names += [f"language_model.model.layers.{i}.{w}.weight" for i in range(TEXT_LAYERS) for w in GEMMA_TEXT]
    vision = "vision_tower.vision_model."
    names += [f"{vision}embeddings.{w}" for w in ("patch_embedding.bias", "patch_embedding.weight")]
    names += [f"{vision}embeddings.position_embedding.weight", f"{vision}post_layernorm.bias"]
    names += [f"{vision}post_layernorm.weight"]
    names += [f"{vision}encoder.layers.{i}.{w}" for i in range(VISION_LAYERS) for w in GEMMA_VISION]
    names += [
        "multi_modal_projector.mm_input_projection_weight",
        "multi_modal_projector.mm_soft_emb_norm.weight",
    ]
    return names


def tiny_gemma3(root: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = {n: torch.randn((8, 4) if "embed_tokens" in n else (4, 4), generator=gen) for n in gemma3_names()}
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"model_type": "gemma3_text", "num_hidden_layers": TEXT_LAYERS, "vocab_size": 8},
        "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": VISION_LAYERS},
        "torch_dtype": "float32",
    }
    return tiny.save(root / f"g{seed}", state, config)


def gemma_t(name: str) -> float:
    for prefix, count in (
        ("language_model.model.layers.", TEXT_LAYERS),
        ("vision_tower.vision_model.encoder.layers.", VISION_LAYERS),
    ):
        if name.startswith(prefix):
            return int(name[len(prefix) :].split(".")[0]) / (count - 1)
    return 0.0


def test_gemma3_modules_merge_by_prefix_with_their_own_layer_counts(tmp_path: Path) -> None:
    a, b = tiny_gemma3(tmp_path, 1), tiny_gemma3(tmp_path, 2)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        MODULES_YAML.format(a=a, b=b).replace("parameters: {weight: 0.9}", "parameters: {weight: [0.9, 0.1]}")
    )
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    got, sa, sb = tiny.load_state(out), tiny.load_state(a), tiny.load_state(b)
    assert sorted(got) == sorted(gemma3_names())
    for name in gemma3_names():
        t = gemma_t(name)
        if name.startswith("vision_tower."):
            wa, wb = 0.1, grad([0.9, 0.1], t)
        elif name.startswith("multi_modal_projector."):
            wa, wb = 0.5, 0.5
        else:
            wa, wb = grad([0.8, 0.2], t), 0.2
        torch.testing.assert_close(got[name], (wa * sa[name] + wb * sb[name]) / (wa + wb), msg=name)


def test_a_module_layer_count_that_disagrees_with_its_tensors_is_refused_for_gradients(
    tmp_path: Path,
) -> None:
    import json

    from mergesmith.errors import CompatibilityError

    a = tiny_mistral3(tmp_path, 1)
    config = json.loads((a / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 5
    (a / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompatibilityError) as info:
        build_plan(
            load_config(
                f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [1, 0.5]}}\n"
            )
        )
    assert str(info.value) == (
        f"{a / 'config.json'}: vision_config.num_hidden_layers is 5, but the tensors of {a} hold 3 layers; "
        "gradients are placed by layer, so they would be wrong: set vision_config.num_hidden_layers to 3 in "
        "config.json, or use the checkpoint that goes with this config.json"
    )
