"""FP8 block-scaled checkpoints (quant_method "fp8", weight_scale_inv) are dequantized as read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import mergesmith
from mergesmith import CheckpointError
from mergesmith.cli import main
from mergesmith.sources import Checkpoint
from tests import tiny

BLOCK = [24, 20]  # no tiny Llama matrix dimension (16, 32, 64) is a multiple of both
FP8_MAX = 448.0  # the largest float8_e4m3fn value
QC = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": BLOCK}


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as float8_e4m3fn and one float32 scale per BLOCK block (edge blocks partial)."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1])
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(br, bc, dtype=torch.float32)
    for i in range(br):
        for j in range(bc):
            r, c = slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])
            scale = float(w[r, c].abs().max()) / FP8_MAX
            s[i, j] = scale
            q[r, c] = (w[r, c] / scale).to(torch.float8_e4m3fn)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Each entry times the scale of the block it lies in, entry by entry."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[r, c] = q[r, c].float() * s[r // BLOCK[0], c // BLOCK[1]]
    return out


def is_quantized(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and "layers." in name


def fp8_model(
    directory: Path, state: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Save ``state`` with its layers' matrices in FP8; return what each tensor means (dequantized)."""
    stored: dict[str, torch.Tensor] = {}
    meaning: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if is_quantized(name, t):
            q, s = quantize(t)
            stored[name], stored[f"{name}_scale_inv"] = q, s
            meaning[name] = dequantize(q, s)
        else:
            stored[name] = meaning[name] = t
    tiny.save(directory, stored, {**cfg, "quantization_config": QC, "torch_dtype": "bfloat16"})
    return meaning


@pytest.fixture(scope="module")
def fp8_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fp8")
    base, cfg = tiny.llama_state(0)
    models = {"base": base, "a": tiny.finetune(base, 1), "b": tiny.finetune(base, 2)}
    meanings = {k: fp8_model(root / k, v, cfg) for k, v in models.items()}
    return {"dirs": {k: root / k for k in models}, "meaning": meanings}


def test_a_checkpoint_reads_fp8_weights_dequantized(fp8_zoo: dict[str, Any]) -> None:
    ckpt = Checkpoint(fp8_zoo["dirs"]["a"])
    meaning = fp8_zoo["meaning"]["a"]
    keys = ckpt.keys()
    assert sorted(keys) == sorted(meaning)
    assert not any(k.endswith("_scale_inv") for k in keys)
    name = "model.layers.1.self_attn.k_proj.weight"  # 16 x 32
    assert ckpt.info(name).dtype == torch.bfloat16 and ckpt.info(name).shape == (16, 32)
    assert ckpt.entry(name) is None
    got = ckpt.get(name)
    assert got.dtype == torch.float32 and torch.equal(got, meaning[name])
    assert torch.equal(ckpt.get("model.norm.weight"), meaning["model.norm.weight"])
    # partial blocks in both dimensions: 32 x 64 in blocks of 24 x 20 takes 2 x 4 scales
    raw = tiny.load_state(fp8_zoo["dirs"]["a"])
    name = "model.layers.0.mlp.down_proj.weight"
    assert raw[name].dtype == torch.float8_e4m3fn and raw[f"{name}_scale_inv"].shape == (2, 4)
    assert torch.equal(ckpt.get(name), meaning[name])
    # the stored codes are not the weights: reading them as they are would be far off
    assert not torch.allclose(raw[name].float(), meaning[name], atol=0.1)


