"""Reading input models: every on-disk layout, laziness, refusal of hostile files, Hub cache resolution."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesmith import _hub, _safetensors, card
from mergesmith.api import merge, validate
from mergesmith.errors import CheckpointError
from mergesmith.sources import Checkpoint
from tests import tiny

# -- helpers --------------------------------------------------------------------------------------


def small_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (7, 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.0.mlp.up_proj.weight": (6, 4),
        "model.layers.1.input_layernorm.weight": (4,),
        "model.norm.weight": (4,),
        "lm_head.weight": (7, 4),
    }
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def write_st(path: Path, header: dict[str, Any] | bytes, data: bytes, *, length: int | None = None) -> Path:
    """A safetensors file written byte by byte, so that the header can say anything."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got, want)


# -- every layout ---------------------------------------------------------------------------------

LAYOUTS = [
    ("safetensors", 1, "model.safetensors"),
    ("safetensors", 3, "model-0000{i}-of-00003.safetensors"),
    ("bin", 1, "pytorch_model.bin"),
    ("bin", 2, "pytorch_model-0000{i}-of-00002.bin"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("fmt", "shards", "pattern"), LAYOUTS, ids=["st", "st-sharded", "bin", "bin-sharded"]
)
def test_checkpoint_reads_every_layout_exactly(
    tmp_path: Path, fmt: str, shards: int, pattern: str, dtype: torch.dtype
) -> None:
    state = small_state(1, dtype)
    d = tiny.save(tmp_path / "m", state, tiny.llama_config(), fmt=fmt, shards=shards)
    ckpt = Checkpoint(d, name="m")

    assert sorted(ckpt.keys()) == sorted(state)
    assert ckpt.config["model_type"] == "llama"
    expected_files = {pattern.format(i=i + 1) for i in range(shards)}
    assert {p.name for p in ckpt.weight_files} == expected_files
    for name, want in state.items():
        info = ckpt.info(name)
        assert info.shape == tuple(want.shape)
        assert info.dtype == dtype
        assert info.file in expected_files
        assert info.nbytes == want.numel() * want.element_size()
        assert_same(ckpt.get(name), want)
        assert ckpt.file_of(name).name == info.file
    # the weight files and the index are not "other files"; config.json is
    assert [p.name for p in ckpt.other_files()] == ["config.json"]


def test_sharded_index_places_each_tensor_in_its_file(tmp_path: Path) -> None:
    state = small_state(2)
    d = tiny.save(tmp_path / "m", state, tiny.llama_config(), shards=3)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    ckpt = Checkpoint(d)
    for name in state:
        assert ckpt.info(name).file == weight_map[name]


def test_bin_get_returns_a_copy(tmp_path: Path) -> None:
    state = small_state(3)
    d = tiny.save(tmp_path / "m", state, tiny.llama_config(), fmt="bin")
    ckpt = Checkpoint(d)
    t = ckpt.get("model.norm.weight")
    t.zero_()
    assert_same(ckpt.get("model.norm.weight"), state["model.norm.weight"])


def test_unknown_tensor_name(tmp_path: Path) -> None:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config())
    ckpt = Checkpoint(d, name="mymodel")
    with pytest.raises(CheckpointError, match=r"mymodel: no tensor named 'nope'"):
        ckpt.get("nope")
    with pytest.raises(CheckpointError, match=r"mymodel: no tensor named 'nope'"):
        ckpt.info("nope")


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"no weights found in .*expected one of model\.safetensors\.index"
    ):
        Checkpoint(tmp_path / "m")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist"):
        Checkpoint(tmp_path / "nothing")


