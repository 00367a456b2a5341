"""mergesmith moe: mergekit-moe's configs, checked whole; Mixtral and Qwen MoE outputs that
transformers loads; gates as mergekit-moe 0.1.5 computes them."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith.cli import main
from mergesmith.errors import ConfigError, OutputError
from mergesmith.moe import moe, plan_moe
from mergesmith.moe.gates import HIDDEN_DTYPE
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "zoo" / "models"
SKILLS = ("add", "rev", "sort", "shift")
# one prompt length per expert: the batch needs no padding, so each prompt can be run alone
PROMPTS = {
    "add": ["ad 47+38=", "ad 12+55="],
    "rev": ["rv kfqz=", "rv abcd="],
    "sort": ["so kfqz=", "so dcba="],
    "shift": ["sh kfqz=", "sh abcd="],
}


def zoo_config(tmp: Path, mode: str = "hidden", skills: tuple[str, ...] = SKILLS, **top: object) -> Path:
    lines = [f"base_model: {ZOO / 'base'}", f"gate_mode: {mode}"]
    lines += [f"{k}: {v}" for k, v in top.items()]
    lines.append("experts:")
    for s in skills:
        lines += [f"  - source_model: {ZOO / s}", f"    positive_prompts: {json.dumps(PROMPTS[s])}"]
    path = tmp / "moe.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mixtral")
    out = tmp / "out"
    moe(zoo_config(tmp, experts_per_token=2), out)
    return out


def test_mixtral_tensors_are_the_sources_exactly(mixtral: Path) -> None:
    state = tiny.load_state(mixtral)
    base = tiny.load_state(ZOO / "base")
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(state[name], t), name
    for e, skill in enumerate(SKILLS):
        src = tiny.load_state(ZOO / skill)
        for n in range(4):
            for out, part in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                got = state[f"model.layers.{n}.block_sparse_moe.experts.{e}.{out}.weight"]
                assert torch.equal(got, src[f"model.layers.{n}.mlp.{part}.weight"]), (skill, n, out)
    assert state["model.layers.0.block_sparse_moe.gate.weight"].shape == (4, 128)
    assert not any(".mlp." in k for k in state)
    cfg = json.loads((mixtral / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["dtype"]) == (4, 2, "float16")
    assert (mixtral / "tokenizer.json").read_bytes() == (ZOO / "base" / "tokenizer.json").read_bytes()
    assert (mixtral / ".mergesmith").is_file()


def test_hidden_gate_rows_are_the_mean_last_hidden_state_of_the_prompts(mixtral: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(ZOO / "base", dtype=HIDDEN_DTYPE).eval()
    tok = AutoTokenizer.from_pretrained(ZOO / "base")
    state = tiny.load_state(mixtral)
    for e, skill in enumerate(SKILLS):
        per_prompt = []
        for prompt in PROMPTS[skill]:
            ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
            with torch.no_grad():
                hs = base(ids, output_hidden_states=True).hidden_states
            per_prompt.append(torch.stack([h[0, -1].float() for h in hs[:4]]))  # the input of each layer
        mean = torch.stack(per_prompt).mean(dim=0)
        expected = mean / mean.norm(dim=-1, keepdim=True)
        for n in range(4):
            row = state[f"model.layers.{n}.block_sparse_moe.gate.weight"][e].float()
            # the model runs in bfloat16 (8 bits of mantissa), the rows are stored in float16
            assert torch.allclose(row, expected[n], atol=5e-3), (skill, n, (row - expected[n]).abs().max())
            assert math.isclose(row.norm().item(), 1.0, abs_tol=5e-3)


def test_transformers_runs_it_as_base_attention_with_the_expert_mlp(tmp_path: Path) -> None:
    """Two copies of one expert: whatever the routing, each token's MLP is that expert's, so the
    MoE computes what a Llama with the base's attention and the expert's MLP computes."""
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "same.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\ngate_mode: hidden\nexperts_per_token: 2\ndtype: float32\nexperts:\n"
        f"  - source_model: {ZOO / 'add'}\n    positive_prompts: ['ad 1+2=']\n"
        f"  - source_model: {ZOO / 'add'}\n    positive_prompts: ['rv abc=']\n"
    )
    said: list[str] = []
    moe(cfg, tmp_path / "out", say=said.append)
    assert [ln for ln in said if "warning: all 2 experts are the same model" in ln]
    got = load(tmp_path / "out")
    hand = AutoModelForCausalLM.from_pretrained(ZOO / "base", dtype=torch.float32).eval()
    add = tiny.load_state(ZOO / "add")
    hand.load_state_dict({k: v.float() for k, v in add.items() if ".mlp." in k}, strict=False)
    ids = torch.tensor([[1, 5, 9, 12, 20, 30, 7]])
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, hand(ids).logits, atol=1e-4)


def test_cheap_embed_rows_are_the_normalized_sum_of_token_embeddings(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    moe(zoo_config(tmp_path, "cheap_embed", ("add", "rev")), tmp_path / "out")
    state = tiny.load_state(tmp_path / "out")
    embed = tiny.load_state(ZOO / "base")["model.embed_tokens.weight"].float()
    tok = AutoTokenizer.from_pretrained(ZOO / "base")
    for e, skill in enumerate(("add", "rev")):
        ids = [i for p in PROMPTS[skill] for i in tok.encode(p, add_special_tokens=False)]
        summed = embed[ids].sum(dim=0)
        expected = (summed / summed.norm()).half()
        for n in range(4):
            assert torch.equal(state[f"model.layers.{n}.block_sparse_moe.gate.weight"][e], expected)


def test_random_gates_follow_the_seed(tmp_path: Path) -> None:
    moe(zoo_config(tmp_path, "random", ("add", "rev"), dtype="float32"), tmp_path / "a", seed=3)
    torch.manual_seed(3)
    expected = torch.randn((4, 2, 128))
    state = tiny.load_state(tmp_path / "a")
    for n in range(4):
        assert torch.equal(state[f"model.layers.{n}.block_sparse_moe.gate.weight"], expected[n])
    moe(zoo_config(tmp_path, "uniform_random", ("add", "rev"), dtype="float32"), tmp_path / "b", seed=3)
    rows = tiny.load_state(tmp_path / "b")["model.layers.0.block_sparse_moe.gate.weight"]
    assert rows.abs().max() <= 1 / math.sqrt(128)


def test_noise_and_residual_scale(tmp_path: Path) -> None:
    cfg = tmp_path / "scaled.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {ZOO / 'add'}\n    residual_scale: 0.5\n"
        f"  - source_model: {ZOO / 'rev'}\n    noise_scale: 0.01\n"
    )
    moe(cfg, tmp_path / "out")
    state = tiny.load_state(tmp_path / "out")
    add, rev = tiny.load_state(ZOO / "add"), tiny.load_state(ZOO / "rev")
    prefix = "model.layers.1.block_sparse_moe.experts"
    assert torch.equal(state[f"{prefix}.0.w2.weight"], add["model.layers.1.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(state[f"{prefix}.0.w1.weight"], add["model.layers.1.mlp.gate_proj.weight"])
    diff = (state[f"{prefix}.1.w1.weight"].float() - rev["model.layers.1.mlp.gate_proj.weight"].float()).std()
    assert 0.008 < diff.item() < 0.012
    # mergekit-moe's draws: one stream seeded with the seed, the random router rows first, then
    # each noisy tensor in its dtype, per layer and expert in the order gate, down, up
    stream = torch.Generator().manual_seed(0)
    torch.randn((4, 2, 128), generator=stream)
    for n in range(4):
        for part, out_name in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            src = rev[f"model.layers.{n}.mlp.{part}.weight"]
            expected = src + torch.randn(src.shape, dtype=src.dtype, generator=stream) * 0.01
            got = state[f"model.layers.{n}.block_sparse_moe.experts.1.{out_name}.weight"]
            assert torch.equal(got, expected.to(got.dtype)), (n, part)


def test_qwen2_moe_with_a_shared_expert(tmp_path: Path) -> None:
    cfg = tmp_path / "qwen.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\narchitecture: qwen\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {ZOO / 'add'}\n    positive_prompts: {json.dumps(PROMPTS['add'])}\n"
        f"  - source_model: {ZOO / 'rev'}\n    positive_prompts: {json.dumps(PROMPTS['rev'])}\n"
        f"shared_experts:\n  - source_model: {ZOO / 'sort'}\n    positive_prompts: {json.dumps(PROMPTS['sort'])}\n"
    )
    moe(cfg, tmp_path / "out")
    state = tiny.load_state(tmp_path / "out")
    sort = tiny.load_state(ZOO / "sort")
    assert torch.equal(
        state["model.layers.2.mlp.shared_expert.up_proj.weight"], sort["model.layers.2.mlp.up_proj.weight"]
    )
    assert state["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 128)
    assert state["model.layers.2.mlp.gate.weight"].shape == (2, 128)
    assert not state["model.layers.0.self_attn.k_proj.bias"].any()
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (cfg_out["num_experts"], cfg_out["moe_intermediate_size"], cfg_out["decoder_sparse_step"]) == (
        2,
        384,
        1,
    )
    model = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_deepseek_with_an_ungated_shared_expert(tmp_path: Path) -> None:
    cfg = tmp_path / "ds.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {ZOO / 'add'}\n    positive_prompts: {json.dumps(PROMPTS['add'])}\n"
        f"  - source_model: {ZOO / 'rev'}\n    positive_prompts: {json.dumps(PROMPTS['rev'])}\n"
        f"shared_experts:\n  - source_model: {ZOO / 'sort'}\n"
    )
    said: list[str] = []
    plan = moe(
        cfg, tmp_path / "out", say=said.append
    )  # one shared expert without prompts: deepseek, as mergekit-moe picks
    assert plan.layout.name == "deepseek"
    assert [ln for ln in said if ln.startswith("moe: note: the deepseek output") and "glm4_moe" in ln]
    state = tiny.load_state(tmp_path / "out")
    sort, rev = tiny.load_state(ZOO / "sort"), tiny.load_state(ZOO / "rev")
    for n in range(4):
        for part in ("gate_proj", "up_proj", "down_proj"):
            src = f"model.layers.{n}.mlp.{part}.weight"
            assert torch.equal(state[f"model.layers.{n}.mlp.shared_experts.{part}.weight"], sort[src])
            assert torch.equal(state[f"model.layers.{n}.mlp.experts.1.{part}.weight"], rev[src])
    assert state["model.layers.3.mlp.gate.weight"].shape == (2, 128)
    assert not any("shared_expert_gate" in k or "bias" in k for k in state)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["architectures"] == ["DeepseekForCausalLM"] and out["model_type"] == "deepseek"
    assert (out["n_routed_experts"], out["n_shared_experts"], out["num_experts_per_tok"]) == (2, 1, 1)
    assert (out["moe_intermediate_size"], out["first_k_dense_replace"], out["scoring_func"]) == (
        384,
        0,
        "softmax",
    )
    assert out["auto_map"]["AutoModelForCausalLM"].startswith("deepseek-ai/deepseek-moe-16b-base--")
    cfg.write_text(cfg.read_text() + "    positive_prompts: ['so abc=']\narchitecture: deepseek\n")
    with pytest.raises(
        ConfigError, match=r"line 10: shared_experts\[0\]: deepseek's shared experts have no gate"
    ):
        plan_moe(cfg)


def qwen2(root: Path) -> tuple[Path, ...]:
    """A tiny Qwen2 base (q, k and v biases) and three fine-tunes of it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tiny.VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    config = {**cfg.to_dict(), "architectures": ["Qwen2ForCausalLM"], "torch_dtype": "float32"}
    base = tiny.save(root / "q2-base", state, config, tokenizer=True)
    return (base, *(tiny.save(root / f"q2-{i}", tiny.finetune(state, i), config) for i in (1, 2, 3)))