def expect(method: str, m: dict[str, dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    base, a, b = m["base"][name], m["a"][name], m["b"][name]
    if method == "linear":
        return 0.3 * a + 0.7 * b
    return base + 0.6 * (a - base) + 0.5 * (b - base)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_fp8_models_merge_as_their_dequantized_weights(
    method: str, fp8_zoo: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    d = fp8_zoo["dirs"]
    wa, wb = (0.3, 0.7) if method == "linear" else (0.6, 0.5)
    text = (
        f"merge_method: {method}\n"
        + (f"base_model: {d['base']}\n" if method == "task_arithmetic" else "")
        + f"models:\n  - model: {d['a']}\n    parameters: {{weight: {wa}}}\n"
        f"  - model: {d['b']}\n    parameters: {{weight: {wb}}}\n"
    )
    out = tmp_path / "out"
    mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    meaning = fp8_zoo["meaning"]
    assert set(merged) == set(meaning["a"])
    for name, t in merged.items():
        want = expect(method, meaning, name)  # float32, from the dequantized weights
        if is_quantized(name, meaning["a"][name]):
            # merged in float32, then written in bfloat16 (the default for an FP8 input): within
            # bfloat16's rounding of the float32 result, a relative 2**-8
            assert t.dtype == torch.bfloat16, name
            torch.testing.assert_close(t.float(), want, rtol=2**-8, atol=1e-12)
        else:
            assert t.dtype == torch.float32, name
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, len(tiny.VOCAB)) and bool(torch.isfinite(logits).all())


def test_out_dtype_sets_the_written_dtype(fp8_zoo: dict[str, Any], tmp_path: Path) -> None:
    d = fp8_zoo["dirs"]
    text = (
        f"merge_method: linear\nmodels:\n  - model: {d['a']}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {d['b']}\n    parameters: {{weight: 0.7}}\nout_dtype: float32\n"
    )
    out = tmp_path / "out"
    mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    name = "model.layers.2.mlp.gate_proj.weight"  # 64 x 32
    assert merged[name].dtype == torch.float32
    want = expect("linear", fp8_zoo["meaning"], name)
    torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-7)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def refusal(directory: Path, capsys: pytest.CaptureFixture[str]) -> str:
    cfg = directory.parent / "merge.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {directory}\n")
    assert main(["merge", str(cfg), str(directory.parent / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_scales_of_the_wrong_shape_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 32), "model.norm.weight": torch.ones(32)}
    d = tmp_path / "m"
    fp8_model(d, state, tiny.llama_config())
    raw = tiny.load_state(d)
    raw["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 1)
    tiny.save(d, raw, {**tiny.llama_config(), "quantization_config": QC})
    assert (
        f"{d}: tensor 'model.layers.0.mlp.up_proj.weight_scale_inv' (in model.safetensors) is float32 [3, 1], "
        "but 'model.layers.0.mlp.up_proj.weight' [64, 32] in blocks of [24, 20] needs float scales of shape "
        "[3, 2]; copy or download the model again"
    ) in refusal(d, capsys)


def test_an_fp8_weight_without_scales_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 32).to(torch.float8_e4m3fn)}
    d = tiny.save(tmp_path / "m", state, {**tiny.llama_config(), "quantization_config": QC})
    assert (
        f"{d}: tensor 'model.layers.0.mlp.up_proj.weight' (in model.safetensors) is float8_e4m3fn without a "
        "'model.layers.0.mlp.up_proj.weight_scale_inv' to dequantize it with; copy or download the model again"
    ) in refusal(d, capsys)


@pytest.mark.parametrize("block", [[128], [0, 128], "128", [True, 128]])
def test_a_bad_block_size_is_refused(tmp_path: Path, block: Any, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"model.norm.weight": torch.ones(32)}
    qc = {**QC, "weight_block_size": block}
    d = tiny.save(tmp_path / "m", state, {**tiny.llama_config(), "quantization_config": qc})
    assert (
        f"{d / 'config.json'}: quantization_config.weight_block_size is {block!r}, expected two positive "
        "integers such as [128, 128]; repair config.json or download the model again"
    ) in refusal(d, capsys)


CT = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True},
        }
    },
    "ignore": ["lm_head"],
}


def ct_model(
    directory: Path,
    state: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    per_tensor: set[str],
    kv_cache: bool = False,
) -> dict[str, torch.Tensor]:
    """``state`` saved as compressed-tensors FP8: one weight_scale per row ([out, 1]), or one for
    the tensor ([1]) for the names in ``per_tensor``, and an input_scale beside each (with
    ``kv_cache``, a k_scale and v_scale per attention layer too); returns what each tensor means
    (dequantized)."""
    stored: dict[str, torch.Tensor] = {}
    qc = dict(CT)
    if kv_cache:
        qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}
        for name in state:
            if name.endswith("self_attn.q_proj.weight"):
                for kind in ("k_scale", "v_scale"):
                    stored[name.replace("q_proj.weight", kind)] = torch.tensor(0.25)
    meaning: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not is_quantized(name, t):
            stored[name] = meaning[name] = t
            continue
        if name in per_tensor:
            scale = torch.tensor([float(t.abs().max()) / FP8_MAX])
        else:
            scale = t.abs().amax(dim=1, keepdim=True) / FP8_MAX
        q = (t / scale).to(torch.float8_e4m3fn)
        stored[name], stored[f"{name}_scale"] = q, scale
        stored[name[: -len("weight")] + "input_scale"] = torch.tensor([0.5])
        rows = [
            [
                float(q[r, c]) * float(scale.reshape(-1)[0 if name in per_tensor else r])
                for c in range(t.shape[1])
            ]
            for r in range(t.shape[0])
        ]
        meaning[name] = torch.tensor(rows, dtype=torch.float32)
    tiny.save(directory, stored, {**cfg, "quantization_config": qc})
    return meaning


