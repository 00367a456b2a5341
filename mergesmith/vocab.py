"""Vocabularies: read each model's tokenizer, align embedding rows by token, merge row groups.

When fine-tunes added tokens, the same row index means different tokens in different models. With
``tokenizer_source`` or a ``tokenizer:`` section, the rows of the embedding and LM-head tensors are
matched by token string instead: the output vocabulary is chosen (``base``, ``union`` or one
model's), each input gets a map from output rows to its own rows (or -1 where it lacks the token),
and each input's tensor is rebuilt in the output's order before the merge (:func:`permute_rows`).
:func:`merge_rows` merges row groups over the models holding each token instead.
"""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergesmith import _yaml
from mergesmith._files import stamp_of
from mergesmith._json import read_json
from mergesmith._text import printable
from mergesmith.errors import CheckpointError

if TYPE_CHECKING:
    from mergesmith.compat import Problems
    from mergesmith.config import MergeConfig, ModelRef
    from mergesmith.sources import ModelSource
    from mergesmith.tokenizer_spec import TokenizerSpec

__all__ = [
    "Alignment",
    "Fill",
    "Permute",
    "RowMap",
    "Vocab",
    "align",
    "align_vocabularies",
    "clear_cache",
    "merge_rows",
    "permute_rows",
    "read_tokenizer_json",
    "read_vocab",
    "row_map",
    "row_task_vector",
    "token_fills",
    "union_keys",
    "union_tokenizer",
]

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


# A tokenizer.json is at most some tens of MB; this is far past any real one.
MAX_TOKENIZER_BYTES = 512 << 20
TOKENIZER_FIX = "repair the tokenizer files or download the model again"
# parsed tokenizer files by (path, device, inode, size, modification time): each is parsed once
# however many times planning, diagnosis and the writing of the merged tokenizer ask for it
_CACHE_SIZE = 4
_parsed: OrderedDict[tuple[str, int, int, int, int], Any] = OrderedDict()


