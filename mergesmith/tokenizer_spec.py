"""The ``tokenizer:`` section of a config: the output vocabulary, per-token embedding sources, padding.

::

    tokenizer:
      source: union            # base | union | a model (default: union)
      tokens:
        <|im_start|>:
          source: chat-model   # that model's row for this token
        <think>:
          source: {kind: model_token, model: base-model, token: "<s>"}   # another token's row
          force: true          # even in the models that have <think>
        <pad>:
          source: {kind: zero}
      pad_to_multiple_of: 64
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mergesmith import _yaml

__all__ = ["TokenSource", "TokenSpec", "TokenizerSpec", "parse_tokenizer"]


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default embedding row comes from.

    ``kind`` is ``zero`` (a row of zeros), ``model`` (``model``'s row for the same token) or
    ``model_token`` (``model``'s row for ``token``, or its row number ``token_id``)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSpec:
    source: TokenSource | None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    source: str = "union"
    tokens: Mapping[str, TokenSpec] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


# padding multiples in use are 8 to 256; a far larger one would only allocate rows nobody uses
MAX_PAD_MULTIPLE = 1 << 16

Add = Callable[[Any, "str | int | None", str, str], None]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _source(add: Add, holder: Mapping[str, Any], path: str) -> TokenSource | None:
    value = holder.get("source")
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return TokenSource("model", model=value)
    if not isinstance(value, Mapping):
        add(
            holder,
            "source",
            path,
            f"expected a model name or a {{kind: ...}} mapping, found {_yaml.shown(value)}",
        )
        return None
    kind = value.get("kind")
    if kind == "zero":
        extra = sorted(str(k) for k in value if k != "kind")
        if extra:
            add(holder, "source", path, f"unknown keys {', '.join(extra)}; kind: zero takes no other key")
            return None
        return TokenSource("zero")
    if kind != "model_token":
        add(holder, "source", f"{path}.kind", f"expected model_token or zero, found {_yaml.shown(kind)}")
        return None
    extra = sorted(str(k) for k in value if k not in ("kind", "model", "token", "token_id"))
    if extra:
        add(holder, "source", path, f"unknown keys {', '.join(extra)}; use model and token (or token_id)")
        return None
    model, token, token_id = value.get("model"), value.get("token"), value.get("token_id")
    if not isinstance(model, str) or not model.strip():
        add(
            holder, "source", f"{path}.model", f"expected one of the input models, found {_yaml.shown(model)}"
        )
        return None
    if (token is None) == (token_id is None):
        add(holder, "source", path, "give exactly one of token (a token's text) and token_id (a row number)")
        return None
    if token is not None and not isinstance(token, str):
        add(holder, "source", f"{path}.token", f"expected a token's text, found {_yaml.shown(token)}")
        return None
    if token_id is not None and (not _whole(token_id) or token_id < 0):
        add(
            holder, "source", f"{path}.token_id", f"expected a row number >= 0, found {_yaml.shown(token_id)}"
        )
        return None
    return TokenSource("model_token", model=model, token=token, token_id=token_id)


def parse_tokenizer(add: Add, doc: Mapping[str, Any]) -> TokenizerSpec | None:
    """The ``tokenizer:`` section of ``doc``, or None without one; problems go to ``add``."""
    block = doc.get("tokenizer")
    if block is None:
        return None
    if not isinstance(block, Mapping):
        add(
            doc,
            "tokenizer",
            "tokenizer",
            f"expected a mapping {{source: ..., tokens: ...}}, found {_yaml.shown(block)}",
        )
        return None
    ok = True
    for key in block:
        if key not in ("source", "tokens", "pad_to_multiple_of"):
            add(block, key, f"tokenizer.{key}", "unknown key; use source, tokens or pad_to_multiple_of")
            ok = False
    source = block.get("source", "union")
    if not isinstance(source, str) or not source.strip():
        add(
            block,
            "source",
            "tokenizer.source",
            f"expected base, union or a model, found {_yaml.shown(source)}",
        )
        ok = False
    pad = block.get("pad_to_multiple_of")
    if isinstance(pad, int) and not isinstance(pad, bool) and pad > MAX_PAD_MULTIPLE:
        add(
            block,
            "pad_to_multiple_of",
            "tokenizer.pad_to_multiple_of",
            f"{pad} is past {MAX_PAD_MULTIPLE}; vocabularies are padded to multiples such as 64 or 128",
        )
        ok = False
    elif pad is not None and (not _whole(pad) or pad < 1):
        add(
            block,
            "pad_to_multiple_of",
            "tokenizer.pad_to_multiple_of",
            f"expected a whole number >= 1, found {_yaml.shown(pad)}",
        )
        ok = False
    tokens: dict[str, TokenSpec] = {}
    table = block.get("tokens")
    if table is not None and not isinstance(table, Mapping):
        add(
            block,
            "tokens",
            "tokenizer.tokens",
            f"expected a mapping of tokens to {{source, force}}, found {_yaml.shown(table)}",
        )
        ok = False
    for token, entry in (table or {}).items() if isinstance(table, Mapping) else ():
        path = f"tokenizer.tokens.{token}"
        if not isinstance(token, str) or not token:
            add(table, token, path, "expected a token's text as the key")
            ok = False
            continue
        if not isinstance(entry, Mapping):
            add(table, token, path, f"expected {{source: ..., force: ...}}, found {_yaml.shown(entry)}")
            ok = False
            continue
        extra = sorted(str(k) for k in entry if k not in ("source", "force"))
        if extra:
            add(entry, extra[0], path, f"unknown keys {', '.join(extra)}; use source and force")
            ok = False
            continue
        force = entry.get("force", False)
        if not isinstance(force, bool):
            add(entry, "force", f"{path}.force", f"expected true or false, found {_yaml.shown(force)}")
            ok = False
            continue
        src = _source(add, entry, f"{path}.source")
        if src is None:
            if entry.get("source") is None:
                add(
                    entry,
                    None,
                    path,
                    "missing source: give a model, {kind: model_token, ...} or {kind: zero}",
                )
            ok = False
            continue
        tokens[token] = TokenSpec(src, force)
    if not ok:
        return None
    return TokenizerSpec(str(source), tokens, pad)
