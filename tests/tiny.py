"""Tiny real checkpoints for the tests, built with transformers and saved in each on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *[chr(c) for c in range(ord("a"), ord("a") + 28)]]


def llama_config(**overrides: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": len(VOCAB),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def llama_state(seed: int, **overrides: object) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """A randomly initialised tiny Llama's state dict and its config.json contents."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = llama_config(**overrides)
    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    )
    model = LlamaForCausalLM(hf_cfg)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, cfg


def finetune(state: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A 'fine-tune': the base plus a small random task vector."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}


def save(
    directory: Path,
    state: dict[str, torch.Tensor],
    config: dict[str, object],
    *,
    fmt: str = "safetensors",
    shards: int = 1,
    dtype: torch.dtype | None = None,
    tokenizer: bool = False,
) -> Path:
    """Write a model directory: safetensors or .bin, in ``shards`` files with an index when > 1."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        config = {**config, "torch_dtype": str(dtype).replace("torch.", "")}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(directory / fname), metadata={"format": "pt"})
        else:
            torch.save(part, directory / fname)
        weight_map.update(dict.fromkeys(group, fname))
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    if tokenizer:
        save_tokenizer(directory)
    return directory


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(directory))


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged output directory, read with the safetensors library."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
