"""Merging LoRA adapters into one adapter: exact by stacking, best rank-r by QR + SVD, bounded memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import CompatibilityError
from mergesmith.cli import main
from mergesmith.lora import AdaptedCheckpoint, read_adapter
from mergesmith.lora_merge import merge_adapters
from mergesmith.sources import Checkpoint
from tests import tiny
from tests.test_lora import adapter, llama

WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora-merge")
    base = llama(root / "base")
    settings: list[dict[str, Any]] = [
        {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "up_proj"], "use_rslora": True},
        {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 1}},
    ]
    for i, lora in enumerate(settings):
        adapter(base, root / f"ad{i}", 30 + i, **lora)
    return {"base": base, "adapters": [root / f"ad{i}" for i in range(3)]}


def deltas(base: Path, adapters: list[Path], name: str) -> list[np.ndarray]:
    plain = Checkpoint(base).get(name).double().numpy()
    out = []
    for ad in adapters:
        view = AdaptedCheckpoint(Checkpoint(base), read_adapter(ad), "x")
        out.append(view.get(name).double().numpy() - plain)
    return out


def test_stacked_factors_equal_the_linear_merge_of_the_full_models(
    three: dict[str, Any], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ads = three["base"], three["adapters"]
    reports = merge_adapters(ads, tmp_path / "merged", weights=WEIGHTS)
    ranks = {r.module: r.rank for r in reports}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 + 4 + 3
    assert ranks["model.layers.0.self_attn.v_proj"] == 2 + 1
    assert ranks["model.layers.0.mlp.up_proj"] == 4
    assert all(r.relative_error == 0 for r in reports)
    # the same merge of the full models, by mergesmith's linear method
    text = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {base}+{ad}\n    parameters: {{weight: {w}}}\n" for ad, w in zip(ads, WEIGHTS)
    )
    mergesmith.merge(text + "dtype: float32\n", tmp_path / "full")
    full = tiny.load_state(tmp_path / "full")
    peft_merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "merged")
        .merge_and_unload()
        .state_dict()
    )
    for name, value in full.items():
        torch.testing.assert_close(peft_merged[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_truncation_error_is_the_svd_bound_and_falls_with_rank(three: dict[str, Any], tmp_path: Path) -> None:
    base, ads = three["base"], three["adapters"]
    name = "model.layers.1.self_attn.q_proj.weight"
    exact = sum(w * d for w, d in zip(WEIGHTS, deltas(base, ads, name)))
    s = np.linalg.svd(exact, compute_uv=False)
    errors = []
    for rank in (1, 2, 4, 9):
        out = tmp_path / f"r{rank}"
        reports = {r.module: r for r in merge_adapters(ads, out, weights=WEIGHTS, rank=rank)}
        got = AdaptedCheckpoint(Checkpoint(base), read_adapter(out), "x").get(name).double().numpy()
        got -= Checkpoint(base).get(name).double().numpy()
        error = np.linalg.norm(exact - got) / np.linalg.norm(exact)
        bound = np.sqrt((s[rank:] ** 2).sum() / (s**2).sum())
        assert error == pytest.approx(bound, rel=1e-3, abs=1e-6)
        assert reports[name[: -len(".weight")]].relative_error == pytest.approx(bound, rel=1e-3, abs=1e-6)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


def test_merging_three_wide_adapters_never_allocates_a_full_matrix(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from torch.profiler import ProfilerActivity, profile

    width, rank = 4096, 64
    gen = torch.Generator().manual_seed(0)
    module = "base_model.model.model.layers.0.self_attn.o_proj"
    paths = []
    for i in range(3):
        d = tmp_path / f"wide{i}"
        d.mkdir()
        factors = {
            f"{module}.lora_A.weight": torch.randn(rank, width, generator=gen) / 64,
            f"{module}.lora_B.weight": torch.randn(width, rank, generator=gen) / 64,
        }
        save_file(factors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["o_proj"]})
        )
        paths.append(d)
    full = width * width * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reports = merge_adapters(paths, tmp_path / "out", weights=[0.5, 0.3, 0.2], rank=rank)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < full / 8, f"an allocation of {largest} bytes; a {width}x{width} float32 matrix is {full}"
    assert reports[0].rank == rank and 0 < reports[0].relative_error < 1


def test_cli_merge_and_mismatched_adapters(
    three: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ads = [str(p) for p in three["adapters"]]
    assert (
        main(["lora", "merge", str(tmp_path / "m"), *ads, "--weights", "0.5", "0.3", "0.2", "--rank", "3"])
        == 0
    )
    assert "merged 3 adapters (" in capsys.readouterr().out
    other = llama(tmp_path / "wide", hidden_size=48, intermediate_size=96)
    adapter(other, tmp_path / "wide-ad", 5, r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(CompatibilityError, match="does not fit the other adapters"):
        merge_adapters([ads[0], tmp_path / "wide-ad"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("densities", [None, [0.6, 0.8, 0.5]])
def test_knots_ties_into_one_adapter_equals_the_engine_on_full_models(
    three: dict[str, Any], tmp_path: Path, densities: list[float] | None
) -> None:
    base, ads = three["base"], three["adapters"]
    merge_adapters(
        ads, tmp_path / "knots", weights=WEIGHTS, method="knots_ties", densities=densities, lambda_=0.9
    )
    view = AdaptedCheckpoint(Checkpoint(base), read_adapter(tmp_path / "knots"), "x")
    dens = densities or [1.0, 1.0, 1.0]
    text = (
        f"merge_method: knots_ties\nbase_model: {base}\nmodels:\n"
        + "".join(
            f"  - model: {base}+{ad}\n    parameters: {{weight: {w}, density: {d}}}\n"
            for ad, w, d in zip(ads, WEIGHTS, dens)
        )
        + "parameters: {lambda: 0.9}\ndtype: float32\n"
    )
    mergesmith.merge(text, tmp_path / "full")
    full = tiny.load_state(tmp_path / "full")
    # q_proj is adapted by all three, v_proj by two, up_proj by one
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ):
        torch.testing.assert_close(view.get(name), full[name], rtol=1e-4, atol=2e-6, msg=name)


def test_task_vector_methods_run_in_the_shared_basis(three: dict[str, Any], tmp_path: Path) -> None:
    base, ads = three["base"], three["adapters"]
    name = "model.layers.0.self_attn.q_proj.weight"

    def applied(out: Path) -> torch.Tensor:
        return AdaptedCheckpoint(Checkpoint(base), read_adapter(out), "x").get(name)

    merge_adapters(ads, tmp_path / "kt", weights=WEIGHTS, method="knots_ties", densities=[0.5] * 3)
    merge_adapters(ads, tmp_path / "ties", weights=WEIGHTS, method="ties", densities=[0.5] * 3)
    torch.testing.assert_close(applied(tmp_path / "ties"), applied(tmp_path / "kt"))
    # task arithmetic in the shared basis is the exact weighted sum of the updates
    merge_adapters(ads, tmp_path / "ta", weights=WEIGHTS, method="task_arithmetic", lambda_=0.7)
    merge_adapters(ads, tmp_path / "lin", weights=WEIGHTS, lambda_=0.7)
    torch.testing.assert_close(applied(tmp_path / "ta"), applied(tmp_path / "lin"), rtol=1e-5, atol=1e-6)
    exact = Checkpoint(base).get(name) + 0.7 * sum(
        w * torch.tensor(d, dtype=torch.float32) for w, d in zip(WEIGHTS, deltas(base, ads, name))
    )
    torch.testing.assert_close(applied(tmp_path / "lin"), exact, rtol=1e-5, atol=1e-6)


def test_unavailable_methods_and_parameters_are_refused(three: dict[str, Any], tmp_path: Path) -> None:
    ads = three["adapters"]
    with pytest.raises(mergesmith.ConfigError, match="adapter merge method 'slerp' is not available"):
        merge_adapters(ads, tmp_path / "x", method="slerp")
    with pytest.raises(mergesmith.ConfigError, match=r"ties has no parameters \['densty'\]"):
        merge_adapters(ads, tmp_path / "x", method="ties", params={"densty": 0.5})
    with pytest.raises(mergesmith.ConfigError, match=r"--param mode='fast': expected one of mergekit, paper"):
        merge_adapters(ads, tmp_path / "x", method="ties", params={"mode": "fast"})
    with pytest.raises(mergesmith.ConfigError, match=r"--param normalize=3: expected true or false"):
        merge_adapters(ads, tmp_path / "x", method="knots_ties", params={"normalize": 3})
    with pytest.raises(mergesmith.ConfigError, match=r"linear adapter merges take no --param"):
        merge_adapters(ads, tmp_path / "x", params={"normalize": False})
    assert (
        main(
            [
                "lora",
                "merge",
                str(tmp_path / "y"),
                *map(str, ads),
                "--method",
                "ties",
                "--param",
                "normalize=false",
            ]
        )
        == 0
    )
    assert not (tmp_path / "x").exists()


def test_a_methods_own_checks_apply_to_adapter_merges(three: dict[str, Any], tmp_path: Path) -> None:
    """consensus_ta keeps entries at least min_agreement (2) task vectors mark: one adapter, or a
    module only one adapter changes (up_proj, by the second), would silently merge to nothing."""
    ads = three["adapters"]
    with pytest.raises(mergesmith.ConfigError, match=r"min_agreement: 2 .* merged from 1 model"):
        merge_adapters(ads[:1], tmp_path / "x", method="consensus_ta")
    with pytest.raises(
        mergesmith.ConfigError, match=r"up_proj.weight: .*min_agreement: 2 .*\(1 of the adapters change"
    ):
        merge_adapters(ads, tmp_path / "x", method="consensus_ta")
    assert not (tmp_path / "x").exists()
    merge_adapters(ads, tmp_path / "x", method="consensus_ta", params={"min_agreement": 1})
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()


def poisoned(source: Path, directory: Path, value: float) -> tuple[Path, str]:
    """A copy of adapter ``source`` with one value of one factor set to ``value``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, directory)
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[name][3, 1] = value
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factors_stop_the_merge_naming_adapter_and_tensor(
    three: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float
) -> None:
    ads = three["adapters"]
    bad, name = poisoned(ads[1], tmp_path / "bad", value)
    out = tmp_path / "out"
    assert main(["lora", "merge", str(out), str(ads[0]), str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {bad / 'adapter_model.safetensors'}: {name} holds 1 NaN or infinite values; repair or replace "
        "that adapter (or merge anyway with --on-nonfinite warn)\n"
    )
    assert not out.exists()
    assert main(["lora", "merge", str(out), str(ads[0]), str(bad), "--on-nonfinite", "warn"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {bad / 'adapter_model.safetensors'}: {name} holds 1 NaN or infinite values" in err
    assert "Traceback" not in err
    assert "--on-nonfinite warn" in (out / "README.md").read_text()
    # a merge in the shared basis runs an SVD, which cannot take them even when warned
    args = ["lora", "merge", str(tmp_path / "kt"), str(ads[0]), str(bad), "--method", "knots_ties"]
    assert main([*args, "--on-nonfinite", "warn"]) == 1
    assert capsys.readouterr().err == (
        f"error: {bad / 'adapter_model.safetensors'}: {name} holds NaN or infinite values, which the knots_ties "
        "merge (an SVD of the factors) cannot take, even with --on-nonfinite warn; repair or replace that adapter\n"
    )
    assert not (tmp_path / "kt").exists()


def test_weights_that_are_not_finite_or_overflow_are_refused(
    three: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ads = [str(p) for p in three["adapters"][:2]]
    out = tmp_path / "out"
    assert main(["lora", "merge", str(out), *ads, "--weights", "nan", "1"]) == 1
    assert capsys.readouterr().err == (
        "error: weights must be finite numbers, found [nan, 1.0]; give one finite weight per adapter\n"
    )
    assert main(["lora", "merge", str(out), *ads, "--lambda", "inf"]) == 1
    assert capsys.readouterr().err == "error: lambda must be a finite number, found inf\n"
    assert main(["lora", "merge", str(out), *ads, "--weights", "3e38", "3e38", "--rank", "1"]) == 1
    assert capsys.readouterr().err == (
        "error: model.layers.0.mlp.up_proj: merged factor B holds 256 NaN or infinite values; the weights "
        "[3e+38, 3e+38] (lambda 1) overflow float32; use smaller weights (or merge anyway with --on-nonfinite warn)\n"
    )
    assert not out.exists()


def test_every_input_that_is_not_an_adapter_is_named_at_once(three: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    model = three["base"]  # a full model, not an adapter
    with pytest.raises(mergesmith.CheckpointError) as info:
        merge_adapters([tmp_path / "empty", three["adapters"][0], model], tmp_path / "out")
    text = str(info.value)
    assert text.startswith("2 problems reading the input models:")
    assert (
        f"{tmp_path / 'empty'}: no adapter_config.json; a LoRA input must be a PEFT adapter directory" in text
    )
    assert f"{model}: no adapter_config.json; a LoRA input must be a PEFT adapter directory" in text
    assert not (tmp_path / "out").exists()


def test_settings_left_null_take_peft_defaults(three: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    ad = shutil.copytree(three["adapters"][0], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": None, "use_rslora": None}))
    reports = merge_adapters([ad, three["adapters"][0]], tmp_path / "out", weights=[0.5, 0.5])
    assert {r.rank for r in reports} == {4}
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
