"""Reading and writing the safetensors format directly: headers parsed and checked, data read lazily.

A tensor is read whole (:func:`read_tensor`), mapped copy-on-write (:func:`map_tensor`), or
sampled (:class:`SampledReader`: chosen entries of several same-shaped tensors, read in pieces).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergesmith._files import Stamp, check_unchanged, open_regular, stamp_of
from mergesmith._json import parse_json
from mergesmith._output import os_error
from mergesmith.errors import CheckpointError, OutputError

__all__ = [
    "Entry",
    "SampledReader",
    "ShardWriter",
    "header_bytes",
    "map_tensor",
    "read_header",
    "read_header_sized",
    "read_tensor",
    "same_bytes",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
MAX_HEADER_DEPTH = 8  # the header nests 3 levels (tensor, entry, shape)
MAX_DIMS = 8


@dataclass(frozen=True)
class Entry:
    """One tensor in a safetensors file: where its bytes are and what they hold."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    # the file as its header was read; a read checks it is still that file
    stamp: Stamp | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(
    path: Path, *, max_header: int = MAX_HEADER, why: str = ""
) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and check a safetensors header; returns (entries by name, metadata).

    Offsets are checked against the file's size and against each other, so a corrupt or hostile
    header is an error before any data is read. A header longer than ``max_header`` bytes is
    refused before it is read (``why`` says where a lower limit comes from).
    """
    entries, meta, _ = read_header_sized(path, max_header=max_header, why=why)
    return entries, meta


def read_header_sized(
    path: Path, *, max_header: int = MAX_HEADER, why: str = ""
) -> tuple[dict[str, Entry], dict[str, str], int]:
    """:func:`read_header`, and the header's length in bytes."""
    with open_regular(path) as f:
        try:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} does not fit in the file ({size} bytes); "
                    "the file is truncated or not safetensors"
                )
            if n > max_header:
                raise CheckpointError(
                    f"{path}: header of {n:,} bytes, more than the {max_header:,} allowed{why}; "
                    "the file is corrupt or not a model's weights"
                )
            raw = _read_exactly(f, n)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) < n:
        raise CheckpointError(f"{path}: the file ended inside its header; it is truncated")
    header = parse_json(
        raw,
        f"{path}: safetensors header",
        max_depth=MAX_HEADER_DEPTH,
        unique_keys=True,
        fix="the file is corrupt or not safetensors: copy or download it again",
    )
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + n
    data_size = size - data_start
    meta = header.pop("__metadata__", None) or {}
    entries: dict[str, Entry] = {}
    spans = []
    stamp = stamp_of(st)
    for name, info in header.items():
        entry = _entry(path, name, info, data_start, data_size, stamp)
        entries[name] = entry
        spans.append((entry.start, entry.end, name))
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in itertools.pairwise(spans):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return entries, metadata, n


def _read_exactly(f: Any, n: int) -> bytes:
    parts = []
    left = n
    while left:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _entry(
    path: Path, name: str, info: Any, data_start: int, data_size: int, stamp: Stamp | None = None
) -> Entry:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype_name = info.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r}")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    # bool is an int to Python, but true is no dimension or offset
    if (
        not isinstance(shape, list)
        or not all(type(s) is int and 0 <= s < 2**63 for s in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} has a malformed shape or data_offsets (shape {_short(shape)}, "
            f"data_offsets {_short(offsets)}; expected lists of non-negative integers); the file is corrupt"
        )
    if len(shape) > MAX_DIMS:
        raise CheckpointError(
            f"{path}: tensor {name!r} has {len(shape)} dimensions, more than the {MAX_DIMS} a model's "
            "tensor has; the file is corrupt or not a model's weights"
        )
    start, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    expected = numel * dtype.itemsize
    if expected > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} declares shape {tuple(shape)} {dtype_name} ({expected} bytes) "
            f"but the file's data section holds only {data_size} bytes; the file is corrupt or truncated"
        )
    if not 0 <= start <= end <= data_size or end - start != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} declares shape {tuple(shape)} {dtype_name} ({expected} bytes) "
            f"at bytes [{start}, {end}) of a {data_size}-byte data section; the file is corrupt or truncated"
        )
    return Entry(path, dtype, tuple(shape), data_start + start, data_start + end, stamp)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def read_tensor(entry: Entry, handle: io.RawIOBase | None = None) -> torch.Tensor:
    """Read one tensor's bytes straight into a new CPU tensor.

    The file is first checked to be the one whose header was read (same inode, size and
    modification time): a file replaced or rewritten since would give bytes that are not the tensor.
    """
    own = handle is None
    f: Any = handle if handle is not None else open_regular(entry.file)
    try:
        if entry.stamp is not None:
            check_unchanged(entry.file, entry.stamp, os.fstat(f.fileno()))
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes == 0:
            return out
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        f.seek(entry.start)
        got = 0
        while got < entry.nbytes:
            n = f.readinto(buf[got:])
            if not n:
                raise CheckpointError(
                    f"{entry.file}: unexpected end of file while reading a tensor; the file changed "
                    "or was truncated after its header was read: copy or download it again"
                )
            got += n
    except OSError as exc:
        raise CheckpointError(f"{entry.file}: cannot read: {exc.strerror or exc}") from None
    finally:
        if own:
            f.close()
    return out


