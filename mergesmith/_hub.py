"""Turning a model reference (local path or Hub id) into a local directory."""

from __future__ import annotations

import re
from pathlib import Path

from mergesmith.errors import CheckpointError

__all__ = ["resolve"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.txt",
    "*.jinja",
]


def resolve(path: str, revision: str | None = None) -> Path:
    """A local directory holding the model: the path itself, or the Hub snapshot of ``org/name``.

    Hub downloads go through ``huggingface_hub``, which honours ``HF_HUB_OFFLINE`` and the cache.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{path}: is a file; give the model's directory")
    if not HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{path}: no such directory (and not a Hub id of the form org/name); check the path"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(
            f"{path}: not a local directory, and huggingface_hub is not installed"
        ) from None
    where = f"{path}@{revision}" if revision else path
    local_hint = f" There is no directory {local.resolve()} either." if "/" in path else ""
    try:
        snap = Path(snapshot_download(path, revision=revision, allow_patterns=PATTERNS))
        if not any(snap.glob("*.safetensors")):
            snap = Path(snapshot_download(path, revision=revision, allow_patterns=[*PATTERNS, "*.bin"]))
        return snap
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{where}: not a local directory, and not in the Hugging Face cache while offline "
            "(HF_HUB_OFFLINE is set or the Hub cannot be reached); download it first or give a local path."
            + local_hint
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: the Hub repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{where}: no such Hub repository (or it is private: log in with `hf auth login`)." + local_hint
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: cannot fetch from the Hub: {exc}") from None