def test_bad_config_json(tmp_path: Path) -> None:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config())
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON \(Expecting property name"):
        Checkpoint(d)


# -- laziness -------------------------------------------------------------------------------------


def test_opening_a_safetensors_checkpoint_reads_no_tensor_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = small_state(4)
    d = tiny.save(tmp_path / "m", state, tiny.llama_config(), shards=2)
    calls: list[str] = []
    real = _safetensors.read_tensor

    def counting(entry: _safetensors.Entry, handle: Any = None) -> torch.Tensor:
        calls.append(entry.file.name)
        return real(entry, handle)

    monkeypatch.setattr(_safetensors, "read_tensor", counting)
    ckpt = Checkpoint(d)
    names = ckpt.keys()
    assert len(names) == len(state)
    for name in names:
        ckpt.info(name)
    assert calls == []
    assert_same(ckpt.get("model.norm.weight"), state["model.norm.weight"])
    assert calls == [ckpt.info("model.norm.weight").file]


def test_data_rewritten_after_open_is_refused_not_read(tmp_path: Path) -> None:
    """Tensor bytes rewritten after the checkpoint is opened no longer match its header: refused."""
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.full((4,), 7.0)
    path = tmp_path / "m" / "model.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
    }
    write_st(path, header, a.numpy().tobytes() + b.numpy().tobytes())
    ckpt = Checkpoint(path.parent)
    assert ckpt.info("a").shape == (2, 3)
    assert ckpt.info("b").dtype == torch.float32
    assert_same(ckpt.get("a"), a)

    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start : start + 24] = (-a).numpy().tobytes()
    path.write_bytes(bytes(raw))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: was rewritten \(its modification time"):
        ckpt.get("a")


def test_truncated_after_open_is_an_error_on_read(tmp_path: Path) -> None:
    path = write_st(
        tmp_path / "m" / "model.safetensors",
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        bytes(16),
    )
    ckpt = Checkpoint(path.parent)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: changed size from [0-9,]+ to [0-9,]+ bytes"
    ):
        ckpt.get("a")


# -- .bin safety ----------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_bin_with_arbitrary_objects_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "m"
    d.mkdir()
    torch.save({"model.norm.weight": torch.ones(4), "evil": _Exploit(marker)}, d / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        Checkpoint(d)
    msg = str(info.value)
    assert str(d / "pytorch_model.bin") in msg
    assert "refused to load" in msg
    assert "Only plain state dicts are read" in msg
    assert "convert the checkpoint to safetensors" in msg
    assert not marker.exists()


def test_sharded_bin_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config(), fmt="bin", shards=2)
    torch.save(
        {"lm_head.weight": torch.ones(7, 4), "x": _Exploit(marker)}, d / "pytorch_model-00002-of-00002.bin"
    )
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: refused to load"):
        Checkpoint(d)
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    torch.save([torch.ones(2)], d / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin: expected a dict of tensor names to tensors"
    ):
        Checkpoint(d)


def test_bin_that_is_garbage(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"this is not a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot load"):
        Checkpoint(d)


# -- hostile safetensors headers ------------------------------------------------------------------


def _hostile(tmp_path: Path, header: dict[str, Any] | bytes, data: bytes, **kw: Any) -> tuple[Path, str]:
    path = write_st(tmp_path / "m" / "model.safetensors", header, data, **kw)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(path.parent)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return path, msg


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    raw = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path, msg = _hostile(tmp_path, raw, bytes(4), length=10_000)
    size = path.stat().st_size
    assert f"header length 10000 does not fit in the file ({size} bytes)" in msg
    assert "truncated or not safetensors" in msg


def test_header_length_absurd(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, b"{}", b"", length=2**63)
    assert f"header length {2**63} does not fit in the file" in msg


def test_file_too_short(tmp_path: Path) -> None:
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(
        CheckpointError, match=re.escape(f"{path}: too short to be a safetensors file (3 bytes)")
    ):
        Checkpoint(path.parent)


def test_header_not_json(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, b'{"a": {"dtype": ', b"")
    assert "safetensors header: not valid JSON" in msg


