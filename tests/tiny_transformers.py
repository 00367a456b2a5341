"""Tiny random Hugging Face checkpoints, one per model type, built and saved by transformers itself.

``make_tiny(model_type, path, seed)`` constructs a randomly initialised model with a few kilobytes
of weights, saves it with ``save_pretrained`` (safetensors, float32) and returns the name of the
transformers Auto class that loads it back.  Tensor names are whatever transformers writes.

Every stack has its own layer count (text decoder 3, vision encoder 2 or 4, seq2seq encoder 2 and
decoder 3, mllama's local and global vision stacks 4 and 2), so that code which confuses the layer
positions of two stacks cannot pass by coincidence.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mergesmith.stacks import CHECKED_TYPES

TYPES = CHECKED_TYPES  # the model types docs/models.md lists as checked stack by stack

VOCAB = 128
HIDDEN = 32
TEXT_LAYERS = 3
VISION_LAYERS = 2

# Token ids the multimodal configs need; all inside the tiny vocabulary.
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN = VOCAB - 1
VIDEO_TOKEN = VOCAB - 2
VISION_START = VOCAB - 3
VISION_END = VOCAB - 4

_CAUSAL = "AutoModelForCausalLM"
_IMAGE_TEXT = "AutoModelForImageTextToText"
_SEQ2SEQ = "AutoModelForSeq2SeqLM"
_SPEECH = "AutoModelForSpeechSeq2Seq"
_MASKED = "AutoModelForMaskedLM"


def _text(**overrides: Any) -> dict[str, Any]:
    """A tiny Llama-like decoder's settings: 3 layers, hidden 32, 4 heads of 8, 2 KV heads."""
    cfg: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def _extra(**kwargs: Any) -> dict[str, Any]:
    """Config keyword arguments that a config class accepts through **kwargs but does not declare."""
    return kwargs


def _llama() -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig(**_text()), LlamaForCausalLM


def _qwen2() -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config(**_text()), Qwen2ForCausalLM


def _qwen3() -> tuple[Any, Any]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3Config(**_text(head_dim=8)), Qwen3ForCausalLM


def _gemma3() -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    # 28x28 image in 7x7 patches: a 4x4 patch grid pooled to 2x2 = 4 tokens per image.
    config = Gemma3Config(
        text_config=_text(
            head_dim=8,
            sliding_window=16,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 7,
        },
        mm_tokens_per_image=4,
        boi_token_index=VISION_START,
        eoi_token_index=VISION_END,
        image_token_index=IMAGE_TOKEN,
        tie_word_embeddings=False,
    )
    return config, Gemma3ForConditionalGeneration


def _qwen_vl_ids() -> dict[str, Any]:
    return {
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": VIDEO_TOKEN,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "tie_word_embeddings": False,
    }


# Multimodal rotary sections (temporal, height, width) in pairs of dimensions: sum = head_dim / 2.
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}


def _qwen2_vl() -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=_text(rope_parameters=_MROPE),
        vision_config={
            "depth": VISION_LAYERS,
            "embed_dim": HIDDEN,
            "hidden_size": HIDDEN,  # the merger's output width: the text model's hidden size
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_vl_ids(),
    )
    return config, Qwen2VLForConditionalGeneration


def _qwen2_5_vl() -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=_text(rope_parameters=_MROPE),
        vision_config={
            "depth": VISION_LAYERS,
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": HIDDEN,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
        },
        **_qwen_vl_ids(),
    )
    return config, Qwen2_5_VLForConditionalGeneration


def _llava() -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config={"model_type": "llama", **_text()},
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "projection_dim": HIDDEN,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 7,
        },
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return config, LlavaForConditionalGeneration


def _idefics3() -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(
        text_config={"model_type": "llama", **_text()},
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        scale_factor=2,
        image_token_id=IMAGE_TOKEN,
        tie_word_embeddings=False,
    )
    return config, Idefics3ForConditionalGeneration


def _mllama() -> tuple[Any, Any]:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    # Local vision transformer 4 layers, global transformer 2 layers, text decoder 3 layers with
    # cross-attention at layer 1.  Vision output = last hidden state plus the intermediate layers
    # 1 and 3 concatenated: 3 x 32.
    config = MllamaConfig(
        text_config=_text(cross_attention_layers=[1]),
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_global_layers": 2,
            "attention_heads": 4,
            "image_size": 28,
            "patch_size": 14,
            "max_num_tiles": 2,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
            "intermediate_layers_indices": [1, 3],
            "vision_output_dim": 3 * HIDDEN,
        },
        image_token_index=IMAGE_TOKEN,
    )
    return config, MllamaForConditionalGeneration


