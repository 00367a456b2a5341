"""Vocabularies: read each model's tokenizer, align embedding rows by token, merge row groups.

When fine-tunes added tokens, the same row index means different tokens in different models. With
``tokenizer_source`` set, the rows of the embedding and LM-head tensors are matched by token string
instead: the output vocabulary is chosen (``base``, ``union`` or one model's), each input gets a map
from output rows to its own rows (or -1 where it lacks the token), and each output row is the
method's formula applied to the rows of the models that have that token. A model's rows beyond
its tokenizer's ids (padding rows) are matched by index with other models' padding rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import CheckpointError

__all__ = ["RowMap", "Vocab", "align", "merge_rows", "read_vocab", "union_tokenizer"]

Key = str | tuple[str, int]  # a token, or ("#row", i) for a padding row without a token


@dataclass(frozen=True)
class Vocab:
    """A tokenizer's token -> id map and the files it came from."""

    ids: dict[str, int]
    added: dict[str, dict[str, Any]]  # added-token entries (special flags etc.) by content
    file: Path

    def keys(self, rows: int) -> list[Key]:
        """The key of each of ``rows`` embedding rows: its token, or a padding key."""
        tokens: list[Key] = [("#row", i) for i in range(rows)]
        for token, i in self.ids.items():
            if 0 <= i < rows:
                tokens[i] = token
        return tokens


def read_vocab(directory: Path) -> Vocab | None:
    """The vocabulary of a model directory's tokenizer (tokenizer.json, else vocab.json), or None."""
    tok_file = directory / "tokenizer.json"
    if tok_file.is_file():
        try:
            data = json.loads(tok_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{tok_file}: not a readable tokenizer.json ({exc})") from None
        model = data.get("model") or {}
        vocab = model.get("vocab")
        ids: dict[str, int] = {}
        if isinstance(vocab, dict):
            ids = {str(t): int(i) for t, i in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            ids = {str(entry[0]): i for i, entry in enumerate(vocab)}
        added = {}
        for entry in data.get("added_tokens") or []:
            ids[str(entry["content"])] = int(entry["id"])
            added[str(entry["content"])] = dict(entry)
        return Vocab(ids, added, tok_file)
    vocab_file = directory / "vocab.json"
    if vocab_file.is_file():
        ids = {str(t): int(i) for t, i in json.loads(vocab_file.read_text(encoding="utf-8")).items()}
        extra = directory / "added_tokens.json"
        if extra.is_file():
            ids.update({str(t): int(i) for t, i in json.loads(extra.read_text(encoding="utf-8")).items()})
        return Vocab(ids, {}, vocab_file)
    return None


@dataclass(frozen=True)
class RowMap:
    """For one vocabulary tensor: per input (base first, as in the job), its row for each output row."""

    rows: int
    sources: tuple[torch.Tensor, ...]  # int64 [rows], -1 where that input lacks the token


def align(out_keys: Sequence[Key], model_keys: Sequence[Sequence[Key]]) -> list[torch.Tensor]:
    """For each model, the row holding each output key (-1 where the model lacks it)."""
    maps = []
    for keys in model_keys:
        where = {k: i for i, k in enumerate(keys)}
        maps.append(torch.tensor([where.get(k, -1) for k in out_keys], dtype=torch.long))
    return maps


def union_keys(first: Sequence[Key], others: Sequence[Sequence[Key]]) -> list[Key]:
    """The first model's keys in order, then every other model's new tokens in order of appearance."""
    out = list(first)
    seen = set(out)
    for keys in others:
        for k in keys:
            if isinstance(k, str) and k not in seen:
                seen.add(k)
                out.append(k)
    return out


def union_tokenizer(reference: Path, vocabs: Sequence[Vocab], out_keys: Sequence[Key], stage: Path) -> None:
    """Write ``reference``'s tokenizer.json with the union's new tokens appended as added tokens."""
    data = json.loads(reference.read_text(encoding="utf-8"))
    added = list(data.get("added_tokens") or [])
    known = {str(e["content"]) for e in added}
    ref_ids = (data.get("model") or {}).get("vocab") or {}
    new_entries = []
    for i, key in enumerate(out_keys):
        if not isinstance(key, str) or key in known or (isinstance(ref_ids, dict) and key in ref_ids):
            continue
        template = next((v.added[key] for v in vocabs if key in v.added), None)
        entry = {
            "id": i,
            "content": key,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        }
        if template is not None:
            entry.update({k: v for k, v in template.items() if k not in ("id", "content")})
        added.append(entry)
        new_entries.append(entry)
    data["added_tokens"] = added
    (stage / "tokenizer.json").write_text(
        json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    cfg_file = stage / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        decoder = cfg.setdefault("added_tokens_decoder", {})
        for e in new_entries:
            decoder[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def row_task_vector(row_map: RowMap, base: torch.Tensor, tensor: torch.Tensor, index: int) -> torch.Tensor:
    """Input ``index``'s task vector over the rows of the tokens it holds, as :func:`merge_rows`
    forms it: its row minus the base's row for the same token (the base's mean where it lacks it)."""
    own = row_map.sources[1 + index]
    base_src = row_map.sources[0]
    held = own >= 0
    base_rows = base.mean(0).expand(int(held.sum()), *base.shape[1:]).clone()
    has = base_src[held] >= 0
    base_rows[has] = base[base_src[held][has]]
    return tensor[own[held]] - base_rows


MergeRows = Callable[[torch.Tensor | None, list[torch.Tensor], list[int]], torch.Tensor]


def merge_rows(
    row_map: RowMap,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    merge: MergeRows,
    min_models: int,
) -> torch.Tensor:
    """Merge a vocabulary tensor row group by row group.

    Output rows are grouped by which inputs hold their token. For each group, ``merge(base_rows,
    rows, members)`` runs the method on the rows of the inputs that hold it (``members`` are their
    positions in ``tensors``). Where the base lacks a token, its row is the base's mean embedding;
    where fewer than ``min_models`` inputs hold a token, the others take part with the base's row
    (a zero task vector).
    """
    offset = 1 if base is not None else 0
    maps = row_map.sources
    held = torch.stack([m >= 0 for m in maps[offset:]])  # [models, rows]
    weights = 2 ** torch.arange(held.shape[0], dtype=torch.long)
    codes = (held.long() * weights[:, None]).sum(0)
    if base is not None:
        codes = codes * 2 + (maps[0] >= 0).long()
    template = tensors[0] if tensors else base
    assert template is not None
    out = torch.zeros((row_map.rows, *template.shape[1:]), dtype=template.dtype, device=template.device)
    base_mean = base.mean(0) if base is not None else None
    for code in torch.unique(codes).tolist():
        rows = (codes == code).nonzero().reshape(-1)
        base_rows = None
        if base is not None and base_mean is not None:
            src = maps[0][rows]
            base_rows = base_mean.expand(len(rows), *base.shape[1:]).clone()
            has = src >= 0
            base_rows[has] = base[src[has]]
        members = [i for i in range(len(tensors)) if bool(held[i, rows[0]])]
        if not members:
            out[rows] = base_rows if base_rows is not None else 0
            continue
        if len(members) < min_models and base_rows is not None:
            members = list(range(len(tensors)))
        parts = []
        for i in members:
            src = maps[offset + i][rows]
            part = base_rows.clone() if base_rows is not None else torch.zeros_like(out[rows])
            has = src >= 0
            part[has] = tensors[i][src[has]]
            parts.append(part)
        out[rows] = merge(base_rows, parts, members)
    return out
