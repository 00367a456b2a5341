"""Hostile or broken model files: each is refused with a one-line error naming the file, never a
traceback, a hang or a silently wrong merge."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from mergesmith.errors import CheckpointError
from mergesmith.sources import Checkpoint


def write_st(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused(directory: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(directory)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# -- safetensors headers --------------------------------------------------------------------------


def test_duplicate_tensor_key_in_a_header_is_refused(tmp_path: Path) -> None:
    raw = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = write_st(tmp_path / "m" / "model.safetensors", raw, bytes(8))
    msg = refused(path.parent)
    assert msg.startswith(f"{path}: safetensors header: the key 'w' is given twice")
    assert "copy or download it again" in msg


def test_nesting_bomb_in_a_header_is_refused(tmp_path: Path) -> None:
    bomb = b"[" * 200_000 + b"]" * 200_000
    raw = b'{"__metadata__": ' + bomb + b', "w": ' + json.dumps(W).encode() + b"}"
    path = write_st(tmp_path / "m" / "model.safetensors", raw, bytes(8))
    msg = refused(path.parent)
    assert msg.startswith(f"{path}: safetensors header: JSON nested")


def test_integer_with_thousands_of_digits_in_a_header_is_refused(tmp_path: Path) -> None:
    raw = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'
    path = write_st(tmp_path / "m" / "model.safetensors", raw, bytes(8))
    msg = refused(path.parent)
    assert msg.startswith(f"{path}: safetensors header: holds an integer with thousands of digits")


@pytest.mark.parametrize(
    ("shape", "offsets", "found"),
    [
        ([True, 2], [0, 8], "shape [True, 2]"),
        ([2], [False, 8], "data_offsets [False, 8]"),
        ([2**64], [0, 8], f"shape [{2**64}]"),
    ],
    ids=["bool-dim", "bool-offset", "dim-past-int64"],
)
def test_dims_and_offsets_must_be_plain_integers(
    tmp_path: Path, shape: list[Any], offsets: list[Any], found: str
) -> None:
    entry = {"dtype": "F32", "shape": shape, "data_offsets": offsets}
    path = write_st(tmp_path / "m" / "model.safetensors", {"w": entry}, bytes(8))
    msg = refused(path.parent)
    assert msg.startswith(f"{path}: tensor 'w' has a malformed shape or data_offsets (shape ")
    assert found in msg
    assert "expected lists of non-negative integers" in msg


def test_too_many_dimensions_are_refused(tmp_path: Path) -> None:
    entry = {"dtype": "F32", "shape": [1] * 9 + [2], "data_offsets": [0, 8]}
    path = write_st(tmp_path / "m" / "model.safetensors", {"w": entry}, bytes(8))
    msg = refused(path.parent)
    assert msg == (
        f"{path}: tensor 'w' has 10 dimensions, more than the 8 a model's tensor has; "
        "the file is corrupt or not a model's weights"
    )


def test_element_count_past_the_file_is_refused_before_allocating(tmp_path: Path) -> None:
    entry = {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}
    path = write_st(tmp_path / "m" / "model.safetensors", {"w": entry}, bytes(8))
    msg = refused(path.parent)
    assert f"{path}: tensor 'w' declares shape ({2**62}, {2**62}) F32 ({2**126:,} bytes)" in msg
    assert "more than the file's whole 8-byte data section" in msg
