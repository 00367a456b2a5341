"""Router weights: one row per expert in every layer, as mergekit-moe 0.1.5 computes them.

``hidden``: the base model (loaded in bfloat16) reads each expert's positive prompts, each prefixed
with the tokenizer's BOS text, left-padded; for layer ``l`` the hidden state that enters layer
``l`` (``hidden_states[l]``: the embeddings for layer 0) at the last position is averaged over the
prompts. The same for the negative prompts is subtracted and the row is scaled to unit length.

``cheap_embed``: the token embeddings of every prompt token summed over tokens and prompts and
scaled to unit length (negative prompts likewise, subtracted, then scaled again); the same row in
every layer.

``random``: standard normal entries; ``uniform_random``: uniform in ``±1/sqrt(hidden_size)``, as
``torch.nn.Linear`` starts; both drawn from torch's generator seeded with ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mergesmith.errors import CheckpointError, ConfigError
from mergesmith.moe.config import Expert

__all__ = [
    "cheap_embed_rows",
    "degenerate_layers",
    "gate_rows",
    "hidden_rows",
    "load_base",
    "load_tokenizer",
    "tokenize",
]

HIDDEN_DTYPE = torch.bfloat16  # the dtype mergekit-moe runs the base model in


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> Any:
    """The prompts as mergekit-moe tokenizes them: BOS text prepended, no special tokens added,
    padded on the left."""
    bos = tokenizer.bos_token or ""
    try:
        return tokenizer(
            [bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
        )
    except ValueError as exc:  # no padding token, text it cannot encode
        raise CheckpointError(
            f"the base model's tokenizer cannot encode the gate prompts ({str(exc)[:200]}); give the "
            "tokenizer a BOS, EOS or padding token, or use gate_mode random"
        ) from None


def load_tokenizer(directory: str) -> Any:
    """The base's tokenizer, set to pad on the left with BOS (or EOS when it has no BOS)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(
            "gate_mode hidden and cheap_embed need transformers: pip install 'mergesmith[eval]', "
            "or use gate_mode random"
        ) from None

    from mergesmith.evaluate import quiet_transformers

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # transformers fails in many ways on a missing or foreign tokenizer
        raise CheckpointError(
            f"{directory}: cannot load the base model's tokenizer ({type(exc).__name__}); gate_mode "
            "hidden and cheap_embed tokenize the prompts with it: add the tokenizer files to the base"
        ) from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def hidden_rows(model: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(layers, hidden): per layer, the last position's input hidden state averaged over prompts."""
    batch = tokenize(tokenizer, prompts).to(model.device)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # (layers, prompts, positions, hidden)
    last = states[:, :, -1, :]
    rows: torch.Tensor = last.sum(dim=1) / last.shape[1]
    return rows


def cheap_embed_rows(
    embed: torch.Tensor, tokenizer: Any, prompts: Sequence[str], layers: int
) -> torch.Tensor:
    """(layers, hidden): the prompts' token embeddings summed, scaled to unit length, repeated."""
    batch = tokenize(tokenizer, prompts)
    ids: torch.Tensor = batch["input_ids"]
    onehot: torch.Tensor = torch.nn.functional.one_hot(ids, num_classes=embed.shape[0])
    h = onehot.float() @ embed.float()
    mask: torch.Tensor = batch["attention_mask"]
    summed = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    row: torch.Tensor = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    rows: torch.Tensor = row.repeat(layers, 1)
    return rows


def gate_rows(
    mode: str,
    experts: Sequence[Expert],
    *,
    layers: int,
    hidden: int,
    base_dir: str,
    embed: Callable[[], torch.Tensor],
    device: str | torch.device = "cpu",
    seed: int = 0,
    say: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """(layers, experts, hidden): the router rows of ``experts`` in every layer."""
    if mode in ("random", "uniform_random"):
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            if mode == "random":
                return torch.randn((layers, len(experts), hidden))
            scale = math.sqrt(1.0 / hidden)
            return torch.rand((layers, len(experts), hidden)) * 2 * scale - scale
    if mode not in ("hidden", "cheap_embed"):
        raise ConfigError(f"unknown gate_mode {mode!r}; use hidden, cheap_embed, random or uniform_random")
    tokenizer = load_tokenizer(base_dir)
    rows_of: Callable[[Sequence[str]], torch.Tensor]
    if mode == "cheap_embed":
        table = embed()

        def rows_of(prompts: Sequence[str]) -> torch.Tensor:
            return cheap_embed_rows(table, tokenizer, prompts, layers)

    else:
        model = load_base(base_dir, device)
        if model.config.num_hidden_layers != layers:
            raise CheckpointError(
                f"{base_dir}: transformers builds {model.config.num_hidden_layers} layers from it, and "
                f"config.json says num_hidden_layers {layers}; repair config.json"
            )

        def rows_of(prompts: Sequence[str]) -> torch.Tensor:
            return hidden_rows(model, tokenizer, prompts)

    vecs = []
    for i, expert in enumerate(experts, 1):
        if say is not None:
            say(f"moe: expert {i}/{len(experts)} {expert.label}: computing gate prompts")
        rows = rows_of(expert.positive_prompts)
        if expert.negative_prompts:
            rows -= rows_of(expert.negative_prompts)
        rows /= rows.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vecs.append(rows)
    return torch.stack(vecs, dim=0).permute(1, 0, 2).cpu()


def load_base(directory: str, device: str | torch.device) -> Any:
    """The base model in bfloat16 for the hidden states."""
    from transformers import AutoModelForCausalLM

    from mergesmith.evaluate import quiet_transformers

    try:
        with quiet_transformers():
            model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=HIDDEN_DTYPE)
    except Exception as exc:  # transformers fails in many ways on a broken or foreign directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{directory}: cannot load the base model with transformers to compute the hidden-state "
            f"gates ({type(exc).__name__}: {first[:200]}); use gate_mode cheap_embed or random, or "
            "fix the base model"
        ) from None
    return model.to(torch.device(device)).eval()


def degenerate_layers(rows: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """The layers whose router rows (layers, experts, hidden) are so alike that routing can
    hardly tell the experts apart: the condition number of the rows is above ``threshold``."""
    conds = torch.linalg.cond(rows.float())
    return [n for n, c in enumerate(conds.tolist()) if not c <= threshold]