def _t5() -> tuple[Any, Any]:
    from transformers import T5Config, T5ForConditionalGeneration

    # T5 always ties: transformers 5 forces tie_word_embeddings=True for T5 (the kwarg only picks
    # whether decoder outputs are scaled), so `shared` is the encoder's and decoder's embedding and
    # the LM head, and only `shared.weight` is saved.
    config = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        pad_token_id=PAD,
        eos_token_id=EOS,
        # Not a declared T5Config field in transformers 5, but real T5 configs carry it and the
        # model's shift-right reads it.
        **_extra(decoder_start_token_id=PAD),
    )
    return config, T5ForConditionalGeneration


def _bart() -> tuple[Any, Any]:
    from transformers import BartConfig, BartForConditionalGeneration

    # BART always ties: encoder and decoder embeddings and the LM head are one matrix.
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_eos_token_id=EOS,
    )
    return config, BartForConditionalGeneration


def _whisper() -> tuple[Any, Any]:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    # Whisper always ties its output projection to the decoder's token embedding.
    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=HIDDEN,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        suppress_tokens=[],
        begin_suppress_tokens=[EOS],
    )
    return config, WhisperForConditionalGeneration


def _bert() -> tuple[Any, Any]:
    from transformers import BertConfig, BertForMaskedLM

    # The masked-LM decoder is tied to the word embeddings, as in every BERT checkpoint.
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    return config, BertForMaskedLM


def _mixtral() -> tuple[Any, Any]:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralConfig(**_text(num_local_experts=4, num_experts_per_tok=2)), MixtralForCausalLM


def _qwen3_moe() -> tuple[Any, Any]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        **_text(
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    )
    return config, Qwen3MoeForCausalLM


def _deepseek_v3() -> tuple[Any, Any]:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    # Layer 0 dense, layers 1-2 mixture of experts (4 routed + 1 shared); multi-head latent attention.
    config = DeepseekV3Config(
        **_text(
            num_key_value_heads=4,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    )
    return config, DeepseekV3ForCausalLM


def _jamba() -> tuple[Any, Any]:
    from transformers import JambaConfig, JambaForCausalLM

    # Layers 0 and 2 Mamba with dense MLP, layer 1 attention with 4 experts.
    config = JambaConfig(
        **_text(
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            use_mamba_kernels=False,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=8,
        )
    )
    return config, JambaForCausalLM


def _falcon_h1() -> tuple[Any, Any]:
    from transformers import FalconH1Config, FalconH1ForCausalLM

    # Every Falcon-H1 layer has attention and a Mamba-2 mixer in parallel, then an MLP.
    config = FalconH1Config(
        **_text(
            head_dim=8,
            mamba_d_ssm=64,
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_n_groups=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=16,
        )
    )
    return config, FalconH1ForCausalLM


def _lfm2() -> tuple[Any, Any]:
    from transformers import Lfm2Config, Lfm2ForCausalLM

    # Layers 0 and 2 short convolutions, layer 1 full attention.
    config = Lfm2Config(
        **_text(
            layer_types=["conv", "full_attention", "conv"],
            conv_L_cache=3,
            block_auto_adjust_ff_dim=False,
            norm_eps=1e-5,
        )
    )
    return config, Lfm2ForCausalLM


_BUILDERS: dict[str, tuple[Callable[[], tuple[Any, Any]], str]] = {
    "llama": (_llama, _CAUSAL),
    "qwen2": (_qwen2, _CAUSAL),
    "qwen3": (_qwen3, _CAUSAL),
    "gemma3": (_gemma3, _IMAGE_TEXT),
    "qwen2_vl": (_qwen2_vl, _IMAGE_TEXT),
    "qwen2_5_vl": (_qwen2_5_vl, _IMAGE_TEXT),
    "llava": (_llava, _IMAGE_TEXT),
    "idefics3": (_idefics3, _IMAGE_TEXT),
    "mllama": (_mllama, _IMAGE_TEXT),
    "t5": (_t5, _SEQ2SEQ),
    "bart": (_bart, _SEQ2SEQ),
    "whisper": (_whisper, _SPEECH),
    "bert": (_bert, _MASKED),
    "mixtral": (_mixtral, _CAUSAL),
    "qwen3_moe": (_qwen3_moe, _CAUSAL),
    "deepseek_v3": (_deepseek_v3, _CAUSAL),
    "jamba": (_jamba, _CAUSAL),
    "falcon_h1": (_falcon_h1, _CAUSAL),
    "lfm2": (_lfm2, _CAUSAL),
}
assert tuple(_BUILDERS) == TYPES


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging and Python warnings for the duration."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(previous)


def make_tiny(model_type: str, path: Path, seed: int) -> str:
    """Save a tiny random checkpoint of model_type under path (save_pretrained, safetensors, float32),
    and return the name of the transformers Auto class that loads it."""
    if model_type not in _BUILDERS:
        raise ValueError(f"unknown model type {model_type!r}; known: {', '.join(TYPES)}")
    build, auto_class = _BUILDERS[model_type]
    with quiet_transformers():
        config, model_class = build()
        config.dtype = torch.float32
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32).eval()
        model.save_pretrained(Path(path), safe_serialization=True)
    return auto_class
