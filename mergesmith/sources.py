"""Tensor sources: where a merge reads its inputs from, behind one small interface.

A source has ``keys()``, ``info(name)`` (shape and dtype from headers, no data read) and
``get(name)`` (the tensor's data, read on demand). :class:`Checkpoint` reads a model directory
(safetensors single or sharded, or PyTorch ``.bin`` loaded with ``weights_only``);
:class:`DictSource` serves tensors held in memory.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergesmith import _safetensors
from mergesmith.errors import CheckpointError

__all__ = ["Checkpoint", "DictSource", "TensorInfo", "TensorSource"]

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class TensorSource(Protocol):
    """Anything a merge can read tensors from."""

    name: str

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...


class DictSource:
    """Tensors held in memory, for tests and programmatic use."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<memory>") -> None:
        self.tensors = dict(tensors)
        self.name = name
        self.config: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensor(name)
        return TensorInfo(tuple(t.shape), t.dtype, self.name)

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name).clone()

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.name}: no tensor named {name!r}")
        return self.tensors[name]


def _link_root(model_dir: Path) -> Path:
    """Where a model's symlinked weight files may point: the model directory, or for a Hub cache
    snapshot (``models--org--name/snapshots/REV``) the repository's cache directory with its blobs."""
    resolved = model_dir.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith(
        ("models--", "datasets--")
    ):
        return resolved.parent.parent
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _plain(exc: BaseException) -> str:
    """An exception's text without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


class Checkpoint:
    """A Hugging Face model directory: its weights (lazily), its config.json, its other files."""

    def __init__(self, directory: Path, name: str | None = None) -> None:
        self.dir = Path(directory)
        self.name = name or str(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.name}: model directory {self.dir} does not exist")
        self.config = self._read_config()
        self._st: dict[str, _safetensors.Entry] = {}
        self._bin: dict[str, Path] = {}
        self._bin_loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._bin_lock = threading.Lock()
        self.weight_files: list[Path] = []
        self._index_weights()

    # -- TensorSource ---------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._st) if self._st else list(self._bin)

    def info(self, name: str) -> TensorInfo:
        if name in self._st:
            e = self._st[name]
            return TensorInfo(e.shape, e.dtype, e.file.name)
        if name in self._bin:
            t = self._bin_tensor(name)
            return TensorInfo(tuple(t.shape), t.dtype, self._bin[name].name)
        raise CheckpointError(f"{self.name}: no tensor named {name!r}")

    def get(self, name: str) -> torch.Tensor:
        if name in self._st:
            return _safetensors.read_tensor(self._st[name])
        if name in self._bin:
            return self._bin_tensor(name).clone()
        raise CheckpointError(f"{self.name}: no tensor named {name!r}")

    @property
    def dirs(self) -> list[Path]:
        """Every directory this source reads (never to be written into)."""
        return [self.dir]

    def entry(self, name: str) -> _safetensors.Entry | None:
        """Where tensor ``name``'s bytes lie, when it is stored in a safetensors file (else None)."""
        return self._st.get(name)

    def file_of(self, name: str) -> Path:
        if name in self._st:
            return self._st[name].file
        return self._bin[name]

    # -- discovery ------------------------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        path = self.dir / "config.json"
        if not path.is_file():
            return {}
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cfg

    def _index_weights(self) -> None:
        d = self.dir
        if (d / "model.safetensors.index.json").is_file():
            files = self._index_files(d / "model.safetensors.index.json")
            for f in files:
                self._add_safetensors(f)
            return
        if (d / "model.safetensors").is_file():
            self._add_safetensors(d / "model.safetensors")
            return
        if (d / "pytorch_model.bin.index.json").is_file():
            for f in self._index_files(d / "pytorch_model.bin.index.json"):
                self._add_bin(f)
            return
        if (d / "pytorch_model.bin").is_file():
            self._add_bin(d / "pytorch_model.bin")
            return
        others = sorted(d.glob("*.safetensors"))
        if len(others) == 1:
            self._add_safetensors(others[0])
            return
        raise CheckpointError(
            f"{self.name}: no weights found in {d}; expected one of {', '.join(WEIGHT_FILES)}"
        )

    def _index_files(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid index file ({exc})") from None
        # Checked as written, not through symlinks: the Hub cache links every file to a blob.
        root = Path(os.path.abspath(self.dir))
        files: list[Path] = []
        for tensor, rel in weight_map.items():
            if not isinstance(rel, str):
                raise CheckpointError(f"{index}: tensor {tensor!r} maps to {rel!r}, expected a file name")
            path = Path(os.path.normpath(root / rel))
            if os.path.isabs(rel) or root not in path.parents:
                raise CheckpointError(
                    f"{index}: tensor {tensor!r} points at {rel!r}, outside the model directory; refusing"
                )
            if not path.is_file():
                raise CheckpointError(f"{index}: tensor {tensor!r} is in {rel}, which does not exist")
            if path.is_symlink() and not _inside(path.resolve(), _link_root(root)):
                raise CheckpointError(
                    f"{index}: tensor {tensor!r} is in {rel}, a symlink to {path.resolve()}, outside the "
                    "model directory; refusing (copy the file into the model directory if it is meant to be there)"
                )
            if self.dir / rel not in files:
                files.append(self.dir / rel)
        return files

    def _add_safetensors(self, path: Path) -> None:
        entries, _ = _safetensors.read_header(path)
        for name, entry in entries.items():
            if name in self._st:
                raise CheckpointError(f"{self.name}: tensor {name!r} appears in two files")
            self._st[name] = entry
        self.weight_files.append(path)

    def _add_bin(self, path: Path) -> None:
        tensors = self._load_bin(path)
        for name in tensors:
            self._bin[name] = path
        self.weight_files.append(path)

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        with self._bin_lock:
            if path in self._bin_loaded:
                return self._bin_loaded[path]
            try:
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"{path}: refused to load: the file holds Python objects other than tensors "
                    f"({_plain(exc).splitlines()[0]}). Only plain state dicts are read; convert the "
                    "checkpoint to safetensors"
                ) from None
            except Exception as exc:  # a corrupt file can fail anywhere inside torch.load
                raise CheckpointError(f"{path}: cannot load: {type(exc).__name__}: {_plain(exc)}") from None
            if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
            ):
                raise CheckpointError(f"{path}: expected a dict of tensor names to tensors")
            self._bin_loaded[path] = obj
            return obj

    def _bin_tensor(self, name: str) -> torch.Tensor:
        return self._load_bin(self._bin[name])[name]

    def other_files(self) -> Iterable[Path]:
        """Files of the directory that are not weights (config, tokenizer, ...)."""
        weights = set(self.weight_files)
        for p in sorted(self.dir.iterdir()):
            if p.is_file() and p not in weights and not p.name.endswith(".index.json"):
                yield p
