"""Tensor sources: where a merge reads its inputs from, behind one small interface.

A source has ``keys()``, ``info(name)`` (shape and dtype from headers, no data read) and
``get(name)`` (the tensor's data, read on demand). A :class:`ModelSource` is a whole model as the
engine reads it: its tensors, ``config.json``, directories, weight files and side files.
:class:`Checkpoint` reads a model directory (safetensors single or sharded, or PyTorch ``.bin``
loaded with ``weights_only``); :class:`mergesmith.lora.AdaptedCheckpoint` wraps one with an adapter.
"""

from __future__ import annotations

import math
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
from mergesmith._files import Stamp, check_unchanged, open_regular, stamp_of
from mergesmith._json import read_json
from mergesmith._text import printable
from mergesmith.errors import CheckpointError

__all__ = ["Checkpoint", "ModelSource", "TensorInfo", "TensorSource"]

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)

# Every safetensors header of one model together, and its number of shards: far above any real
# model, low enough that a hostile index cannot make opening a model take minutes or gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_SHARDS = 10_000
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>[0-9]+)-of-(?P<n>[0-9]+)\.(?P<ext>safetensors|bin)$")
REFETCH = "copy or download the model again"
# tensors that quantization libraries store beside (or instead of) a module's weight: GPTQ/AWQ
# (qweight, qzeros, scales, g_idx), bitsandbytes (absmax, quant_map, quant_state, SCB), FP8 scales
QUANT_KEY = re.compile(
    r"\.(?:weight\.)?(?P<part>qweight|qzeros|scales|g_idx|absmax|nested_absmax|quant_map|nested_quant_map|"
    r"quant_state|SCB|weight_format|weight_scale|weight_scale_inv)(?:\.[^.]*)?$"
)
QUANT_FIX = "merge the unquantized (float16, bfloat16 or float32) model instead"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
KV_CACHE_SCALES = (".k_scale", ".v_scale", ".q_scale")  # compressed-tensors' kv_cache_scheme scales
FP8_DEFAULT_BLOCK = (128, 128)  # transformers' default weight_block_size for quant_method "fp8"
CT_FORMATS = ("float-quantized", "naive-quantized")  # compressed-tensors formats of plain FP8 weights
FP8_READ_AS = torch.bfloat16  # the dtype a dequantized FP8 weight is reported as (and written as)
# more quantized tensors, each refused when the tensors named beside it are there too (none: always):
# HQQ (W_q with its meta), AQLM (codes with codebooks), EETQ (weight_scales), Quanto (weight._data)
PACKED_KEY = re.compile(r"\.(?P<part>W_q|meta|codes|weight_scales|weight\._data)$")
PACKED_BESIDE: dict[str, tuple[str, ...]] = {
    "W_q": (),
    "meta": ("W_q", "weight"),
    "codes": ("codebooks",),
    "weight_scales": ("weight",),
    "weight._data": ("weight._scale",),
}


def _quantized_module(name: str, held: set[str]) -> str | None:
    """The module whose quantization data tensor ``name`` is, given the tensor names ``held``
    beside it; None for a tensor of an unquantized model."""
    m = QUANT_KEY.search(name)
    if m is not None:
        module = name[: m.start()]
        return module if m["part"] == "qweight" or f"{module}.weight" in held else None
    m = PACKED_KEY.search(name)
    if m is not None:
        module = name[: m.start()]
        beside = PACKED_BESIDE[m["part"]]
        return module if not beside or any(f"{module}.{b}" in held for b in beside) else None
    return None


# quant_method values (transformers' QuantizationMethod) as their formats are called
QUANT_FORMATS = {
    "aqlm": "AQLM",
    "auto-round": "AutoRound",
    "awq": "AWQ",
    "bitnet": "BitNet",
    "bitsandbytes": "bitsandbytes",
    "eetq": "EETQ",
    "fp_quant": "FPQuant",
    "gguf": "GGUF",
    "gptq": "GPTQ",
    "higgs": "HIGGS",
    "hqq": "HQQ",
    "mxfp4": "MXFP4",
    "nvfp4": "NVFP4",
    "quanto": "Quanto",
    "quark": "Quark",
    "sinq": "SINQ",
    "spqr": "SpQR",
    "torchao": "torchao",
    "vptq": "VPTQ",
}
GGUF_FIX = (
    "merge the original safetensors checkpoint the GGUF file was made from, or convert the GGUF file "
    "to safetensors first (transformers' from_pretrained(..., gguf_file=...) then save_pretrained)"
)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class TensorSource(Protocol):
    """Anything a merge can read tensors from."""

    name: str

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...