def map_tensor(entry: Entry, maps: dict[Path, Any]) -> torch.Tensor:
    """A tensor over ``entry``'s bytes in a copy-on-write map of its file (kept in ``maps``, one
    per file): the page cache holds the bytes, shared by every process mapping the file, and a
    write would stay private to this process. A copy (:func:`read_tensor`) where the bytes do not
    start at a multiple of the element size."""
    if entry.nbytes == 0 or entry.start % entry.dtype.itemsize:
        return read_tensor(entry)
    if entry.stamp is not None:
        try:
            check_unchanged(entry.file, entry.stamp, os.stat(entry.file))
        except OSError as exc:
            raise CheckpointError(f"{entry.file}: cannot read: {exc.strerror or exc}") from None
    mapped = maps.get(entry.file)
    if mapped is None:
        mapped = maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="c")
    if entry.end > mapped.size:
        raise CheckpointError(
            f"{entry.file}: the file ends at byte {mapped.size}, before the tensor stored up to byte "
            f"{entry.end}; it is shorter than its header says: copy or download it again"
        )
    return torch.from_numpy(mapped[entry.start : entry.end]).view(entry.dtype).reshape(entry.shape)


def same_bytes(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two byte arrays hold the same bytes (compared eight at a time: memory speed)."""
    whole = len(x) - len(x) % 8
    return bool(
        np.array_equal(x[:whole].view(np.int64), y[:whole].view(np.int64))
        and np.array_equal(x[whole:], y[whole:])
    )


_BITS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
SAMPLE_CHUNK_BYTES = 1 << 20  # a sampled tensor is read in pieces of this size, each into a reused buffer


class SampledReader:
    """Reads same-shaped tensors chunk by chunk into small reused buffers, keeping only the sampled
    entries and whether each tensor's bytes equal the first's, so memory traffic is the read itself."""

    def __init__(self, chunk_bytes: int | None = None) -> None:
        self.chunk_bytes = chunk_bytes or SAMPLE_CHUNK_BYTES
        self.buffers: dict[int, torch.Tensor] = {}
        self.helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergesmith-read")
        self.handles: dict[Path, int] = {}
        self.seconds = 0.0

    def close(self) -> None:
        self.helper.shutdown(wait=True)
        for fd in self.handles.values():
            os.close(fd)
        self.handles.clear()

    def read(
        self, entries: Sequence[Entry], names: Sequence[str], index: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[bool]] | None:
        """The entries at ``index`` (sorted flat positions) of each tensor, and whether each tensor
        after the first holds the same bytes as the first; None where the tensors differ in dtype
        or shape, or their elements are not of 1, 2, 4 or 8 bytes. ``names`` name the tensors in
        errors."""
        first = entries[0]
        if any(e.dtype != first.dtype or e.shape != first.shape for e in entries):
            return None
        if first.dtype.itemsize not in _BITS:
            return None
        start_time = time.perf_counter()
        n = math.prod(first.shape)
        sample = len(index)
        size = first.dtype.itemsize
        step = max(1, self.chunk_bytes // size)
        bounds = torch.searchsorted(index, torch.arange(0, n + step, step)).tolist()
        bits = _BITS[size]  # entries are gathered as raw bit patterns: numpy has no bfloat16
        picked = np.empty((len(entries), sample), dtype=bits)
        local = (index % step).numpy()  # each sampled entry's place in its piece
        fds = [self._fd(e.file) for e in entries]
        chunks = -(-n // step)
        half = chunks // 2 if chunks >= 4 else chunks  # large tensors: the second half on the helper thread

        def scan(part: int, first_chunk: int, end_chunk: int) -> list[bool]:
            rows = self._buffer(part, len(entries), step * size).numpy()  # a row of bytes per input
            views = [memoryview(row) for row in rows]
            words = rows.view(bits)
            equal = [True] * (len(entries) - 1)
            for c in range(first_chunk, end_chunk):
                at = c * step
                count = min(step, n - at) * size
                for e, name, view, fd in zip(entries, names, views, fds):
                    _pread_all(fd, view[:count], e.start + at * size, e.file, name)
                lo, hi = bounds[c], bounds[c + 1]
                if hi > lo:
                    np.take(words, local[lo:hi], axis=1, out=picked[:, lo:hi], mode="clip")
                for k in range(len(equal)):
                    if equal[k]:
                        equal[k] = same_bytes(rows[0][:count], rows[k + 1][:count])
            return equal

        second = self.helper.submit(scan, 1, half, chunks) if half < chunks else None
        equal = scan(0, 0, half)
        if second is not None:
            equal = [a and b for a, b in zip(equal, second.result())]
        self.seconds += time.perf_counter() - start_time
        return [torch.from_numpy(p).view(first.dtype) for p in picked], equal

    def _buffer(self, part: int, inputs: int, nbytes: int) -> torch.Tensor:
        """A reused ``[inputs, nbytes]`` byte buffer for each part of a tensor read at once."""
        buf = self.buffers.get(part)
        if buf is None or buf.shape[0] < inputs or buf.shape[1] != nbytes:
            buf = self.buffers[part] = torch.empty((inputs, nbytes), dtype=torch.uint8)
        return buf[:inputs]

    def _fd(self, path: Path) -> int:
        if path not in self.handles:
            self.handles[path] = os.open(path, os.O_RDONLY)
        return self.handles[path]


def _pread_all(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    got = os.preadv(fd, [view], offset)
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(
                f"{path}: the file ended while reading tensor {name!r} at byte {offset + got}; it is shorter "
                "than its header says (changed while being read, or truncated): copy or download it again"
            )
        got += n


def header_bytes(
    tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header of a safetensors file holding ``tensors`` in order; returns it and each span."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        spans[name] = (offset, offset + nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, spans


class ShardWriter:
    """Writes one safetensors file whose tensors are known in advance, streaming their data in order."""

    def __init__(self, path: Path, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.path = path
        self.order = list(tensors)
        self.tensors = dict(tensors)
        head, self.spans = header_bytes(tensors, {"format": "pt"})
        self.next = 0
        try:
            self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise os_error(path, exc) from None
        try:
            self.f.write(head)
        except OSError as exc:
            self.abort()
            raise os_error(path, exc) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next]
        dtype, shape = self.tensors[expected]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise OutputError(
                f"{self.path}: expected {expected} {tuple(shape)} {dtype} next, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self.f.write(memoryview(data))  # type: ignore[arg-type]
        except OSError as exc:
            raise os_error(self.path, exc, f"writing {name} failed") from None
        self.next += 1

    def abort(self) -> None:
        """Give up the file after a failure: closed (an error closing it, such as the flush of a
        full disk failing again, is ignored: the first error is the one reported) and removed."""
        with suppress(OSError):
            self.f.close()
        self.path.unlink(missing_ok=True)

    @contextmanager
    def aborting(self) -> Iterator[ShardWriter]:
        """Within the block, any failure calls :meth:`abort` before it propagates."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        if self.next != len(self.order):
            self.abort()
            raise OutputError(f"{self.path}: closed after {self.next} of {len(self.order)} tensors")
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except OSError as exc:
            self.abort()
            raise os_error(self.path, exc, "cannot finish the file") from None