def test_header_not_utf8(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, b"\xff\xfe\xfd\xfc", b"")
    assert "safetensors header: not UTF-8 text (byte 0)" in msg


def test_header_not_an_object(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, b"[1, 2, 3]", b"")
    assert "the safetensors header is not a JSON object" in msg


def test_unknown_dtype(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    assert "tensor 'w' has unknown dtype 'F7'" in msg


def test_missing_dtype(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, {"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    assert "tensor 'w' has unknown dtype None" in msg


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]},
        {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
    ],
    ids=["negative-dim", "shape-string", "one-offset", "offset-string", "float-dim"],
)
def test_malformed_shape_or_offsets(tmp_path: Path, entry: dict[str, Any]) -> None:
    _, msg = _hostile(tmp_path, {"w": entry}, bytes(8))
    assert "tensor 'w' has a malformed shape or data_offsets" in msg


def test_entry_not_an_object(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, {"w": [1, 2]}, bytes(8))
    assert "tensor 'w' has a malformed header entry" in msg


def test_data_offsets_past_the_end(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(16))
    assert "tensor 'w' declares shape (4,) F32 (16 bytes) at bytes [8, 24) of a 16-byte data section" in msg
    assert "the file is corrupt or truncated" in msg


def test_negative_offset(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(16))
    assert "tensor 'w' declares shape (2,) F32 (8 bytes) at bytes [-8, 0) of a 16-byte data section" in msg


def test_offsets_inconsistent_with_shape(tmp_path: Path) -> None:
    _, msg = _hostile(tmp_path, {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(24))
    assert (
        "tensor 'w' declares shape (2, 3) BF16 (12 bytes) at bytes [0, 24) of a 24-byte data section" in msg
    )


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    _, msg = _hostile(tmp_path, header, bytes(24))
    assert "tensors 'a' and 'b' overlap in the file" in msg


def test_identical_spans_overlap(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]},
    }
    _, msg = _hostile(tmp_path, header, bytes(16))
    assert "tensors 'a' and 'b' overlap in the file" in msg


def test_valid_handwritten_header_with_metadata_and_empty_tensor(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]},
        "i": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
    }
    path = write_st(tmp_path / "m" / "model.safetensors", header, struct.pack("<2q", 5, -9))
    entries, meta = _safetensors.read_header(path)
    assert meta == {"format": "pt"}
    assert set(entries) == {"e", "i"}
    ckpt = Checkpoint(path.parent)
    assert_same(ckpt.get("i"), torch.tensor([5, -9], dtype=torch.int64))
    assert_same(ckpt.get("e"), torch.empty((0, 3), dtype=torch.float16))


def test_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    w = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    write_st(d / "one.safetensors", {"w": w, "a": {**w, "data_offsets": [4, 8]}}, bytes(8))
    write_st(d / "two.safetensors", {"w": w}, bytes(4))
    index = {"weight_map": {"w": "one.safetensors", "a": "one.safetensors", "x": "two.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor 'w' appears in two files"):
        Checkpoint(d)


# -- index files ----------------------------------------------------------------------------------


def _index_model(tmp_path: Path, target: str) -> Path:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config(), shards=2)
    write_st(
        tmp_path / "outside.safetensors",
        {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        bytes(4),
    )
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["x"] = target
    index_path.write_text(json.dumps(index))
    return d


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_index_pointing_outside_the_model_directory_is_refused(tmp_path: Path, kind: str) -> None:
    target = "../outside.safetensors" if kind == "relative" else str(tmp_path / "outside.safetensors")
    d = _index_model(tmp_path, target)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(d)
    msg = str(info.value)
    assert str(d / "model.safetensors.index.json") in msg
    assert f"tensor 'x' points at {target!r}, outside the model directory; refusing" in msg


def test_bin_index_pointing_outside_is_refused(tmp_path: Path) -> None:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config(), fmt="bin", shards=2)
    torch.save({"x": torch.ones(1)}, tmp_path / "outside.bin")
    index_path = d / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["x"] = "../outside.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'\.\./outside\.bin', outside the model directory"):
        Checkpoint(d)


