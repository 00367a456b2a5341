"""What each output architecture looks like: its config.json and its tensor names.

Source MLP tensors are ``model.layers.N.mlp.{gate,up,down}_proj.weight``; in the output:

- ``mixtral`` (MixtralForCausalLM): ``model.layers.N.block_sparse_moe.gate.weight`` [experts,
  hidden] and ``...block_sparse_moe.experts.E.{w1,w2,w3}.weight`` from gate, down and up_proj.
- ``qwen2_moe`` (Qwen2MoeForCausalLM): ``model.layers.N.mlp.gate.weight``,
  ``...mlp.experts.E.{gate,up,down}_proj.weight``, the one shared expert at
  ``...mlp.shared_expert.{gate,up,down}_proj.weight`` with its ``...mlp.shared_expert_gate.weight``
  [1, hidden]; q, k and v biases of zero where the base has none.
- ``qwen3_moe`` (Qwen3MoeForCausalLM): as qwen2_moe, without a shared expert.
- ``deepseek`` (DeepseekForCausalLM, DeepSeek-MoE's own code): as qwen2_moe, with at most one
  shared expert at ``...mlp.shared_experts.{gate,up,down}_proj.weight`` and no gate for it.
- ``glm4_moe`` (Glm4MoeForCausalLM, in transformers): DeepSeek-V3's MoE block (sigmoid router,
  ungated shared experts) with Llama attention. Names as qwen2_moe; the router's
  ``...mlp.gate.e_score_correction_bias`` is zero, and the shared experts are one MLP at
  ``...mlp.shared_experts.{gate,up,down}_proj.weight`` whose intermediate rows are theirs end to end
  (a sum of gated MLPs is one gated MLP of their joined rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LAYOUTS", "SOURCE_MLP", "Layout", "choose", "deepseek_config", "glm4_moe_config", "out_config"]

SOURCE_MLP = ("gate_proj", "up_proj", "down_proj")
MAX_SHARED = 8  # joined into one MLP tensor in memory while it is written
CARRIED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_dropout",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
)


@dataclass(frozen=True)
class Layout:
    name: str
    model_type: str
    class_name: str
    inputs: tuple[str, ...]  # model_type values it is built from
    block: str  # the MoE block of layer N: block.format(N)
    expert_names: tuple[str, str, str]  # output names of gate_proj, up_proj, down_proj
    shared: tuple[int, int]  # the fewest and most shared experts it takes
    shared_name: str = "shared_expert"
    shared_gated: bool = False  # whether its shared expert has a gate of its own
    shared_joined: bool = False  # whether its shared experts are one MLP of their joined rows
    router_bias: bool = False  # whether its router has a selection bias (written as zeros)
    # the order mergekit-moe writes (and draws noise_scale's noise for) a layer's expert tensors:
    # these source parts, each expert's three in turn, or with part_major each part for every
    # expert (then the shared one) in turn
    parts: tuple[str, str, str] = SOURCE_MLP
    part_major: bool = False

    def gate(self, layer: int) -> str:
        return f"{self.block.format(layer)}.gate.weight"

    def expert(self, layer: int, index: int, source: str) -> str:
        part = self.expert_names[SOURCE_MLP.index(source)]
        return f"{self.block.format(layer)}.experts.{index}.{part}.weight"

    def shared_expert(self, layer: int, source: str) -> str:
        return f"{self.block.format(layer)}.{self.shared_name}.{source}.weight"

    def shared_gate(self, layer: int) -> str:
        return f"{self.block.format(layer)}.shared_expert_gate.weight"

    def gate_bias(self, layer: int) -> str:
        return f"{self.block.format(layer)}.gate.e_score_correction_bias"


LAYOUTS = {
    "mixtral": Layout(
        "mixtral",
        "mixtral",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        "model.layers.{}.block_sparse_moe",
        ("w1", "w3", "w2"),
        (0, 0),
        parts=("gate_proj", "down_proj", "up_proj"),
    ),
    "qwen2_moe": Layout(
        "qwen2_moe",
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        ("llama", "mistral", "qwen2"),
        "model.layers.{}.mlp",
        SOURCE_MLP,
        (1, 1),
        shared_gated=True,
        parts=("down_proj", "gate_proj", "up_proj"),
        part_major=True,
    ),
    "qwen3_moe": Layout(
        "qwen3_moe",
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        ("qwen3",),
        "model.layers.{}.mlp",
        SOURCE_MLP,
        (0, 0),
    ),
    "deepseek": Layout(
        "deepseek",
        "deepseek",
        "DeepseekForCausalLM",
        ("llama", "mistral"),
        "model.layers.{}.mlp",
        SOURCE_MLP,
        (0, 1),
        shared_name="shared_experts",
        parts=("up_proj", "gate_proj", "down_proj"),
        part_major=True,
    ),
    "glm4_moe": Layout(
        "glm4_moe",
        "glm4_moe",
        "Glm4MoeForCausalLM",
        ("llama", "mistral", "qwen2"),
        "model.layers.{}.mlp",
        SOURCE_MLP,
        (1, MAX_SHARED),
        shared_name="shared_experts",
        shared_joined=True,
        router_bias=True,
    ),
}
# DeepSeek-MoE's configuration and modelling code, which transformers runs with trust_remote_code
DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base"


def choose(model_type: str, shared: int, shared_prompts: bool, gate_mode: str) -> str | None:
    """The architecture mergekit-moe picks when the config names none: the first that takes the
    models in the order mixtral, deepseek, qwen2_moe, qwen3_moe; then glm4_moe, which takes
    several shared experts."""
    for name in ("mixtral", "deepseek", "qwen2_moe", "qwen3_moe", "glm4_moe"):
        layout = LAYOUTS[name]
        low, high = layout.shared
        if model_type not in layout.inputs or not low <= shared <= high:
            continue
        if name in ("deepseek", "glm4_moe") and shared_prompts:
            continue  # its shared expert has no gate to make from prompts
        if name == "qwen2_moe" and not shared_prompts and gate_mode in ("hidden", "cheap_embed"):
            continue
        return name
    return None


def out_config(
    layout: Layout, base: dict[str, Any], experts: int, per_token: int, dtype: str
) -> dict[str, Any]:
    """config.json of the output: the base's sizes and settings, the MoE class and its settings."""
    cfg: dict[str, Any] = {"architectures": [layout.class_name], "model_type": layout.model_type}
    cfg.update({k: base[k] for k in CARRIED if k in base})
    cfg["num_experts_per_tok"] = per_token
    cfg["sliding_window"] = None
    if layout.name == "mixtral":
        cfg.pop("attention_bias", None)
        cfg["num_local_experts"] = experts
    else:
        cfg["num_experts"] = experts
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = []
        cfg["norm_topk_prob"] = True
        cfg["moe_intermediate_size"] = base["intermediate_size"]
        cfg["use_sliding_window"] = False
    if layout.name == "qwen2_moe":
        cfg.pop("attention_bias", None)
        cfg["qkv_bias"] = True
        cfg["shared_expert_intermediate_size"] = base["intermediate_size"]
    cfg["dtype"] = dtype
    return cfg