def test_compressed_tensors_fp8_models_merge_as_their_dequantized_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, cfg = tiny.llama_state(3)
    per_tensor = {"model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    ma = ct_model(tmp_path / "a", tiny.finetune(base, 4), cfg, per_tensor, kv_cache=True)
    mb = ct_model(tmp_path / "b", tiny.finetune(base, 5), cfg, per_tensor)
    assert any(n.endswith("k_scale") for n in tiny.load_state(tmp_path / "a"))
    ckpt = Checkpoint(tmp_path / "a")
    assert sorted(ckpt.keys()) == sorted(ma)  # no weight_scale, input_scale, k_scale or v_scale
    text = (
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.7}}\n"
    )
    out = tmp_path / "out"
    mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    assert set(merged) == set(ma)
    for name, t in merged.items():
        want = 0.3 * ma[name] + 0.7 * mb[name]
        if is_quantized(name, ma[name]):
            assert t.dtype == torch.bfloat16, name
            torch.testing.assert_close(t.float(), want, rtol=2**-8, atol=1e-12)
        else:
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert bool(torch.isfinite(model(torch.tensor([[1, 5, 7, 9]])).logits).all())


def test_compressed_tensors_scales_of_the_wrong_shape_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 32).to(torch.float8_e4m3fn)}
    state["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(1, 32)
    d = tiny.save(tmp_path / "m", state, {**tiny.llama_config(), "quantization_config": CT})
    assert (
        f"{d}: tensor 'model.layers.0.mlp.up_proj.weight_scale' (in model.safetensors) is float32 [1, 32], but "
        "'model.layers.0.mlp.up_proj.weight' [64, 32] needs float scales of shape [64, 1] (one per row) or [1] "
        "(one for the tensor); copy or download the model again"
    ) in refusal(d, capsys)


def test_compressed_tensors_other_than_fp8_are_refused(tmp_path: Path) -> None:
    state = {"model.layers.0.mlp.up_proj.weight_packed": torch.zeros(64, 4, dtype=torch.int32)}
    qc = {**CT, "format": "pack-quantized"}
    d = tiny.save(tmp_path / "m", state, {**tiny.llama_config(), "quantization_config": qc})
    with pytest.raises(CheckpointError) as info:
        Checkpoint(d)
    assert str(info.value) == (
        f"{d / 'config.json'}: has a quantization_config (compressed-tensors, format 'pack-quantized'): only "
        "FP8 weights (format float-quantized) are dequantized; merge the unquantized (float16, bfloat16 or "
        "float32) model instead"
    )
    state = {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 32, dtype=torch.int8)}
    state["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(64, 1)
    d = tiny.save(tmp_path / "n", state, {**tiny.llama_config(), "quantization_config": CT})
    with pytest.raises(CheckpointError) as info:
        Checkpoint(d)
    assert str(info.value) == (
        f"{d}: tensor 'model.layers.0.mlp.up_proj.weight' (in model.safetensors) has a weight_scale but is "
        "int8 [64, 32], not a float8 matrix: a quantization mergesmith cannot read as it is; merge the "
        "unquantized (float16, bfloat16 or float32) model instead"
    )


def test_a_weight_and_its_scales_in_different_shards(fp8_zoo: dict[str, Any], tmp_path: Path) -> None:
    src = fp8_zoo["dirs"]["a"]
    raw = tiny.load_state(src)
    d = tiny.save(tmp_path / "sharded", raw, json.loads((src / "config.json").read_text()), shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight"
    assert index[name] != index[f"{name}_scale_inv"]
    ckpt = Checkpoint(d)
    assert sorted(ckpt.keys()) == sorted(fp8_zoo["meaning"]["a"])
    for key, want in fp8_zoo["meaning"]["a"].items():
        assert torch.equal(ckpt.get(key), want), key