def test_index_pointing_at_a_missing_file(tmp_path: Path) -> None:
    d = _index_model(tmp_path, "model-00009-of-00009.safetensors")
    with pytest.raises(
        CheckpointError, match=r"tensor 'x' is in model-00009-of-00009\.safetensors, which does not exist"
    ):
        Checkpoint(d)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON (Expecting property name"),
        ('{"metadata": {}}', "not a valid index file"),
        ('{"weight_map": ["a"]}', "not a valid index file"),
        ('{"weight_map": {"a": 3}}', "tensor 'a' maps to 3, expected a file name"),
    ],
)
def test_malformed_index(tmp_path: Path, text: str, fragment: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(f"{d / 'model.safetensors.index.json'}: ")) as info:
        Checkpoint(d)
    assert fragment in str(info.value)


# -- local paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["./does/not/exist", "does/not/exist", "/does/not/exist", "~/does-not-exist-xyz"]
)
def test_missing_local_path(path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"no such directory \(and not a Hub id of the form org/name\)"
    ) as info:
        _hub.resolve(path)
    assert str(info.value).startswith(f"{path}: ")


def test_local_path_is_returned_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tiny.save(tmp_path / "org" / "name", small_state(), tiny.llama_config())
    monkeypatch.chdir(tmp_path)
    assert _hub.resolve("org/name") == Path("org/name")
    assert _hub.resolve(str(d)) == d


def test_local_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a file; give the model's directory"):
        _hub.resolve(str(f))