def deepseek_config(
    base: dict[str, Any], experts: int, shared: int, per_token: int, dtype: str
) -> dict[str, Any]:
    """config.json of a DeepSeek-MoE output: the base's, with DeepSeek's MoE settings and the
    pointer to its code."""
    cfg = dict(base)
    cfg.update(
        architectures=["DeepseekForCausalLM"],
        model_type="deepseek",
        n_routed_experts=experts,
        n_shared_experts=shared or None,
        num_experts_per_tok=per_token,
        first_k_dense_replace=0,
        moe_layer_freq=1,
        scoring_func="softmax",
        norm_topk_prob=True,
        moe_intermediate_size=base["intermediate_size"],
        auto_map={
            "AutoConfig": f"{DEEPSEEK_CODE}--configuration_deepseek.DeepseekConfig",
            "AutoModel": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekForCausalLM",
        },
        torch_dtype=dtype,
    )
    cfg.pop("dtype", None)
    return cfg


def glm4_moe_config(
    base: dict[str, Any], experts: int, shared: int, per_token: int, dtype: str, biased: bool
) -> dict[str, Any]:
    """config.json of a GLM-4-MoE output: the base's sizes, every layer a MoE layer, rotary
    embedding on the whole head and no q/k norms (Llama's attention), a plain top-k router over all
    experts (one group, no scaling), and q, k and v biases where the base has them."""
    cfg: dict[str, Any] = {"architectures": [LAYOUTS["glm4_moe"].class_name], "model_type": "glm4_moe"}
    cfg.update({k: base[k] for k in CARRIED if k in base})
    rope = dict(base.get("rope_parameters") or {"rope_type": "default"})
    if "rope_theta" not in rope:
        rope["rope_theta"] = base.get("rope_theta", 10000.0)
    if isinstance(base.get("rope_scaling"), dict):
        rope.update(base["rope_scaling"])
    rope["partial_rotary_factor"] = 1.0
    for key in ("rope_theta", "rope_scaling"):
        cfg.pop(key, None)
    cfg.update(
        rope_parameters=rope,
        partial_rotary_factor=1.0,
        n_routed_experts=experts,
        n_shared_experts=shared,
        num_experts_per_tok=per_token,
        moe_intermediate_size=base["intermediate_size"],
        first_k_dense_replace=0,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        use_qk_norm=False,
        attention_bias=biased,
        num_mtp_layers=0,
        dtype=dtype,
    )
    return cfg
