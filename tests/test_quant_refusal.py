"""Quantized checkpoints are refused, each with its format named: GGUF files in a model directory,
a quantization_config's quant_method, and the tensors of HQQ, AQLM, EETQ and Quanto."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergesmith import _safetensors
from mergesmith.cli import main
from mergesmith.errors import CheckpointError
from mergesmith.sources import Checkpoint
from tests import tiny

QUANT_FIX = "merge the unquantized (float16, bfloat16 or float32) model instead"
GGUF_FIX = (
    "merge the original safetensors checkpoint the GGUF file was made from, or convert the GGUF file "
    "to safetensors first (transformers' from_pretrained(..., gguf_file=...) then save_pretrained)"
)


def refused(directory: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(directory)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def write_model(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config if config is not None else tiny.llama_config()))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def gguf_bytes() -> bytes:
    return b"GGUF" + (3).to_bytes(4, "little") + bytes(16)


# -- GGUF --------------------------------------------------------------------------------------


def test_directory_with_only_a_gguf_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny.llama_config()))
    (d / "model-Q4_K_M.gguf").write_bytes(gguf_bytes())
    assert refused(d) == (
        f"{d / 'model-Q4_K_M.gguf'}: a GGUF file, quantized for llama.cpp: a model directory holding one "
        f"cannot be merged; {GGUF_FIX}"
    )


def test_gguf_beside_safetensors_is_refused_before_any_weight_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = write_model(tmp_path / "m", {"model.embed_tokens.weight": torch.ones(2, 2)})
    (d / "b.Q8_0.gguf").write_bytes(gguf_bytes())
    (d / "a.F16.GGUF").write_bytes(gguf_bytes())

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight file was read")

    monkeypatch.setattr(_safetensors, "read_header_sized", no_read)
    assert refused(d) == (
        f"{d / 'a.F16.GGUF'} (and 1 more): a GGUF file, quantized for llama.cpp: a model directory holding "
        f"one cannot be merged; {GGUF_FIX}"
    )


def test_a_gguf_file_given_as_the_model_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.Q4_0.gguf"
    f.write_bytes(gguf_bytes())
    assert refused(f) == f"{f}: a GGUF file, quantized for llama.cpp: it cannot be merged; {GGUF_FIX}"


def test_cli_merge_of_a_gguf_model_exits_1_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, cfg = tiny.llama_state(0)
    base = tiny.save(tmp_path / "base", state, cfg)
    ft = tiny.save(tmp_path / "ft", tiny.finetune(state, 1), cfg)
    (ft / "ft.Q4_K_M.gguf").write_bytes(gguf_bytes())
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": 1.0}}],
    }
    cfg_file = tmp_path / "merge.yml"
    cfg_file.write_text(yaml.safe_dump(config))
    assert main(["merge", str(cfg_file), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{ft / 'ft.Q4_K_M.gguf'}: a GGUF file, quantized for llama.cpp" in err
    assert GGUF_FIX in err
    assert not (tmp_path / "out").exists()


# -- quantization_config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qc", "kind"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ, 4-bit"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "AWQ, 4-bit"),
        ({"quant_method": "hqq", "nbits": 2}, "HQQ, 2-bit"),
        ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4}}}, "HQQ"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes, 4-bit"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes, 8-bit"),
        ({"quant_method": "aqlm", "nbits_per_codebook": 16}, "AQLM"),
        ({"quant_method": "eetq", "weights": "int8"}, "EETQ"),
        ({"quant_method": "quanto", "weights": "int4"}, "Quanto"),
        ({"quant_method": "higgs", "bits": 3}, "HIGGS, 3-bit"),
        ({"quant_method": "vptq"}, "VPTQ"),
        ({"quant_method": "bitnet"}, "BitNet"),
        ({"quant_method": "gptq", "bits": True}, "GPTQ"),
    ],
)
def test_quantization_config_names_the_format(tmp_path: Path, qc: dict[str, Any], kind: str) -> None:
    d = write_model(tmp_path / "m", {"w.weight": torch.ones(2)}, tiny.llama_config(quantization_config=qc))
    assert refused(d) == (
        f"{d / 'config.json'}: has a quantization_config ({kind}): the weights are quantized and cannot be "
        f"merged as they are; {QUANT_FIX}"
    )


def test_text_config_quantization_is_named_too(tmp_path: Path) -> None:
    cfg = {"model_type": "llava", "text_config": {"quantization_config": {"quant_method": "awq", "bits": 4}}}
    d = write_model(tmp_path / "m", {"w.weight": torch.ones(2)}, cfg)
    assert refused(d) == (
        f"{d / 'config.json'}: has a quantization_config (AWQ, 4-bit): the weights are quantized and cannot be "
        f"merged as they are; {QUANT_FIX}"
    )


# -- quantized tensors without a quantization_config ---------------------------------------------------


def packed(name: str, module: str) -> str:
    return (
        f"{{d}}: tensor {name!r} (in model.safetensors) is quantization data for {module!r}: the weights are "
        f"quantized and cannot be merged as they are; {QUANT_FIX}"
    )


@pytest.mark.parametrize(
    ("tensors", "culprit", "module", "alike"),
    [
        # HQQ: packed codes W_q and their meta, no weight
        (["q.W_q", "q.meta", "q.bias"], "q.W_q", "q", ["q.meta", "q.bias"]),
        (["q.meta", "q.weight"], "q.meta", "q", ["q.meta"]),
        # AQLM: codes with their codebooks
        (["q.codebooks", "q.codes", "q.scales"], "q.codes", "q", ["q.codes", "q.scales"]),
        # EETQ: int8 weight with per-channel scales
        (["q.weight", "q.weight_scales"], "q.weight_scales", "q", ["q.weight_scales"]),
        # Quanto: the weight's data and scale
        (["q.weight._data", "q.weight._scale"], "q.weight._data", "q", ["q.weight._data"]),
    ],
)
def test_quantized_tensors_are_refused(
    tmp_path: Path, tensors: list[str], culprit: str, module: str, alike: list[str]
) -> None:
    prefix = "model.layers.0.self_attn."
    # the same names without the tensors that make them quantization data are a model's own
    own = Checkpoint(write_model(tmp_path / "own", {prefix + n: torch.full((2,), 3.0) for n in alike}))
    assert sorted(own.keys()) == sorted(prefix + n for n in alike)
    assert all(torch.equal(own.get(prefix + n), torch.full((2,), 3.0)) for n in alike)
    d = write_model(tmp_path / "m", {prefix + n: torch.ones(2) for n in tensors})
    assert refused(d) == packed(prefix + culprit, prefix + module).format(d=d)


def test_unlistable_model_directory_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = write_model(tmp_path / "m", {"w.weight": torch.ones(2)})

    def denied(self: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    assert refused(d) == f"{d}: cannot list the model directory: Permission denied"