def test_missing_local_model_in_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo: dict[str, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [{"model": "./does/not/exist", "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(CheckpointError, match=r"\./does/not/exist: no such directory"):
        validate(config)


# -- Hub cache ------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lay files out as huggingface_hub caches them; return the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    snap = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / sha, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def model_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads these when it is imported, which happened before the test
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


@pytest.fixture
def hub_model(offline_hub: Path, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    base, cfg = tiny.llama_state(0)
    src = tiny.save(tmp_path / "src", base, cfg)
    snap = make_hub_repo(offline_hub, "org/name", model_files(src))
    return snap, base


def test_hub_id_resolves_to_the_cached_snapshot(hub_model: tuple[Path, dict[str, torch.Tensor]]) -> None:
    snap, base = hub_model
    got = _hub.resolve("org/name")
    assert got.resolve() == snap.resolve()
    assert _hub.resolve("org/name", "main").resolve() == snap.resolve()
    assert _hub.resolve("org/name", COMMIT).resolve() == snap.resolve()
    ckpt = Checkpoint(got, name="org/name")
    assert sorted(ckpt.keys()) == sorted(base)
    name = "model.layers.1.mlp.down_proj.weight"
    assert_same(ckpt.get(name), base[name])


def test_merge_with_a_hub_base_model(hub_model: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    snap, base = hub_model
    tuned = tiny.finetune(base, 7)
    local = tiny.save(tmp_path / "local", tuned, tiny.llama_config())
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "org/name",
        "models": [{"model": str(local), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }
    out = tmp_path / "out"
    plan = merge(config, out, progress=False)
    assert [m.dir.resolve() for m in plan.models] == [snap.resolve(), local]
    merged = tiny.load_state(out)
    assert sorted(merged) == sorted(base)
    for name, b in base.items():
        torch.testing.assert_close(merged[name], b + 0.5 * (tuned[name] - b), rtol=0, atol=1e-6)
    # the Hub cache is untouched and the card records the blob digest
    blob = (snap / "model.safetensors").resolve()
    assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    readme = (out / "README.md").read_text()
    assert "base_model: org/name" in readme
    assert f"`model.safetensors` `sha256:{blob.name}`" in readme
    assert not list(snap.parent.parent.glob("**/*mergesmith*"))


def test_hub_revision_not_in_the_cache(hub_model: tuple[Path, dict[str, torch.Tensor]]) -> None:
    with pytest.raises(CheckpointError) as info:
        _hub.resolve("org/name", "v9")
    msg = str(info.value)
    assert msg.startswith(
        "org/name@v9: not a local directory, and not in the Hugging Face cache while offline"
    )
    assert "HF_HUB_OFFLINE" in msg


def test_hub_commit_not_in_the_cache(hub_model: tuple[Path, dict[str, torch.Tensor]]) -> None:
    other = "f" * 40
    with pytest.raises(
        CheckpointError, match=rf"org/name@{other}: .*not in the Hugging Face cache while offline"
    ):
        _hub.resolve("org/name", other)


def test_hub_revision_in_a_config_not_in_the_cache(
    hub_model: tuple[Path, dict[str, torch.Tensor]], zoo: dict[str, Path]
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "org/name@nope",
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(
        CheckpointError, match=r"org/name@nope: .*not in the Hugging Face cache while offline"
    ):
        validate(config)


def test_hub_id_not_in_the_cache(offline_hub: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        _hub.resolve("someone/missing-model")
    msg = str(info.value)
    assert msg.startswith("someone/missing-model: not a local directory, and not in the Hugging Face cache")
    assert "while offline" in msg
    assert "download it first or give a local path" in msg


def test_sharded_hub_model_resolves_and_loads(offline_hub: Path, tmp_path: Path) -> None:
    """Hub snapshots are symlinks into blobs/: an index's shards must still count as inside the model."""
    state = small_state(5, torch.bfloat16)
    src = tiny.save(tmp_path / "src", state, tiny.llama_config(), shards=2)
    snap = make_hub_repo(offline_hub, "org/sharded", model_files(src))
    got = _hub.resolve("org/sharded")
    ckpt = Checkpoint(got, name="org/sharded")
    assert sorted(ckpt.keys()) == sorted(state)
    for name, want in state.items():
        assert_same(ckpt.get(name), want)
    assert {p.name for p in ckpt.weight_files} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert got.resolve() == snap.resolve()


def test_hub_model_with_only_bin_weights(offline_hub: Path, tmp_path: Path) -> None:
    state = small_state(6)
    src = tiny.save(tmp_path / "src", state, tiny.llama_config(), fmt="bin")
    make_hub_repo(offline_hub, "org/binonly", model_files(src))
    ckpt = Checkpoint(_hub.resolve("org/binonly"))
    assert_same(ckpt.get("lm_head.weight"), state["lm_head.weight"])


# -- digests --------------------------------------------------------------------------------------


def test_digest_of_a_hub_cached_file_is_its_blob_name(
    hub_model: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    snap, _ = hub_model
    link = snap / "model.safetensors"
    assert link.is_symlink()
    blob = link.resolve()
    assert blob.parent.name == "blobs"
    expected = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert blob.name == expected
    assert card.file_digest(link) == f"sha256:{expected}"


def test_digest_trusts_the_blob_name_without_reading(tmp_path: Path) -> None:
    name = "ab" * 32
    blob = tmp_path / "blobs" / name
    blob.parent.mkdir()
    blob.write_bytes(b"anything")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    assert card.file_digest(link) == f"sha256:{name}"
    assert card.file_digest(link, full=True) == f"sha256:{name}"


def test_full_digest_of_a_local_file_is_its_sha256(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    assert card.file_digest(f, full=True) == f"sha256:{hashlib.sha256(data).hexdigest()}"
    # a file named like a digest but not in a blobs/ folder is hashed
    g = tmp_path / ("cd" * 32)
    g.write_bytes(b"x")
    assert card.file_digest(g, full=True) == f"sha256:{hashlib.sha256(b'x').hexdigest()}"
    assert card.file_digest(g).startswith("quick:")