def read_tokenizer_json(path: Path, max_bytes: int | None = None) -> Any:
    """The parsed JSON file ``path`` (bounded as :func:`~mergesmith._json.read_json`), parsed at
    most once while it stays the same file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    key = (str(path.absolute()), *stamp_of(st))
    if key in _parsed:
        _parsed.move_to_end(key)
        return _parsed[key]
    data = read_json(
        path,
        max_bytes=MAX_TOKENIZER_BYTES if max_bytes is None else max_bytes,
        fix=TOKENIZER_FIX,
    )
    _parsed[key] = data
    while len(_parsed) > _CACHE_SIZE:
        _parsed.popitem(last=False)
    return data


def clear_cache() -> None:
    """Forget every parsed tokenizer file."""
    _parsed.clear()


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {TOKENIZER_FIX}")


def _kind(value: object) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _token_ids(path: Path, where: str, table: object) -> dict[str, int]:
    """A token -> id object, checked: string tokens, non-negative integer ids."""
    if not isinstance(table, dict):
        raise _bad(path, f"{where} is {_kind(table)}, expected an object of tokens to ids")
    ids: dict[str, int] = {}
    for token, i in table.items():
        if type(i) is not int or i < 0:
            raise _bad(path, f"{where}: token {token!r} has id {i!r}, expected a non-negative integer")
        ids[token] = i
    return ids


def read_vocab(directory: Path) -> Vocab | None:
    """The vocabulary of a model directory's tokenizer (tokenizer.json, else vocab.json), or None.

    Each file is parsed once (see :func:`read_tokenizer_json`) and checked for the shape it must
    have; a file that is not a regular file, too large, or malformed is a CheckpointError."""
    tok_file = directory / "tokenizer.json"
    if os.path.lexists(tok_file):
        data = read_tokenizer_json(tok_file)
        if not isinstance(data, dict):
            raise _bad(tok_file, f"the file holds {_kind(data)}, expected a JSON object")
        model = data.get("model")
        if model is None:
            model = {}
        if not isinstance(model, dict):
            raise _bad(tok_file, f'"model" is {_kind(model)}, expected an object')
        vocab = model.get("vocab")
        ids: dict[str, int] = {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            for i, entry in enumerate(vocab):
                if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
                    raise _bad(tok_file, f'"model.vocab"[{i}] is {entry!r:.60}, expected [piece, score]')
                ids[entry[0]] = i
        elif vocab is not None:
            ids = _token_ids(tok_file, '"model.vocab"', vocab)
        added = {}
        entries = data.get("added_tokens") or []
        if not isinstance(entries, list):
            raise _bad(tok_file, f'"added_tokens" is {_kind(entries)}, expected a list')
        for n, entry in enumerate(entries):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("content"), str)
                or type(entry.get("id")) is not int
                or entry["id"] < 0
            ):
                raise _bad(
                    tok_file,
                    f'"added_tokens"[{n}] is {entry!r:.80}, expected an object with a string content and '
                    "a non-negative integer id",
                )
            ids[entry["content"]] = entry["id"]
            added[entry["content"]] = dict(entry)
        return Vocab(ids, added, tok_file)
    vocab_file = directory / "vocab.json"
    if os.path.lexists(vocab_file):
        ids = _token_ids(vocab_file, "the file", read_tokenizer_json(vocab_file))
        extra = directory / "added_tokens.json"
        if os.path.lexists(extra):
            ids.update(_token_ids(extra, "the file", read_tokenizer_json(extra)))
        return Vocab(ids, {}, vocab_file)
    return None


@dataclass(frozen=True)
class Fill:
    """A token's configured default row (``tokenizer.tokens``): zeros, or ``model``'s row ``row``.
    With ``force``, every input takes it, also those that have the token."""

    model: int | None  # index into the plan's models; None: a row of zeros
    row: int
    force: bool


@dataclass(frozen=True)
class Permute:
    """How a ``tokenizer:`` section builds each input's vocabulary tensor before the merge: its
    own row for each output token it has, a default row for those it lacks (see
    :func:`permute_rows`), and the mean of those rows in each padding row past ``tokens``."""

    models: tuple[int, ...]  # the plan's model index of each input (base first, as in the job)
    base: int | None  # the position among the inputs of the base model (base_model), if one
    tokens: int  # output rows holding tokens; the rest are padding
    fills: dict[int, Fill]  # by output row


@dataclass(frozen=True)
class RowMap:
    """For one vocabulary tensor: per input (base first, as in the job), its row for each output row."""

    rows: int
    sources: tuple[torch.Tensor, ...]  # int64 [rows], -1 where that input lacks the token
    permute: Permute | None = None  # a tokenizer: section: inputs are rebuilt, then merged whole


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


@dataclass(frozen=True)
class Alignment:
    """Embedding rows matched by token: the output's row keys and each model's row for them."""

    keys: list[Key]
    vocabs: list[Vocab | None]  # per model
    maps: list[torch.Tensor]  # per model: its row for each output row, -1 where it lacks the token
    union: bool  # the output tokenizer gains tokens (a union, or tokenizer.tokens it lacks)
    rows: int = 0  # output rows, padding included (tokenizer.pad_to_multiple_of); 0: len(keys)
    fills: dict[int, Fill] | None = None  # with a tokenizer: section: its tokens' default rows

    @property
    def size(self) -> int:
        return self.rows or len(self.keys)


def align_vocabularies(
    config: MergeConfig,
    refs: Sequence[ModelRef],
    models: Sequence[ModelSource],
    rows: list[int],
    tokenizer_model: Callable[[], int | None],
    problem: Problems,
) -> Alignment | None:
    """Matching of vocabulary rows by token, as ``config``'s tokenizer_source (not None) and
    ``tokenizer:`` section ask, for models of ``rows`` embedding rows each; None where every
    model's rows are already the output's. ``tokenizer_model`` gives the model whose vocabulary
    the output takes."""
    source = config.tokenizer_source
    assert source is not None
    vocabs = [read_vocab(m.dir) for m in models]
    missing = [refs[i] for i, v in enumerate(vocabs) if v is None and rows[i]]
    if missing:
        problem(
            f"tokenizer_source {_yaml.shown(source)}: {', '.join(map(str, missing))} has no tokenizer.json or vocab.json, "
            "so its embedding rows cannot be matched by token; add its tokenizer files or remove "
            "tokenizer_source",
            key="vocab-missing",
        )
        return None
    keys = [v.keys(r) if v is not None else [] for v, r in zip(vocabs, rows)]
    spec = config.tokenizer
    if spec is None and all(k == keys[0] for k in keys):
        return None
    chosen = tokenizer_model()
    assert chosen is not None
    extra = []
    if spec is not None:
        known = set(keys[chosen])
        extra = [
            t for t in spec.tokens if t not in known and not (source == "union" and any(t in k for k in keys))
        ]
    if source == "union" or extra:
        first = vocabs[chosen]
        if first is None or first.file.name != "tokenizer.json":
            problem(
                (
                    f"tokenizer_source union: {refs[chosen]} has no tokenizer.json to extend with the "
                    "other models' tokens; use tokenizer_source: base or one model's name"
                )
                if source == "union"
                else (
                    f"tokenizer.tokens: {refs[chosen]} has no tokenizer.json to add "
                    f"{_yaml.shown(extra[0])} to; list only tokens its tokenizer has"
                ),
                key="vocab-missing",
            )
            return None
    if source == "union":
        out_keys = union_keys(keys[chosen], [k for i, k in enumerate(keys) if i != chosen])
    else:
        out_keys = keys[chosen]
    if spec is None:
        return Alignment(out_keys, vocabs, align(out_keys, keys), source == "union")
    # a tokenizer: section: the output holds only the tokens (no padding rows past them), then
    # the configured tokens the chosen vocabulary lacks, then padding to the multiple asked for
    while out_keys and not isinstance(out_keys[-1], str):
        out_keys = out_keys[:-1]
    out_keys = [*out_keys, *extra]
    size = len(out_keys)
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    if all(k == out_keys for k in keys) and size == len(out_keys) and not spec.tokens:
        return None
    maps = align(out_keys, keys)
    fills = token_fills(spec, refs, out_keys, vocabs, maps, rows, problem)
    return Alignment(out_keys, vocabs, maps, source == "union" or bool(extra), rows=size, fills=fills)


def token_fills(
    spec: TokenizerSpec,
    refs: Sequence[ModelRef],
    out_keys: list[Key],
    vocabs: list[Vocab | None],
    maps: list[torch.Tensor],
    rows: list[int],
    problem: Problems,
) -> dict[int, Fill]:
    """The default row of each token the tokenizer: section configures, by output row (a
    source that names no input model or token is recorded as a config problem and left out)."""
    where = {k: i for i, k in enumerate(out_keys)}
    fills: dict[int, Fill] = {}
    for token, entry in spec.tokens.items():
        out_row = where[token]
        src = entry.source
        assert src is not None
        path = f"tokenizer.tokens.{printable(token)}.source"
        if src.kind == "zero":
            fills[out_row] = Fill(None, 0, entry.force)
            continue
        assert src.model is not None
        model = next((i for i, r in enumerate(refs) if src.model in (str(r), r.path)), None)
        if model is None:
            problem(
                f"{path}: {_yaml.shown(src.model)} is not one of the input models "
                f"({', '.join(map(str, refs))}); name one of them",
                config=True,
            )
            continue
        vocab = vocabs[model]
        if src.kind == "model":
            row = int(maps[model][out_row])
            needed = entry.force or any(int(m[out_row]) < 0 for m in maps)
            if row < 0 and needed:
                problem(
                    f"{path}: {refs[model]} has no token {_yaml.shown(token)}; name a model "
                    "that has it, or use {kind: model_token, model: ..., token: ...}",
                    config=True,
                )
                continue
        elif src.token is not None:
            row = vocab.ids.get(src.token, -1) if vocab is not None else -1
            if row < 0 or row >= rows[model]:
                problem(
                    f"{path}.token: {refs[model]} has no token {_yaml.shown(src.token)}; "
                    "name a token of its tokenizer",
                    config=True,
                )
                continue
        else:
            assert src.token_id is not None
            row = src.token_id
            if row >= rows[model]:
                problem(
                    f"{path}.token_id: {row} is past the {rows[model]} embedding rows of "
                    f"{refs[model]}; give a row number below {rows[model]}",
                    config=True,
                )
                continue
        fills[out_row] = Fill(model, row, entry.force)
    return fills


def row_map(
    alignment: Alignment,
    models: tuple[int, ...],
    base_at: int | None,
    out_name: str,
    refs: Sequence[ModelRef],
    problem: Problems,
) -> RowMap:
    """The row map of vocabulary tensor ``out_name``, whose inputs are ``models`` (base first, as in
    the job). With a ``tokenizer:`` section, each input is rebuilt before the merge, ``base_at``'s
    rows (a position among the inputs) the default where it has a token; the rows its tokens take
    must come from those inputs."""
    permute = None
    if alignment.fills is not None:
        held = set(models)
        outside = sorted({f.model for f in alignment.fills.values() if f.model is not None} - held)
        for m in outside:
            problem(
                f"{out_name}: tokenizer.tokens takes rows from {refs[m]}, which is not among "
                "this tensor's inputs; name a model that this slice merges",
                key=f"fill-outside:{m}",
                config=True,
            )
        permute = Permute(models, base_at, len(alignment.keys), alignment.fills)
    return RowMap(alignment.size, tuple(alignment.maps[m] for m in models), permute)


def union_tokenizer(reference: Path, vocabs: Sequence[Vocab], out_keys: Sequence[Key], stage: Path) -> None:
    """Write ``reference``'s tokenizer.json with the union's new tokens appended as added tokens."""
    data = copy.copy(read_tokenizer_json(reference))  # the cached document stays as read
    if not isinstance(data, dict):
        raise _bad(reference, f"the file holds {_kind(data)}, expected a JSON object")
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
        cfg = read_json(cfg_file, fix=TOKENIZER_FIX)
        decoder = cfg.get("added_tokens_decoder", {}) if isinstance(cfg, dict) else None
        if not isinstance(decoder, dict):
            # the file is a copy of the tokenizer model's: name that one
            raise _bad(
                reference.parent / cfg_file.name,
                "expected a JSON object whose added_tokens_decoder is an object",
            )
        cfg["added_tokens_decoder"] = decoder
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


def permute_rows(row_map: RowMap, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each input's vocabulary tensor rebuilt in the output's token order (mergekit's rule).

    An input keeps its own row for a token it has (unless the token's fill is forced). A token
    some input lacks gets one default row: its configured fill; else the row of the only input
    having it; else zeros where none has it; else the base's row where the base has it; else the
    mean of the rows of the inputs having it. Padding rows past the tokens take the mean of the
    input's token rows."""
    info = row_map.permute
    assert info is not None
    n = info.tokens
    maps = [m[:n] for m in row_map.sources]
    held = torch.stack([m >= 0 for m in maps])  # [inputs, tokens]
    count = held.sum(0)
    template = tensors[0]
    dtype = template.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    shape = (n, *template.shape[1:])
    default = torch.zeros(shape, dtype=dtype, device=template.device)
    use_default = count < len(tensors)
    forced = torch.zeros(n, dtype=torch.bool)
    configured = torch.zeros(n, dtype=torch.bool)
    where = {m: i for i, m in reversed(list(enumerate(info.models)))}
    for row, fill in info.fills.items():
        configured[row] = True
        forced[row] = fill.force
        if fill.model is not None:
            default[row] = tensors[where[fill.model]][fill.row].to(dtype)
    # rows no fill is configured for, that some input lacks
    open_ = use_default & ~configured
    single = open_ & (count == 1)
    for i, (m, t) in enumerate(zip(maps, tensors)):
        rows = (single & held[i]).nonzero().reshape(-1)
        default[rows] = t[m[rows]].to(dtype)
    shared = open_ & (count > 1)
    if info.base is not None:
        k = info.base
        rows = (shared & held[k]).nonzero().reshape(-1)
        default[rows] = tensors[k][maps[k][rows]].to(dtype)
        shared = shared & ~held[k]
    rows = shared.nonzero().reshape(-1)
    if len(rows):
        total = torch.zeros((len(rows), *shape[1:]), dtype=dtype, device=template.device)
        for i, (m, t) in enumerate(zip(maps, tensors)):
            have = held[i, rows]
            total[have] += t[m[rows[have]]].to(dtype)
        default[rows] = total / count[rows].to(dtype).reshape(-1, *([1] * (len(shape) - 1)))
    out = []
    for i, (m, t) in enumerate(zip(maps, tensors)):
        rebuilt = torch.empty((row_map.rows, *shape[1:]), dtype=dtype, device=template.device)
        own = held[i] & ~forced
        rebuilt[:n] = default
        rows = own.nonzero().reshape(-1)
        rebuilt[rows] = t[m[rows]].to(dtype)
        if row_map.rows > n:
            rebuilt[n:] = rebuilt[:n].mean(0)
        out.append(rebuilt)
    return out