class ModelSource(TensorSource, Protocol):
    """A model a merge reads: its tensors, its ``config.json`` and the files beside its weights."""

    @property
    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` ({} without one)."""
        ...

    @property
    def dir(self) -> Path:
        """The model directory (its config, tokenizer and other side files)."""
        ...

    @property
    def dirs(self) -> list[Path]:
        """Every directory this source reads (never to be written into)."""
        ...

    @property
    def weight_files(self) -> list[Path]:
        """Every file the tensors are read from."""
        ...

    @property
    def fp8_scales(self) -> dict[str, str]:
        """FP8 weights dequantized as they are read: weight name -> its scales' tensor name."""
        ...

    def entry(self, name: str) -> _safetensors.Entry | None:
        """Where tensor ``name``'s bytes lie when a safetensors file stores them as they are read;
        None when the tensor exists only through :meth:`get`."""
        ...

    def side_file(self, name: str) -> Path | None:
        """The model's file ``name`` to copy into an output, None when absent."""
        ...


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


def _torch_reason(exc: BaseException) -> str:
    """The line of a ``torch.load`` error that says what was wrong, shortened to fit one line."""
    lines = [line.strip() for line in _plain(exc).splitlines() if line.strip()] or [type(exc).__name__]
    line = next((x for x in lines if "Unsupported" in x or "WeightsUnpickler error" in x), lines[0])
    return line if len(line) <= 200 else line[:200] + "..."


def _check_file_name(index: Path, tensor: str, rel: str) -> None:
    """A weight_map value must name a file beside the index: no directories, no ``..``."""
    if os.path.isabs(rel) or ".." in re.split(r"[/\\]", rel):
        raise CheckpointError(
            f"{index}: tensor {tensor!r} points at {rel!r}, outside the model directory; refusing "
            "(weight_map values name files beside the index)"
        )
    if not rel or rel in (".", "..") or any(c in rel for c in "/\\\0"):
        raise CheckpointError(
            f"{index}: tensor {tensor!r} points at {rel!r}, which is not a plain file name; refusing "
            "(weight_map values name files beside the index)"
        )


def _check_state_dict(path: Path, obj: object) -> None:
    fix = "save the model's state_dict() with torch.save, or convert it to safetensors"
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a dict of tensor names to tensors, found a {type(obj).__name__}; {fix}"
        )
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"{path}: expected a dict of tensor names to tensors, found the key {key!r} "
                f"({type(key).__name__}); {fix}"
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a dict of tensor names to tensors, but {key!r} holds a "
                f"{type(value).__name__}; {fix}"
            )


def _quant_kind(qc: object) -> str:
    """How a quantization_config names its format, as `` (GPTQ, 4-bit)``; empty without a quant_method."""
    how = qc.get("quant_method") if isinstance(qc, dict) else None
    if not how:
        return ""
    assert isinstance(qc, dict)
    name = QUANT_FORMATS.get(str(how).lower(), printable(str(how)))
    bits = qc.get("bits", qc.get("nbits"))
    if bits is None and qc.get("load_in_4bit") is True:
        bits = 4
    elif bits is None and qc.get("load_in_8bit") is True:
        bits = 8
    return f" ({name}, {bits}-bit)" if isinstance(bits, int) and not isinstance(bits, bool) else f" ({name})"


class Checkpoint:
    """A Hugging Face model directory: its weights (lazily), its config.json, its other files."""

    def __init__(self, directory: Path, name: str | None = None) -> None:
        self.dir = Path(directory)
        self.name = name or str(directory)
        if self.dir.suffix.lower() == ".gguf" and self.dir.is_file():
            raise CheckpointError(
                f"{self.dir}: a GGUF file, quantized for llama.cpp: it cannot be merged; {GGUF_FIX}"
            )
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.name}: model directory {self.dir} does not exist")
        self.config = self._read_config()
        self._st: dict[str, _safetensors.Entry] = {}
        self._bin: dict[str, Path] = {}
        self._bin_loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._bin_lock = threading.Lock()
        self._bin_stamps: dict[Path, Stamp] = {}
        self._header_bytes = 0
        self.weight_files: list[Path] = []
        # FP8 block-scaled weights (quant_method "fp8"): weight name -> its weight_scale_inv tensor
        self.fp8_scales: dict[str, str] = {}
        self.fp8_block: tuple[int, int] | None = None  # None: compressed-tensors scales
        self._fp8_hidden: set[str] = set()  # scale tensors, not part of the model read
        self._refuse_gguf()
        self._index_weights()
        self._refuse_quantized()

    # -- TensorSource ---------------------------------------------------------------------------

    def keys(self) -> list[str]:
        keys = list(self._st) if self._st else list(self._bin)
        if self._fp8_hidden:
            return [k for k in keys if k not in self._fp8_hidden]
        return keys

    def info(self, name: str) -> TensorInfo:
        if name in self.fp8_scales:
            raw = self._raw_info(name)
            return TensorInfo(raw.shape, FP8_READ_AS, raw.file)
        return self._raw_info(name)

    def _raw_info(self, name: str) -> TensorInfo:
        if name in self._st:
            e = self._st[name]
            return TensorInfo(e.shape, e.dtype, e.file.name)
        if name in self._bin:
            t = self._bin_tensor(name)
            return TensorInfo(tuple(t.shape), t.dtype, self._bin[name].name)
        raise CheckpointError(f"{self.name}: no tensor named {name!r}")

    def get(self, name: str) -> torch.Tensor:
        if name in self.fp8_scales:
            return self._dequantized(name)
        return self._raw_get(name)

    def _raw_get(self, name: str) -> torch.Tensor:
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
        """Where tensor ``name``'s bytes lie, when it is stored in a safetensors file as it is read
        (else None: a dequantized FP8 weight exists only through :meth:`get`)."""
        if name in self.fp8_scales:
            return None
        return self._st.get(name)

    def file_of(self, name: str) -> Path:
        if name in self._st:
            return self._st[name].file
        return self._bin[name]

    # -- discovery ------------------------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        path = self.dir / "config.json"
        if not os.path.lexists(path):
            return {}
        cfg = read_json(path, fix="repair config.json or download the model again")
        if not isinstance(cfg, dict):
            raise CheckpointError(
                f"{path}: expected a JSON object of settings, found a {type(cfg).__name__}; "
                "repair config.json or download the model again"
            )
        return cfg

    def _index_weights(self) -> None:
        d = self.dir
        if os.path.lexists(d / "model.safetensors.index.json"):
            index = d / "model.safetensors.index.json"
            weight_map, files = self._index_files(index)
            for f in files:
                self._add_safetensors(f)
            self._check_index(index, weight_map, {n: e.file for n, e in self._st.items()})
            return
        if os.path.lexists(d / "model.safetensors"):
            self._add_safetensors(self._weight_file(d / "model.safetensors"))
            return
        if os.path.lexists(d / "pytorch_model.bin.index.json"):
            index = d / "pytorch_model.bin.index.json"
            weight_map, files = self._index_files(index)
            for f in files:
                self._add_bin(f)
            self._check_index(index, weight_map, self._bin)
            return
        if os.path.lexists(d / "pytorch_model.bin"):
            self._add_bin(self._weight_file(d / "pytorch_model.bin"))
            return
        others = sorted(d.glob("*.safetensors"))
        if len(others) == 1:
            self._add_safetensors(self._weight_file(others[0]))
            return
        raise CheckpointError(
            f"{self.name}: no weights found in {d}; expected one of {', '.join(WEIGHT_FILES)}"
        )

    def _refuse_quantized(self) -> None:
        """Quantized weights are integers or codes plus scales: merging them as if they were the
        weights would write garbage, so a quantized model is refused; block-scaled FP8 weights
        (quant_method "fp8") are dequantized as they are read instead."""
        for cfg in (self.config, self.config.get("text_config")):
            if isinstance(cfg, dict) and cfg.get("quantization_config") is not None:
                qc = cfg["quantization_config"]
                how = qc.get("quant_method") if isinstance(qc, dict) else None
                if how == "fp8" and isinstance(qc, dict):
                    self._index_fp8(qc, compressed=False)
                    continue
                if how == "compressed-tensors" and isinstance(qc, dict):
                    fmt = qc.get("format")
                    if fmt in CT_FORMATS:
                        self._index_fp8(qc, compressed=True)
                        continue
                    raise CheckpointError(
                        f"{self.dir / 'config.json'}: has a quantization_config (compressed-tensors, format "
                        f"{printable(repr(fmt))}): only FP8 weights (format float-quantized) are dequantized; "
                        f"{QUANT_FIX}"
                    )
                kind = _quant_kind(qc)
                raise CheckpointError(
                    f"{self.dir / 'config.json'}: has a quantization_config{kind}: the weights are "
                    f"quantized and cannot be merged as they are; {QUANT_FIX}"
                )
        keys = self.keys()
        held = set(keys)
        for name in keys:
            module = _quantized_module(name, held)
            if module is not None:
                raise CheckpointError(
                    f"{self.name}: tensor {name!r} (in {self.file_of(name).name}) is quantization data "
                    f"for {module!r}: the weights are quantized and cannot be merged as they are; {QUANT_FIX}"
                )

    def _index_fp8(self, qc: Mapping[str, Any], *, compressed: bool) -> None:
        """Pair each FP8 weight with its scales: ``weight_scale_inv`` in blocks of
        ``weight_block_size`` (quant_method fp8), or a per-tensor or per-row ``weight_scale``
        (compressed-tensors); the activation scales (``input_scale``) and a compressed-tensors
        model's key/value cache scales (``k_scale``, ``v_scale``) are left out of the model."""
        where = self.dir / "config.json"
        suffix = "_scale" if compressed else "_scale_inv"
        if not compressed:
            block = qc.get("weight_block_size", list(FP8_DEFAULT_BLOCK))
            if not (
                isinstance(block, list)
                and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
            ):
                raise CheckpointError(
                    f"{where}: quantization_config.weight_block_size is {printable(repr(block))}, expected "
                    "two positive integers such as [128, 128]; repair config.json or download the model again"
                )
            self.fp8_block = (block[0], block[1])
        held = set(self._st) if self._st else set(self._bin)
        for name in sorted(held):
            info = self._raw_info(name)
            if compressed and name.endswith(".weight_zero_point"):
                raise CheckpointError(
                    f"{self.name}: tensor {name!r} (in {info.file}) is a zero point: asymmetric "
                    f"quantization is not dequantized; {QUANT_FIX}"
                )
            if not name.endswith(".weight" + suffix):
                continue
            weight = name[: -len(suffix)]
            if weight not in held:
                raise CheckpointError(
                    f"{self.name}: tensor {name!r} (in {info.file}) scales {weight!r}, which the model "
                    f"does not have; {REFETCH}"
                )
            w = self._raw_info(weight)
            if w.dtype not in FP8_DTYPES or len(w.shape) != 2:
                raise CheckpointError(
                    f"{self.name}: tensor {weight!r} (in {w.file}) has a {name.rsplit('.', 1)[-1]} but is "
                    f"{str(w.dtype).replace('torch.', '')} {list(w.shape)}, not a float8 matrix: a "
                    f"quantization mergesmith cannot read as it is; {QUANT_FIX}"
                )
            if compressed:
                n = math.prod(info.shape)
                fits = (n == 1 and len(info.shape) <= 2) or info.shape in ((w.shape[0], 1), (w.shape[0],))
                want = f"[{w.shape[0]}, 1] (one per row) or [1] (one for the tensor)"
                of = f"{weight!r} {list(w.shape)}"
            else:
                bs0, bs1 = self.fp8_block or FP8_DEFAULT_BLOCK
                blocks = (-(-w.shape[0] // bs0), -(-w.shape[1] // bs1))
                fits = info.shape == blocks
                want = f"{list(blocks)}"
                of = f"{weight!r} {list(w.shape)} in blocks of {[bs0, bs1]}"
            if not fits or not info.dtype.is_floating_point:
                raise CheckpointError(
                    f"{self.name}: tensor {name!r} (in {info.file}) is "
                    f"{str(info.dtype).replace('torch.', '')} {list(info.shape)}, but {of} needs float "
                    f"scales of shape {want}; {REFETCH}"
                )
            self.fp8_scales[weight] = name
            self._fp8_hidden.add(name)
            activation = weight[: -len("weight")] + "input_scale"
            if compressed and activation in held:
                self._fp8_hidden.add(activation)
        if compressed:  # the key/value cache's (and attention's) quantization scales: no weights
            self._fp8_hidden.update(n for n in held if n.endswith(KV_CACHE_SCALES))
        for name in sorted(held):
            info = self._raw_info(name)
            if info.dtype in FP8_DTYPES and name not in self.fp8_scales:
                raise CheckpointError(
                    f"{self.name}: tensor {name!r} (in {info.file}) is "
                    f"{str(info.dtype).replace('torch.', '')} without a {name + suffix!r} to "
                    f"dequantize it with; {REFETCH}"
                )

    def _dequantized(self, name: str) -> torch.Tensor:
        """An FP8 weight times its scales, in float32: per block (each scale covers a block of
        ``weight_block_size`` entries, the last blocks of a row or column cut to fit), per row, or
        one for the whole tensor."""
        weight = self._raw_get(name).float()
        scale = self._raw_get(self.fp8_scales[name]).float()
        rows, cols = weight.shape
        if self.fp8_block is None:  # compressed-tensors: per tensor or per row
            return weight.mul_(scale.reshape(()) if scale.numel() == 1 else scale.reshape(rows, 1))
        bs0, bs1 = self.fp8_block
        full = scale.repeat_interleave(bs0, dim=0)[:rows].repeat_interleave(bs1, dim=1)[:, :cols]
        return weight.mul_(full)

    def _refuse_gguf(self) -> None:
        """A GGUF file holds llama.cpp's quantized blocks, not weights to merge: a directory with one
        (alone or beside safetensors) is refused before any weight is read."""
        try:
            found = sorted(p.name for p in self.dir.iterdir() if p.name.lower().endswith(".gguf"))
        except OSError as exc:
            raise CheckpointError(
                f"{self.dir}: cannot list the model directory: {exc.strerror or exc}"
            ) from None
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise CheckpointError(
                f"{self.dir / found[0]}{more}: a GGUF file, quantized for llama.cpp: a model directory "
                f"holding one cannot be merged; {GGUF_FIX}"
            )

    def _weight_file(self, path: Path, index: Path | None = None) -> Path:
        """``path``, refused when it is a symlink (or reached through one) leading outside the
        model directory; a Hub cache snapshot's links into its repository's blobs are inside."""
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise CheckpointError(f"{path}: cannot read: {exc}") from None
        if not _inside(real, _link_root(self.dir)):
            where = f"{index}: " if index is not None else ""
            raise CheckpointError(
                f"{where}{path} is a symlink to {real}, outside the model directory; refusing (copy the "
                "file into the model directory if it is meant to be there)"
            )
        return path

    def _index_files(self, index: Path) -> tuple[dict[str, str], list[Path]]:
        """The index's weight map and the shard files it names, each checked to be a plain file
        name of an existing file in the model directory, with no shard of the set left out."""
        data = read_json(index, fix="repair the index or download the model again")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index}: not a valid index file (expected an object with a weight_map object of tensor "
                f"names to file names); {REFETCH}"
            )
        names: dict[str, str] = {}  # file name -> first tensor placed in it
        for tensor, rel in weight_map.items():
            if not isinstance(rel, str):
                raise CheckpointError(f"{index}: tensor {tensor!r} maps to {rel!r}, expected a file name")
            if rel not in names:
                _check_file_name(index, tensor, rel)
                names[rel] = tensor
                if len(names) > MAX_SHARDS:
                    raise CheckpointError(
                        f"{index}: names more than {MAX_SHARDS:,} shard files; the index is corrupt: {REFETCH}"
                    )
        files: list[Path] = []
        for rel, tensor in names.items():
            path = self.dir / rel
            if not os.path.lexists(path):
                raise CheckpointError(f"{index}: tensor {tensor!r} is in {rel}, which does not exist")
            files.append(self._weight_file(path, index))
        self._check_shard_set(index, set(names))
        return weight_map, files

    def _check_shard_set(self, index: Path, listed: set[str]) -> None:
        """Every shard of a ``NAME-i-of-n`` set, and every such file in the directory, is listed."""
        sets: set[tuple[str, int, str]] = set()
        for rel in listed:
            m = SHARD_NAME.match(rel)
            if m and len(m["n"]) <= 6:
                sets.add((m["stem"], int(m["n"]), m["ext"]))
        for stem, n, ext in sorted(sets):
            width = max(5, len(str(n)))
            for i in range(1, min(n, MAX_SHARDS) + 1):
                rel = f"{stem}-{i:0{width}d}-of-{n:0{width}d}.{ext}"
                if rel in listed:
                    continue
                state = "is in the model directory" if os.path.lexists(self.dir / rel) else "is missing too"
                raise CheckpointError(
                    f"{index}: no tensor is placed in shard {rel} (shard {i} of {n}), which {state}; the "
                    f"index or the download is incomplete: {REFETCH}"
                )
        suffix = index.name.removesuffix(".index.json").rsplit(".", 1)[-1]
        for p in sorted(self.dir.glob(f"*.{suffix}")):
            if SHARD_NAME.match(p.name) and p.name not in listed:
                raise CheckpointError(
                    f"{index}: {p.name} is in the model directory but not in the index, so its tensors "
                    "would be left out of the merge; add them to the weight_map or remove the file"
                )

    def _check_index(self, index: Path, weight_map: Mapping[str, str], held: Mapping[str, Path]) -> None:
        """Each tensor the index lists is in the shard it names."""
        for tensor, rel in weight_map.items():
            where = held.get(tensor)
            if where is None:
                raise CheckpointError(
                    f"{index}: lists tensor {tensor!r} in {rel}, but no shard holds it; the index or the "
                    f"shard is wrong: {REFETCH}"
                )
            if where.name != rel:
                raise CheckpointError(
                    f"{index}: lists tensor {tensor!r} in {rel}, but it is in {where.name}; the index or "
                    f"the shards are wrong: {REFETCH}"
                )

    def _add_safetensors(self, path: Path) -> None:
        entries, _, n = _safetensors.read_header_sized(
            path,
            max_header=MAX_HEADER_BYTES - self._header_bytes,
            why=f" (all of a model's safetensors headers together may take {MAX_HEADER_BYTES:,} bytes)",
        )
        self._header_bytes += n
        for name, entry in entries.items():
            if name in self._st:
                raise CheckpointError(f"{self.name}: tensor {name!r} appears in two files")
            self._st[name] = entry
        self.weight_files.append(path)

    def _add_bin(self, path: Path) -> None:
        tensors = self._load_bin(path)
        for name in tensors:
            if name in self._bin:
                raise CheckpointError(f"{self.name}: tensor {name!r} appears in two files")
            self._bin[name] = path
        self.weight_files.append(path)

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        with self._bin_lock:
            if path in self._bin_loaded:
                return self._bin_loaded[path]
            open_regular(path).close()  # refuse a FIFO or device before torch opens it
            try:
                before = os.stat(path)
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"{path}: refused to load: the file holds Python objects other than tensors "
                    f"({_torch_reason(exc)}). Only plain state dicts are read; convert the "
                    "checkpoint to safetensors"
                ) from None
            except Exception as exc:  # a corrupt file can fail anywhere inside torch.load
                raise CheckpointError(
                    f"{path}: cannot load: {type(exc).__name__}: {_torch_reason(exc)}; {REFETCH}"
                ) from None
            _check_state_dict(path, obj)
            self._bin_stamps[path] = stamp_of(before)
            tensors: dict[str, torch.Tensor] = obj
            self._bin_loaded[path] = tensors
            return tensors

    def _bin_tensor(self, name: str) -> torch.Tensor:
        path = self._bin[name]
        tensors = self._load_bin(path)
        # the tensors are mapped from the file: one truncated since would fault on access, so the
        # file is checked and the tensor copied out at once, leaving no later access to the mapping
        try:
            check_unchanged(path, self._bin_stamps[path], os.stat(path))
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return tensors[name].clone()

    def side_file(self, name: str) -> Path | None:
        """The model's file ``name`` (a tokenizer or generation file to copy into the output), None
        when absent; refused when it is not a regular file or links outside the model directory,
        so that nothing from elsewhere on the machine is copied into a merged model."""
        path = self.dir / name
        if not os.path.lexists(path):
            return None
        self._weight_file(path)
        open_regular(path).close()
        return path

    def other_files(self) -> Iterable[Path]:
        """Files of the directory that are not weights (config, tokenizer, ...)."""
        weights = set(self.weight_files)
        for p in sorted(self.dir.iterdir()):
            if p.is_file() and p not in weights and not p.name.endswith(".index.json"):
                yield p