def _joined_mlp(states: list[dict[str, torch.Tensor]], layers: int) -> dict[str, torch.Tensor]:
    """The MLPs of several models as one: gate and up rows stacked, down columns side by side."""
    out = {}
    for n in range(layers):
        for part, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            name = f"model.layers.{n}.mlp.{part}.weight"
            out[name] = torch.cat([s[name].float() for s in states], dim=axis)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_glm4_moe_with_several_shared_experts_runs_in_transformers(family: str, tmp_path: Path) -> None:
    """DeepSeek-V3's MoE block with Llama (or Qwen2) attention. Both routed experts are one model,
    so whatever the router picks, each token's MLP output is that model's plus every shared
    expert's: what a dense model computes whose MLP joins the three MLPs' rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family == "llama":
        base, a, b, c = ZOO / "base", ZOO / "add", ZOO / "sort", ZOO / "shift"
    else:
        base, a, b, c = qwen2(tmp_path)
    cfg = tmp_path / "glm.yml"
    cfg.write_text(
        f"base_model: {base}\narchitecture: glm4_moe\ngate_mode: hidden\nexperts_per_token: 2\n"
        f"dtype: float32\nexperts:\n"
        f"  - source_model: {a}\n    positive_prompts: ['ad 1+2=']\n"
        f"  - source_model: {a}\n    positive_prompts: ['rv abc=']\n"
        f"shared_experts:\n  - source_model: {b}\n  - source_model: {c}\n"
    )
    plan = moe(cfg, tmp_path / "out")
    assert plan.layout.name == "glm4_moe"
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["architectures"] == ["Glm4MoeForCausalLM"]
    assert (out_cfg["n_routed_experts"], out_cfg["n_shared_experts"], out_cfg["first_k_dense_replace"]) == (
        2,
        2,
        0,
    )
    assert out_cfg["attention_bias"] is (family == "qwen2")
    state = tiny.load_state(tmp_path / "out")
    sources = [tiny.load_state(p) for p in (base, a, b, c)]
    layers = int(out_cfg["num_hidden_layers"])
    joined = _joined_mlp(sources[2:], layers)
    for n in range(layers):
        for part in ("gate_proj", "up_proj", "down_proj"):
            src = f"model.layers.{n}.mlp.{part}.weight"
            assert torch.equal(state[f"model.layers.{n}.mlp.experts.1.{part}.weight"], sources[1][src])
            assert torch.equal(state[f"model.layers.{n}.mlp.shared_experts.{part}.weight"], joined[src])
        assert not state[f"model.layers.{n}.mlp.gate.e_score_correction_bias"].any()
    got = load(tmp_path / "out")
    dense = AutoConfig.from_pretrained(base)
    dense.intermediate_size *= 3
    hand = AutoModelForCausalLM.from_config(dense, dtype=torch.float32).eval()
    own = {k: v.float() for k, v in sources[0].items() if ".mlp." not in k}
    hand.load_state_dict({**own, **_joined_mlp([sources[1], *sources[2:]], layers)}, strict=False)
    ids = torch.tensor([[1, 5, 9, 12, 20, 30, 7]])
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, hand(ids).logits, atol=1e-4)
    if family == "llama":  # the routing report reads its router's choices
        from mergesmith.evaluate import load_task
        from mergesmith.moe.routing import routing

        task = tmp_path / "t.jsonl"
        task.write_text('{"prompt": "ad 4+3=", "answer": "7"}\n')
        shares = routing(tmp_path / "out", [load_task(task)], ["a", "a2"]).shares["t"]
        assert shares == [[1.0, 1.0]] * layers  # two experts per token, out of two


def test_glm4_moe_is_picked_for_several_shared_experts_and_refuses_their_prompts(tmp_path: Path) -> None:
    cfg = tmp_path / "glm.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\ngate_mode: random\nexperts:\n"
        f"  - source_model: {ZOO / 'add'}\n  - source_model: {ZOO / 'rev'}\n"
        f"shared_experts:\n  - source_model: {ZOO / 'sort'}\n  - source_model: {ZOO / 'shift'}\n"
    )
    assert plan_moe(cfg).layout.name == "glm4_moe"
    cfg.write_text(cfg.read_text() + "    positive_prompts: ['sh abc=']\n")
    with pytest.raises(ConfigError, match=r"line 1: no output architecture .* glm4_moe .* without prompts"):
        plan_moe(cfg)
    cfg.write_text(cfg.read_text() + "architecture: glm4_moe\n")
    with pytest.raises(
        ConfigError, match=r"line 8: shared_experts\[1\]: glm4_moe's shared experts have no gate"
    ):
        plan_moe(cfg)


def qwen3(root: Path) -> tuple[Path, Path, Path]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=len(tiny.VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in Qwen3ForCausalLM(cfg).state_dict().items()}
    config = {**cfg.to_dict(), "architectures": ["Qwen3ForCausalLM"], "torch_dtype": "float32"}
    return (
        tiny.save(root / "q-base", state, config, tokenizer=True),
        tiny.save(root / "q-a", tiny.finetune(state, 1), config),
        tiny.save(root / "q-b", tiny.finetune(state, 2), config),
    )


def test_qwen3_moe_from_qwen3_models(tmp_path: Path) -> None:
    base, a, b = qwen3(tmp_path)
    cfg = tmp_path / "q.yml"
    cfg.write_text(
        f"base_model: {base}\narchitecture: qwen3_moe\ngate_mode: hidden\nexperts:\n"
        f"  - source_model: {a}\n    positive_prompts: [abc]\n  - source_model: {b}\n    positive_prompts: [xyz]\n"
    )
    moe(cfg, tmp_path / "out")
    state = tiny.load_state(tmp_path / "out")
    src = tiny.load_state(b)
    assert torch.equal(
        state["model.layers.1.mlp.experts.1.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"]
    )
    assert torch.equal(
        state["model.layers.1.self_attn.q_norm.weight"],
        tiny.load_state(base)["model.layers.1.self_attn.q_norm.weight"],
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "Qwen3MoeForCausalLM"
    ]
    model = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_every_config_problem_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\n"  # 1
        "gate_mode: hiden\n"  # 2
        "experts_per_token: 3\n"  # 3
        "architecture: mixtral\n"  # 4
        "colour: red\n"  # 5
        "experts:\n"  # 6
        f"  - source_model: {ZOO / 'add'}\n"  # 7
        "    positive_prompts: ['ad 1+2=']\n"  # 8
        "    noise_scale: lots\n"  # 9
        f"  - source_model: {tmp_path / 'nowhere'}\n"  # 10
        "    positive_prompts: ['rv abc=']\n"  # 11
        "shared_experts:\n"  # 12
        f"  - source_model: {ZOO / 'sort'}\n"  # 13
    )
    with pytest.raises(ConfigError) as info:
        plan_moe(cfg)
    text = str(info.value)
    assert "6 problems in the config" in text, text
    for expected in (
        "line 2: gate_mode: unknown value 'hiden' (did you mean 'hidden'?)",
        "line 3: experts_per_token: 3 experts per token, but the config lists 2 expert(s)",
        "line 5: colour: unknown key",
        "line 9: experts[0].noise_scale: expected a finite number, found 'lots'",
        "line 10: experts[1].source_model: ",
        "line 12: shared_experts: architecture mixtral has no shared experts",
    ):
        assert expected in text, (expected, text)
    lines = [int(p.split(":")[0].removeprefix("line ")) for p in info.value.problems]
    assert lines == sorted(lines)


def test_experts_must_fit_the_base(tmp_path: Path, zoo: dict[str, Path]) -> None:
    cfg = tmp_path / "wide.yml"
    cfg.write_text(
        f"base_model: {zoo['base']}\ngate_mode: random\nexperts:\n"
        f"  - source_model: {zoo['a']}\n  - source_model: {zoo['wide']}\n"
    )
    with pytest.raises(ConfigError) as info:
        plan_moe(cfg)
    assert len(info.value.problems) == 1
    assert "line 5: experts[1]" in str(info.value)
    assert "hidden_size is 48, the base's is 32; experts must be fine-tunes of the base model" in str(
        info.value
    )
    cfg.write_text(cfg.read_text() + "gate_mod: random\n")
    with pytest.raises(ConfigError) as info:
        plan_moe(cfg)
    assert [p.split(":")[0] for p in info.value.problems] == ["line 5", "line 6"]
    assert "gate_mod: unknown key (did you mean 'gate_mode'?)" in str(info.value)
    qcfg = tmp_path / "q.yml"
    qcfg.write_text(
        f"base_model: {zoo['base']}\ngate_mode: random\narchitecture: qwen3_moe\nexperts:\n"
        f"  - source_model: {zoo['a']}\n"
    )
    with pytest.raises(
        ConfigError, match="architecture qwen3_moe is built from qwen3 models, and the base is llama"
    ):
        plan_moe(qcfg)
    qcfg.write_text(qcfg.read_text().replace("qwen3_moe", "qwen2_moe"))
    with pytest.raises(ConfigError, match="architecture qwen2_moe has 1 shared expert"):
        plan_moe(qcfg)
    qcfg.write_text(
        qcfg.read_text().replace("random", "hidden")
        + f"    positive_prompts: [abc]\nshared_experts:\n  - source_model: {zoo['b']}\n"
    )
    with pytest.raises(
        ConfigError, match=r"line 8: shared_experts\[0\]: qwen2_moe's shared expert has a gate"
    ):
        plan_moe(qcfg)


def test_a_base_with_biases_the_output_lacks_is_refused(tmp_path: Path) -> None:
    state, cfg = tiny.llama_state(0, attention_bias=True)
    base = tiny.save(tmp_path / "base", state, cfg)
    expert = tiny.save(tmp_path / "a", tiny.finetune(state, 1), cfg)
    moe_cfg = tmp_path / "bias.yml"
    moe_cfg.write_text(f"base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {expert}\n")
    with pytest.raises(
        ConfigError, match=r"has biases \(model\.layers\.0\.self_attn\.k_proj\.bias and 11 more\)"
    ):
        plan_moe(moe_cfg)
    moe_cfg.write_text(
        moe_cfg.read_text().replace("random", "random\narchitecture: qwen2_moe\nexperts_per_token: 1")
        + f"shared_experts:\n  - source_model: {expert}\n"
    )
    with pytest.raises(
        ConfigError, match=r"has biases \(model\.layers\.0\.self_attn\.o_proj\.bias and 2 more\)"
    ):
        plan_moe(moe_cfg)  # qwen2_moe keeps q, k and v biases, not o_proj's


def test_the_command_line_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = zoo_config(tmp_path, "random", ("add", "rev"))
    out = tmp_path / "out"
    assert main(["moe", str(cfg), str(out), "--threads", "1"]) == 0
    assert "built a MixtralForCausalLM of 2 experts" in capsys.readouterr().out
    assert main(["moe", str(cfg), str(out)]) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(["moe", str(cfg), str(out), "--force"]) == 0
    assert "moe: writing layer 4/4" in capsys.readouterr().err
    assert main(["moe", str(cfg), str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "MixtralForCausalLM from" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="was not written by mergesmith"):
        moe(cfg, foreign, force=True)
    bad = tmp_path / "bad.yml"
    bad.write_text("base_model: [1, 2]\nexperts: {}\n")
    assert main(["moe", str(bad), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "line 1: base_model: expected a model path or Hub id" in err
    assert "line 2: experts: expected a list of experts" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, layout", [("zoo_moe", "mixtral"), ("zoo_glm4_moe", "glm4_moe")])
def test_the_zoo_example_configs_are_valid(name: str, layout: str) -> None:
    import os

    here = Path.cwd()
    os.chdir(ROOT)
    try:
        plan = plan_moe(ROOT / "examples" / "moe" / f"{name}.yml")
    finally:
        os.chdir(here)
    assert [e.label for e in plan.config.experts] == list(SKILLS)
    assert plan.layout.name == layout
    assert sorted(p.stem for p in (ROOT / "examples" / "moe").glob("*.yml")) == ["zoo_glm4_moe", "zoo_moe"]


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("moe_differential", ROOT / "bench" / "moe_differential.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not Path("/tmp/mkvenv/bin/mergekit-moe").is_file(), reason="mergekit-moe not in /tmp/mkvenv"
)
@pytest.mark.parametrize("case", ["hidden", "cheap_embed", "random", "qwen2_moe", "deepseek"])
def test_same_output_as_mergekit_moe(case: str, tmp_path: Path) -> None:
    bench: object = _bench()
    result = bench.run_case(case, tmp_path, Path("/tmp/mkvenv"), in_process=True)  # type: ignore[attr-defined]
    assert result["same_layout"], result
    assert result["differ"] == [], result
    assert result["router_max_diff"] <= 1e-3, result
    assert result["exact"] > 0


def test_routing_report_counts_the_experts_the_routers_choose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesmith.evaluate import load_model, load_task
    from mergesmith.moe.routing import routing

    cfg = zoo_config(tmp_path, "hidden", ("add", "rev", "sort"), experts_per_token=1)
    task_file = tmp_path / "mixed.jsonl"
    task_file.write_text(
        '{"prompt": "ad 47+38=", "answer": "85"}\n{"prompt": "rv kfqz=", "answer": "zqfk"}\n'
        '{"prompt": "so dcba=", "answer": "abcd"}\n'
    )
    out = tmp_path / "out"
    assert main(["moe", str(cfg), str(out), "--report", str(task_file)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "moe: warning: the router rows of layer(s) 0" in captured.err  # every prompt ends in "="
    assert "## mixed (" in printed and "| layer | add | rev | sort |" in printed
    data = json.loads((out / "routing_report.json").read_text())
    assert (out / "routing_report.md").is_file()
    assert (out / "routing_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plot

    net, tok = load_model(out)
    state = tiny.load_state(out)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, n=n: inputs.__setitem__(n, o.detach())  # the routers' input
        )
        for n, layer in enumerate(net.model.layers)
    ]
    counts = torch.zeros(4, 3)
    tokens = 0
    for ex in load_task(task_file).examples:
        ids = tok(ex.prompt + ex.answer, return_tensors="pt")["input_ids"]
        tokens += ids.shape[1]
        with torch.no_grad():
            net(ids)
        for n in range(4):
            gate = state[f"model.layers.{n}.block_sparse_moe.gate.weight"].float()
            counts[n] += torch.bincount((inputs[n][0] @ gate.T).argmax(dim=-1), minlength=3)
    for h in hooks:
        h.remove()
    assert data["tokens"] == {"mixed": tokens}
    assert torch.allclose(torch.tensor(data["shares"]["mixed"]), counts / tokens)
    again = routing(out, [load_task(task_file)], ["add", "rev", "sort"])
    assert again.shares["mixed"] == data["shares"]["mixed"]


def test_an_expert_may_be_a_base_with_a_lora_adapter(tmp_path: Path) -> None:
    from mergesmith.config import ModelRef
    from mergesmith.plan import open_models

    ref = f"{ZOO / 'base'}+{ROOT / 'zoo' / 'adapters' / 'add'}"
    cfg = tmp_path / "lora.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {ref}\n  - source_model: {ZOO / 'rev'}\n"
    )
    moe(cfg, tmp_path / "out")
    adapted = open_models([ModelRef.parse(ref)])[0]
    state = tiny.load_state(tmp_path / "out")
    name = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(state["model.layers.2.block_sparse_moe.experts.0.w3.weight"], adapted.get(name).half())
    assert not torch.equal(adapted.get(name), tiny.load_state(ZOO / "base")[name])
    cfg.write_text(
        f"base_model: {ref}\ngate_mode: random\nexperts:\n  - source_model: {ZOO / 'rev'}\n"
        f"  - source_model: {ZOO / 'add'}\n"
    )
    with pytest.raises(ConfigError, match=r"line 1: base_model: .* cannot carry a LoRA adapter"):
        plan_moe(cfg)


def test_sharded_output_and_routing_of_a_qwen2_moe(tmp_path: Path) -> None:
    from mergesmith.evaluate import Example, Task
    from mergesmith.moe.routing import routing

    cfg = tmp_path / "qwen.yml"
    cfg.write_text(
        f"base_model: {ZOO / 'base'}\narchitecture: qwen2_moe\ngate_mode: random\nexperts:\n"
        f"  - source_model: {ZOO / 'add'}\n  - source_model: {ZOO / 'rev'}\n"
        f"shared_experts:\n  - source_model: {ZOO / 'sort'}\n"
    )
    moe(cfg, tmp_path / "one")
    moe(cfg, tmp_path / "many", max_shard_size="1MB")
    shards = sorted((tmp_path / "many").glob("*.safetensors"))
    assert len(shards) == 5 and shards[0].name == "model-00001-of-00005.safetensors"
    assert all(p.stat().st_size <= 1_000_000 + 10_000 for p in shards)  # 1MB of data and a header
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    one, many = tiny.load_state(tmp_path / "one"), tiny.load_state(tmp_path / "many")
    assert set(index["weight_map"]) == set(one) == set(many)
    assert all(torch.equal(one[k], many[k]) for k in one)
    load(tmp_path / "many")
    task = Task("t", (Example("ad 1+2=", "3"), Example("rv abc=", "cba")))
    report = routing(tmp_path / "many", [task], ["add", "rev"])
    assert report.per_token == 2 and report.tokens == {
        "t": len("ad 1+2=3") + len("rv abc=cba")
    }  # one per character
    assert report.shares["t"] == [[1.0, 1.0]] * 4  # two experts of two: every token goes to both


def test_a_tokenizer_that_cannot_pad_the_prompts_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(ZOO / "base", base)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    del tok_cfg["eos_token"], tok_cfg["pad_token"]
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = tmp_path / "nopad.yml"
    cfg.write_text(
        f"base_model: {base}\nexperts:\n"
        f"  - source_model: {ZOO / 'add'}\n    positive_prompts: ['ad 1+2=', 'ad 10+20=']\n"
        f"  - source_model: {ZOO / 'rev'}\n    positive_prompts: ['rv abc=']\n"
    )
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: the base model's tokenizer cannot encode the gate prompts (Asking to pad" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_base_merge_merges_the_experts_tensors_outside_their_mlps(tmp_path: Path) -> None:
    cfg = zoo_config(
        tmp_path,
        mode="random",
        skills=("add", "rev"),
        dtype="float32",
        base_merge="{merge_method: task_arithmetic, parameters: {weight: [0.25, 0.75]}}",
    )
    out = tmp_path / "out"
    moe(cfg, out)
    merged = tiny.load_state(out)
    base, add, rev = (tiny.load_state(ZOO / s) for s in ("base", "add", "rev"))
    layers = 4
    for name, value in merged.items():
        if ".block_sparse_moe." in name:
            continue
        parts = name.split(".")
        layer = int(parts[2]) if parts[1] == "layers" else None
        w = 0.25 if layer is None else 0.25 + 0.5 * layer / (layers - 1)  # the gradient, by layer
        expected = base[name].double() + w * (
            (add[name].double() - base[name]) + (rev[name].double() - base[name])
        )
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6, msg=name)
    e = "model.layers.2.block_sparse_moe.experts.1.w1.weight"
    assert torch.equal(merged[e], rev["model.layers.2.mlp.gate_proj.weight"].float())
    load(out)
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"library_name": "transformers", "tags": ["merge", "mergesmith", "moe"]}  # local inputs
    assert f"| 1 | {ZOO / 'rev'} | 2 |" in card and "merged by task_arithmetic (base_merge)" in card


def test_a_base_merge_with_a_bad_method_or_parameter_is_refused_with_its_line(tmp_path: Path) -> None:
    cfg = zoo_config(tmp_path, mode="random", skills=("add", "rev"), base_merge="{merge_method: tiess}")
    with pytest.raises(ConfigError) as info:
        plan_moe(cfg)
    assert "line 3: base_merge: " in str(info.value) and "tiess" in str(info.value)
    cfg = zoo_config(
        tmp_path, mode="random", skills=("add", "rev"), base_merge="{merge_method: ties, paramters: {}}"
    )
    with pytest.raises(ConfigError, match=r"base_merge\.paramters: unknown key"):
        plan_moe(cfg)


def test_the_output_is_written_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming: when a tensor reaches the writer, no tensor written before it is still alive, so
    the output holds one tensor in memory at a time whatever the model's size (the inputs are
    memory-mapped, the router rows are layers x experts x hidden)."""
    import gc
    import weakref

    from mergesmith._safetensors import ShardWriter

    written: list[weakref.ref[torch.Tensor]] = []
    alive_at_write: list[int] = []
    original = ShardWriter.write

    def write(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        gc.collect()
        alive_at_write.append(sum(ref() is not None for ref in written))
        written.append(weakref.ref(tensor))
        original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", write)
    cfg = zoo_config(tmp_path, "random", skills=SKILLS, dtype="float32")  # float32: every tensor a new one
    cfg.write_text(
        cfg.read_text()
        + f"shared_experts:\n  - source_model: {ZOO / 'base'}\n  - source_model: {ZOO / 'add'}\n"
    )
    plan = moe(cfg, tmp_path / "out", max_shard_size="2MB")
    assert plan.layout.name == "glm4_moe"
    assert len(written) == len(plan.tensors) > 90 and len(list((tmp_path / "out").glob("*.safetensors"))) > 2
    assert max(alive_at_write) == 0, alive_at_write


def test_a_base_whose_config_asks_for_a_billion_layers_is_refused_at_once(tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(ZOO / "base", base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    moe_cfg = tmp_path / "moe.yml"
    moe_cfg.write_text(
        f"base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {base}\n  - source_model: {ZOO / 'add'}\n"
    )
    with pytest.raises(ConfigError) as info:
        plan_moe(moe_cfg)
    assert info.value.problems == [
        f"{base}/config.json: num_hidden_layers is 1000000000, but the tensors of {base} hold 4 layers "
        "(model.layers.N); use the config.json that goes with these weights"
    ]
