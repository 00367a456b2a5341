"""Hostile or broken model files: each is refused with a one-line error naming the file, never a
traceback, a hang or a silently wrong merge."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesmith import _safetensors, sources, vocab
from mergesmith.api import merge, validate
from mergesmith.cli import main
from mergesmith.errors import CheckpointError
from mergesmith.sources import Checkpoint
from tests import tiny


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
    assert f"{path}: tensor 'w' declares shape ({2**62}, {2**62}) F32 ({2**126} bytes)" in msg
    assert f"F32 ({2**126} bytes) but the file's data section holds only 8 bytes; the file is corrupt" in msg


# -- sharded indexes ------------------------------------------------------------------------------


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (7, 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.0.mlp.up_proj.weight": (6, 4),
        "model.norm.weight": (4,),
        "lm_head.weight": (7, 4),
    }
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def sharded(tmp_path: Path, shards: int = 2, fmt: str = "safetensors") -> tuple[Path, Path, dict[str, Any]]:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config(), shards=shards, fmt=fmt)
    index = d / ("model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json")
    return d, index, json.loads(index.read_text())


def test_index_listing_a_tensor_no_shard_holds_is_refused(tmp_path: Path) -> None:
    d, index, data = sharded(tmp_path)
    data["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    assert refused(d) == (
        f"{index}: lists tensor 'model.layers.1.mlp.up_proj.weight' in model-00002-of-00002.safetensors, "
        "but no shard holds it; the index or the shard is wrong: copy or download the model again"
    )


def test_index_placing_a_tensor_in_the_wrong_shard_is_refused(tmp_path: Path) -> None:
    d, index, data = sharded(tmp_path, fmt="bin")
    name, shard = next(iter(data["weight_map"].items()))
    other = next(f for f in data["weight_map"].values() if f != shard)
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    msg = refused(d)
    assert msg.startswith(f"{index}: lists tensor {name!r} in {other}, but it is in {shard}")


def test_shard_left_out_of_the_index_is_refused(tmp_path: Path) -> None:
    d, index, data = sharded(tmp_path, shards=3)
    data["weight_map"] = {
        k: v for k, v in data["weight_map"].items() if v != "model-00002-of-00003.safetensors"
    }
    index.write_text(json.dumps(data))
    msg = refused(d)
    assert msg.startswith(
        f"{index}: no tensor is placed in shard model-00002-of-00003.safetensors (shard 2 of 3), "
        "which is in the model directory; the index or the download is incomplete"
    )


def test_missing_shard_of_a_set_is_refused(tmp_path: Path) -> None:
    d, index, data = sharded(tmp_path, shards=3)
    data["weight_map"] = {
        k: v for k, v in data["weight_map"].items() if v != "model-00003-of-00003.safetensors"
    }
    index.write_text(json.dumps(data))
    (d / "model-00003-of-00003.safetensors").unlink()
    assert "(shard 3 of 3), which is missing too" in refused(d)


def test_shard_file_not_in_the_index_is_refused(tmp_path: Path) -> None:
    d, index, _ = sharded(tmp_path)
    write_st(d / "model-00001-of-00001.safetensors", {"extra": W}, bytes(8))
    assert refused(d) == (
        f"{index}: model-00001-of-00001.safetensors is in the model directory but not in the index, so its "
        "tensors would be left out of the merge; add them to the weight_map or remove the file"
    )


@pytest.mark.parametrize("target", ["sub/model-00001-of-00002.safetensors", "", "."])
def test_index_values_must_be_plain_file_names(tmp_path: Path, target: str) -> None:
    d, index, data = sharded(tmp_path)
    (d / "sub").mkdir()
    (d / "sub" / "model-00001-of-00002.safetensors").write_bytes(
        (d / "model-00001-of-00002.safetensors").read_bytes()
    )
    data["weight_map"]["model.norm.weight"] = target
    index.write_text(json.dumps(data))
    assert refused(d) == (
        f"{index}: tensor 'model.norm.weight' points at {target!r}, which is not a plain file name; "
        "refusing (weight_map values name files beside the index)"
    )


def test_index_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    d, index, data = sharded(tmp_path)
    outside = tmp_path / "outside"
    write_st(outside / "x.safetensors", {"x": W}, bytes(8))
    (d / "link").symlink_to(outside)
    data["weight_map"]["x"] = "link/x.safetensors"
    index.write_text(json.dumps(data))
    assert "tensor 'x' points at 'link/x.safetensors', which is not a plain file name" in refused(d)


def test_nesting_bomb_in_an_index_is_refused(tmp_path: Path) -> None:
    d, index, _ = sharded(tmp_path)
    index.write_text('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + ', "weight_map": {}}')
    msg = refused(d)
    assert msg.startswith(f"{index}: JSON nested")
    assert msg.endswith("repair the index or download the model again")


def test_headers_of_all_shards_together_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, _, _ = sharded(tmp_path, shards=3)
    sizes = [struct.unpack("<Q", p.read_bytes()[:8])[0] for p in sorted(d.glob("*.safetensors"))]
    monkeypatch.setattr(sources, "MAX_HEADER_BYTES", sizes[0] + sizes[1] + sizes[2] - 1)
    msg = refused(d)
    assert msg.startswith(
        f"{d / 'model-00003-of-00003.safetensors'}: header of {sizes[2]:,} bytes, more than"
    )
    assert "(all of a model's safetensors headers together may take" in msg


def test_number_of_shards_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, index, _ = sharded(tmp_path, shards=3)
    monkeypatch.setattr(sources, "MAX_SHARDS", 2)
    assert refused(d) == (
        f"{index}: names more than 2 shard files; the index is corrupt: copy or download the model again"
    )


# -- symlinks and special files -------------------------------------------------------------------


def test_weights_symlinked_from_outside_the_model_directory_are_refused(tmp_path: Path) -> None:
    outside = write_st(tmp_path / "elsewhere" / "real.safetensors", {"w": W}, bytes(8))
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to(outside)
    msg = refused(d)
    assert msg.startswith(f"{d / 'model.safetensors'} is a symlink to {outside}, outside the model directory")


def test_model_directory_that_is_a_symlink_is_read(tmp_path: Path) -> None:
    real = tiny.save(tmp_path / "real", small_state(), tiny.llama_config())
    (tmp_path / "alias").symlink_to(real)
    assert sorted(Checkpoint(tmp_path / "alias").keys()) == sorted(small_state())


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_fifo_is_refused_not_waited_on(tmp_path: Path, name: str) -> None:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config())
    (d / name).unlink()
    os.mkfifo(d / name)
    assert refused(d) == f"{d / name}: is a FIFO, not a regular file; replace it with the file itself"


# -- config.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested"),
        (b'{"model_type": "\xff"}', "not UTF-8 text (byte 16)"),
        (b'{"hidden_size": ' + b"7" * 5000 + b"}", "holds an integer with thousands of digits"),
        (b"[1, 2]", "expected a JSON object of settings, found a list"),
    ],
    ids=["bomb", "not-utf8", "huge-int", "list"],
)
def test_hostile_config_json_is_refused(tmp_path: Path, content: bytes, found: str) -> None:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config())
    (d / "config.json").write_bytes(content)
    msg = refused(d)
    assert msg.startswith(f"{d / 'config.json'}: {found}")
    assert msg.endswith("repair config.json or download the model again")


# -- PyTorch .bin ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "found"),
    [
        ([torch.ones(2)], "found a list"),
        ({"w": torch.ones(2), "step": 3}, "but 'step' holds a int"),
        ({"state_dict": {"w": torch.ones(2)}}, "but 'state_dict' holds a dict"),
        ({1: torch.ones(2)}, "found the key 1 (int)"),
    ],
    ids=["list", "int-value", "nested", "int-key"],
)
def test_bin_that_is_not_a_flat_state_dict(tmp_path: Path, obj: object, found: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    torch.save(obj, d / "pytorch_model.bin")
    msg = refused(d)
    assert msg.startswith(f"{d / 'pytorch_model.bin'}: expected a dict of tensor names to tensors, {found}")
    assert msg.endswith("save the model's state_dict() with torch.save, or convert it to safetensors")


def test_bin_refused_by_weights_only_names_the_global(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    torch.save({"w": torch.ones(2), "f": Path("x")}, d / "pytorch_model.bin")
    msg = refused(d)
    assert msg.startswith(f"{d / 'pytorch_model.bin'}: refused to load")
    assert "Unsupported global: GLOBAL pathlib" in msg
    assert msg.endswith("Only plain state dicts are read; convert the checkpoint to safetensors")


# -- files changed during a merge -----------------------------------------------------------------


def test_bin_truncated_after_open_is_refused_not_faulted(tmp_path: Path) -> None:
    d = tiny.save(tmp_path / "m", small_state(), tiny.llama_config(), fmt="bin")
    ckpt = Checkpoint(d)
    path = d / "pytorch_model.bin"
    size = path.stat().st_size
    os.truncate(path, 100)
    with pytest.raises(CheckpointError) as info:
        ckpt.get("model.norm.weight")
    assert str(info.value) == (
        f"{path}: changed size from {size:,} to 100 bytes during the merge, after its header was read; the "
        "tensors read from it would not match: rerun the merge once nothing writes to the input models"
    )


def test_safetensors_replaced_after_open_is_refused(tmp_path: Path) -> None:
    path = write_st(tmp_path / "m" / "model.safetensors", {"w": W}, bytes(8))
    ckpt = Checkpoint(path.parent)
    write_st(tmp_path / "new.safetensors", {"w": W}, b"\x01" * 8).replace(path)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: was replaced by another file during the merge"
    ):
        ckpt.get("w")


def test_merge_stops_when_an_input_changes_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, cfg = tiny.llama_state(0)
    base = tiny.save(tmp_path / "base", state, cfg)
    ft = tiny.save(tmp_path / "ft", tiny.finetune(state, 1), cfg)
    config = {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(ft)}]}
    config["parameters"] = {"weight": 0.5}
    real = _safetensors.read_tensor
    calls = []

    def shrink_after_first(entry: _safetensors.Entry, handle: Any = None) -> torch.Tensor:
        calls.append(entry.file)
        if len(calls) == 3:
            os.truncate(ft / "model.safetensors", 64)
        return real(entry, handle)

    monkeypatch.setattr(_safetensors, "read_tensor", shrink_after_first)
    out = tmp_path / "out"
    with pytest.raises(
        CheckpointError, match=r"ft/model\.safetensors: changed size from [0-9,]+ to 64 bytes"
    ):
        merge(config, out)
    assert not out.exists()


# -- quantized weights ----------------------------------------------------------------------------

FORMAT = {"bitsandbytes": "bitsandbytes, 4-bit", "gptq": "GPTQ, 4-bit", "awq": "AWQ, 4-bit"}


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4, "version": "gemm"},
    ],
)
def test_config_with_quantization_config_is_refused(tmp_path: Path, qc: dict[str, Any]) -> None:
    # only quant_method "fp8" (block-scaled FP8, dequantized as read: tests/test_fp8.py) is read
    cfg = tiny.llama_config(quantization_config=qc)
    d = tiny.save(tmp_path / "m", small_state(), cfg)
    assert refused(d) == (
        f"{d / 'config.json'}: has a quantization_config ({FORMAT[qc['quant_method']]}): the weights are quantized and "
        "cannot be merged as they are; merge the unquantized (float16, bfloat16 or float32) model instead"
    )


def test_quantization_tensors_in_an_fp8_model_are_refused(tmp_path: Path) -> None:
    # a quant_method "fp8" config does not make other quantization data readable
    state = {**small_state(), "model.layers.0.mlp.up_proj.weight.absmax": torch.ones(3)}
    d = tiny.save(tmp_path / "m", state, tiny.llama_config(quantization_config={"quant_method": "fp8"}))
    assert refused(d) == (
        f"{d}: tensor 'model.layers.0.mlp.up_proj.weight.absmax' (in model.safetensors) is quantization data "
        "for 'model.layers.0.mlp.up_proj': the weights are quantized and cannot be merged as they are; "
        "merge the unquantized (float16, bfloat16 or float32) model instead"
    )


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.0.mlp.up_proj.weight.absmax",
        "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4",
        "model.layers.0.mlp.up_proj.scales",
        "model.layers.0.mlp.up_proj.weight_scale_inv",
        "model.layers.0.mlp.up_proj.SCB",
    ],
)
def test_quantization_tensors_beside_a_weight_are_refused(tmp_path: Path, extra: str) -> None:
    state = {**small_state(), extra: torch.ones(3)}
    d = tiny.save(tmp_path / "m", state, tiny.llama_config())
    assert refused(d) == (
        f"{d}: tensor {extra!r} (in model.safetensors) is quantization data for "
        "'model.layers.0.mlp.up_proj': the weights are quantized and cannot be merged as they are; "
        "merge the unquantized (float16, bfloat16 or float32) model instead"
    )


def test_gptq_qweight_is_refused(tmp_path: Path) -> None:
    state = {"model.norm.weight": torch.ones(4), "model.layers.0.mlp.up_proj.qweight": torch.ones(2, 2).int()}
    d = tiny.save(tmp_path / "m", state, tiny.llama_config())
    assert (
        "tensor 'model.layers.0.mlp.up_proj.qweight' (in model.safetensors) is quantization data"
        in refused(d)
    )


# -- the command line -----------------------------------------------------------------------------


def test_cli_reports_a_hostile_input_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d, index, _ = sharded(tmp_path)
    other = tiny.save(tmp_path / "other", small_state(1), tiny.llama_config())
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {d}\n  - model: {other}\nparameters:\n  weight: 0.5\n"
    )
    assert main(["validate", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {index}: JSON nested")
    assert "Traceback" not in err


# -- tokenizer files ------------------------------------------------------------------------------


def two_models(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    state, cfg = tiny.llama_state(0)
    base = tiny.save(tmp_path / "base", state, cfg, tokenizer=True)
    ft = tiny.save(tmp_path / "ft", tiny.finetune(state, 1), cfg, tokenizer=True)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": 1.0}}],
    }
    return base, ft, config


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested"),
        (b'{"model": {"vocab": {"\xff": 1}}}', "not UTF-8 text (byte 22)"),
        (b'{"model": {"vocab": {"a": ' + b"1" * 5000 + b"}}}", "holds an integer with thousands of digits"),
        (b'{"model": [1, 2]}', '"model" is a list, expected an object'),
        (b'{"model": {"vocab": "abc"}}', '"model.vocab" is a str, expected an object of tokens to ids'),
        (
            b'{"model": {"vocab": {"a": "0"}}}',
            "\"model.vocab\": token 'a' has id '0', expected a non-negative",
        ),
        (b'{"model": {"vocab": [7]}}', '"model.vocab"[0] is 7, expected [piece, score]'),
        (
            b'{"added_tokens": [{"id": 3}]}',
            "\"added_tokens\"[0] is {'id': 3}, expected an object with a string",
        ),
        (b'{"added_tokens": {"a": 1}}', '"added_tokens" is a dict, expected a list'),
    ],
    ids=[
        "bomb",
        "not-utf8",
        "huge-int",
        "model-list",
        "vocab-str",
        "id-str",
        "unigram",
        "added",
        "added-dict",
    ],
)
def test_hostile_tokenizer_json_is_refused(tmp_path: Path, content: bytes, found: str) -> None:
    _, ft, config = two_models(tmp_path)
    (ft / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        validate(config)
    msg = str(info.value)
    assert msg.startswith(f"{ft / 'tokenizer.json'}: {found}")
    assert msg.endswith("repair the tokenizer files or download the model again")
    assert "\n" not in msg


def test_vocab_json_with_non_integer_ids_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "vocab.json").write_text('{"a": 0, "b": 1.5}')
    with pytest.raises(CheckpointError) as info:
        vocab.read_vocab(d)
    assert str(info.value) == (
        f"{d / 'vocab.json'}: the file: token 'b' has id 1.5, expected a non-negative integer; "
        "repair the tokenizer files or download the model again"
    )


def test_tokenizer_json_size_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, ft, config = two_models(tmp_path)
    monkeypatch.setattr(vocab, "MAX_TOKENIZER_BYTES", 1000)
    size = (ft / "tokenizer.json").stat().st_size
    with pytest.raises(CheckpointError) as info:
        validate(config)
    assert str(info.value).startswith(
        f"{tmp_path / 'base' / 'tokenizer.json'}: {(tmp_path / 'base' / 'tokenizer.json').stat().st_size:,} "
        "bytes, more than the 1,000 this file may have"
    )
    assert size > 1000


def test_each_tokenizer_json_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    state, cfg = tiny.llama_state(0)
    base = tiny.save(tmp_path / "base", state, cfg, tokenizer=True)
    grown = tiny.finetune(state, 1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], torch.randn(1, grown[name].shape[1])])
    ft = tiny.save(tmp_path / "ft", grown, {**cfg, "vocab_size": len(tiny.VOCAB) + 1})
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<new>"], special_tokens=True)
    tok.save_pretrained(ft)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "tokenizer_source": "union",
        "models": [{"model": str(ft), "parameters": {"weight": 1.0}}],
    }
    vocab.clear_cache()
    parsed: list[str] = []
    real = vocab.read_json

    def counting(path: Path, **kw: Any) -> Any:
        parsed.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(vocab, "read_json", counting)
    validate(config)
    merge(config, tmp_path / "out")
    tokenizers = [p for p in parsed if p.endswith("tokenizer.json")]
    assert sorted(tokenizers) == [str(base / "tokenizer.json"), str(ft / "tokenizer.json")]
    out = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert any(e["content"] == "<new>" for e in out["added_tokens"])


def test_tokenizer_file_linking_outside_the_model_is_not_copied(tmp_path: Path) -> None:
    base, _, config = two_models(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (base / "special_tokens_map.json").unlink(missing_ok=True)
    (base / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(CheckpointError) as info:
        merge(config, tmp_path / "out")
    assert str(info.value).startswith(
        f"{base / 'special_tokens_map.json'} is a symlink to {secret}, outside the model directory; refusing"
    )
    assert not (tmp_path / "out").exists()


def test_tokenizer_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    base, _, config = two_models(tmp_path)
    (base / "tokenizer_config.json").write_text("[]")
    with pytest.raises(CheckpointError) as info:
        merge({**config, "chat_template": "chatml"}, tmp_path / "out")
    assert str(info.value) == (
        f"{base / 'tokenizer_config.json'}: expected a JSON object of settings, found a list; "
        "repair tokenizer_config.json or download the model again"
    )
    assert not (tmp_path / "out").exists()


def test_union_with_a_malformed_tokenizer_config_names_the_input(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    state, cfg = tiny.llama_state(0)
    base = tiny.save(tmp_path / "base", state, cfg, tokenizer=True)
    grown = tiny.finetune(state, 1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], torch.randn(1, grown[name].shape[1])])
    ft = tiny.save(tmp_path / "ft", grown, {**cfg, "vocab_size": len(tiny.VOCAB) + 1})
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<new>"])
    tok.save_pretrained(ft)
    edit_json(base / "tokenizer_config.json", lambda d: d.update(added_tokens_decoder=[1]))
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "tokenizer_source": "union",
        "models": [{"model": str(ft), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(CheckpointError) as info:
        merge(config, tmp_path / "out")
    assert str(info.value) == (
        f"{base / 'tokenizer_config.json'}: expected a JSON object whose added_tokens_decoder is an object; "
        "repair the tokenizer files or download the model again"
    )
    assert not (tmp_path / "out").exists()


def test_a_layer_number_of_thousands_of_digits_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = small_state()
    huge = "model.layers." + "9" * 5000 + ".mlp.up_proj.weight"
    state[huge] = state.pop("model.layers.0.mlp.up_proj.weight")
    a = tiny.save(tmp_path / "a", state, tiny.llama_config())
    b = tiny.save(tmp_path / "b", state, tiny.llama_config())
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n"
    )
    assert main(["validate", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: tensor model.layers.{'9' * 67}...: its layer number has 5000 digits")
    assert "the checkpoint is corrupt or not a model" in err
