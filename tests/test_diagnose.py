"""mergesmith diagnose: lineage verdicts on the zoo, and conflict figures checked in numpy."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesmith.cli import main
from mergesmith.diagnose import SAMPLE, diagnose, write_diagnosis
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "zoo" / "models"


def config(base: Path, models: list[Path], density: float | None = None) -> dict[str, object]:
    params: dict[str, float] = {"weight": 1.0}
    if density is not None:
        params["density"] = density
    return {
        "merge_method": "ties" if density is not None else "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": params} for m in models],
    }


def test_zoo_fine_tunes_share_the_base_and_a_fresh_model_is_unrelated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny.load_state(ZOO / "base")
    gen = torch.Generator().manual_seed(5)
    # the same architecture from another initialization: every tensor drawn afresh with the same spread
    other = {
        k: (torch.randn(v.shape, generator=gen) * v.float().std() + v.float().mean()).half()
        for k, v in base.items()
    }
    cfg = json.loads((ZOO / "base" / "config.json").read_text())
    stranger = tiny.save(tmp_path / "stranger", other, cfg)
    found = diagnose(config(ZOO / "base", [ZOO / "add", ZOO / "rev", stranger]))
    add, rev, far = (str(ZOO / "add"), str(ZOO / "rev"), str(stranger))
    assert found.relative_norm[add] == pytest.approx(0.0265, abs=0.001)  # zoo/build_report.json: 0.02649
    assert found.relative_norm[rev] == pytest.approx(0.0461, abs=0.001)
    assert found.relative_norm[far] > 1.0
    assert len(found.verdicts) == 1
    assert found.verdicts[0].startswith(f"{far} was not fine-tuned from {ZOO / 'base'}")
    assert "merging them averages unrelated weights" in found.verdicts[0]
    assert main(["diagnose", json_config(tmp_path, found.base, [add, rev])]) == 0
    printed = capsys.readouterr().out
    assert "warning" not in printed and "task vector 2.65% of the base's norm" in printed


def json_config(tmp_path: Path, base: str, models: list[str]) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(json.dumps(config(Path(base), [Path(m) for m in models])))
    return str(path)


def test_cosine_and_sign_conflicts_equal_numpy_on_hand_built_task_vectors(tmp_path: Path) -> None:
    base, cfg = tiny.llama_state(0, num_hidden_layers=2)
    rng = np.random.default_rng(0)
    deltas = []
    for i in range(3):
        d = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in base.items()}
        if i == 2:  # partly aligned with the first, partly opposed
            d = {k: 0.6 * deltas[0][k] - 0.3 * v for k, v in d.items()}
        deltas.append(d)
    paths = [tiny.save(tmp_path / "base", base, cfg)]
    for i, d in enumerate(deltas):
        state = {k: base[k] + torch.from_numpy(d[k]) for k in base}
        paths.append(tiny.save(tmp_path / f"m{i}", state, cfg))
        deltas[i] = {k: (state[k] - base[k]).numpy() for k in base}  # exactly what is on disk
    density = 0.3
    assert max(v.numel() for v in base.values()) <= SAMPLE  # every tensor is used whole: exact figures
    found = diagnose(config(paths[0], paths[1:], density))

    def layer(name: str) -> str:
        parts = name.split(".")
        return parts[2] if parts[1] == "layers" else ("embed" if "embed" in name else "other")

    def trim(x: np.ndarray) -> np.ndarray:
        flat = np.abs(x).ravel()
        k = max(1, int(density * flat.size))
        threshold = np.sort(flat)[-k]
        return np.where(np.abs(x) >= threshold, x, 0.0)

    names = [str(p) for p in paths[1:]]
    for a, b in combinations(range(3), 2):
        pair = f"{names[a]} | {names[b]}"
        va = np.concatenate([deltas[a][k].ravel() for k in base]).astype(np.float64)
        vb = np.concatenate([deltas[b][k].ravel() for k in base]).astype(np.float64)
        assert found.cosine[pair] == pytest.approx(
            va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), rel=1e-9
        )
        both = opposite = 0
        per_layer: dict[str, list[int]] = {}
        for k in base:
            ta, tb = trim(deltas[a][k]), trim(deltas[b][k])
            kept = (ta != 0) & (tb != 0)
            opp = kept & ((ta > 0) != (tb > 0))
            both += int(kept.sum())
            opposite += int(opp.sum())
            counts = per_layer.setdefault(layer(k), [0, 0])
            counts[0] += int(opp.sum())
            counts[1] += int(kept.sum())
        assert found.sign_conflict[pair] == pytest.approx(opposite / both, rel=1e-12)
        for key, (opp_n, kept_n) in per_layer.items():
            assert found.layer_sign_conflict[pair][key] == pytest.approx(opp_n / kept_n, rel=1e-12)
        l0 = [k for k in base if layer(k) == "0"]
        la = np.concatenate([deltas[a][k].ravel() for k in l0]).astype(np.float64)
        lb = np.concatenate([deltas[b][k].ravel() for k in l0]).astype(np.float64)
        assert found.layer_cosine[pair]["0"] == pytest.approx(
            la @ lb / np.linalg.norm(la) / np.linalg.norm(lb), rel=1e-9
        )
    assert found.cosine[f"{names[0]} | {names[2]}"] > 0.8  # the built-in alignment shows
    for i, name in enumerate(names):
        kept = sum(float((trim(deltas[i][k]).astype(np.float64) ** 2).sum()) for k in base)
        total = sum(float((deltas[i][k].astype(np.float64) ** 2).sum()) for k in base)
        assert found.dropped_energy[name] == pytest.approx(1 - kept / total, rel=1e-9)
    written = write_diagnosis(found, tmp_path / "report")
    assert sorted(p.name for p in written) == [
        "conflicts.png",
        "diagnosis.html",
        "diagnosis.json",
        "norms.png",
        "similarity.png",
    ]
    html = (tmp_path / "report" / "diagnosis.html").read_text()
    for png in ("norms.png", "similarity.png", "conflicts.png"):
        assert f"src='{png}'" in html


def test_html_report_renders_with_its_plots_in_headless_chromium(tmp_path: Path) -> None:
    """Runs where Debian's chromium is installed (apt-get install chromium); skipped elsewhere."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    from matplotlib.image import imread

    found = diagnose(config(ZOO / "base", [ZOO / "add", ZOO / "rev", ZOO / "sort"], 0.5))
    write_diagnosis(found, tmp_path / "report")
    html = tmp_path / "report" / "diagnosis.html"
    bare = tmp_path / "report" / "bare.html"
    bare.write_text(html.read_text().replace("<img ", "<img hidden "))

    def colour(page: Path) -> float:
        shot = tmp_path / f"{page.stem}.png"
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,2600"]
        subprocess.run(
            [browser, *args, f"--screenshot={shot}", page.as_uri()],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pixels = imread(shot)[..., :3]
        # share of coloured pixels: the plots' lines and heatmap; the page's text is black on white
        return float((pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3).mean())

    with_plots, without = colour(html), colour(bare)
    assert with_plots > 0.01 and without == 0.0, (with_plots, without)


def test_sampled_figures_estimate_the_exact_ones_and_every_byte_is_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, cfg = tiny.llama_state(3, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    assert max(v.numel() for v in base.values()) >= 2 * SAMPLE  # the mlp tensors are sampled
    gen = torch.Generator().manual_seed(0)
    shared = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in base.items()}
    models = []
    for i in range(3):
        state = {
            k: v + shared[k] + torch.randn(v.shape, generator=gen) * 0.005 * (i + 1) for k, v in base.items()
        }
        if i == 0:
            state["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"].clone()
            one = base["model.layers.1.mlp.up_proj.weight"].clone()
            one[7, 11] += (
                1.0  # one entry of 131072: the sample almost surely misses it, the full compare does not
            )
            state["model.layers.1.mlp.up_proj.weight"] = one
        models.append(tiny.save(tmp_path / f"m{i}", state, cfg))
    base_dir = tiny.save(tmp_path / "base", base, cfg)
    cfg_map = config(base_dir, models, 0.4)
    sampled, exact = diagnose(cfg_map), diagnose(cfg_map, sample=0)
    assert sampled.sample == SAMPLE and exact.sample == 0
    for m in exact.models:
        assert sampled.relative_norm[m] == pytest.approx(exact.relative_norm[m], rel=0.01)
        assert sampled.dropped_energy[m] == pytest.approx(exact.dropped_energy[m], abs=0.01)
        for layer in exact.layers:
            assert sampled.layer_norm[m][layer] == pytest.approx(exact.layer_norm[m][layer], rel=0.03)
    for pair in exact.cosine:
        assert sampled.cosine[pair] == pytest.approx(exact.cosine[pair], abs=0.01)
        assert sampled.sign_conflict[pair] == pytest.approx(exact.sign_conflict[pair], abs=0.01)
    assert exact.cosine[f"{models[0]} | {models[1]}"] > 0.3  # the shared direction shows
    assert sampled.untouched == exact.untouched == {str(models[0]): 1, str(models[1]): 0, str(models[2]): 0}
    # read in 4 KB pieces instead of whole: the same sampled entries, so the very same figures
    monkeypatch.setattr("mergesmith.diagnose.CHUNK_BYTES", 4096)
    pieces = diagnose(cfg_map)
    assert (pieces.relative_norm, pieces.cosine, pieces.sign_conflict, pieces.untouched) == (
        sampled.relative_norm,
        sampled.cosine,
        sampled.sign_conflict,
        sampled.untouched,
    )


def test_merge_prints_a_quick_diagnosis_first_unless_told_not_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, cfg = tiny.llama_state(4)
    base_dir = tiny.save(tmp_path / "base", base, cfg)
    tuned = tiny.save(tmp_path / "tuned", tiny.finetune(base, 1), cfg)
    stranger = tiny.save(tmp_path / "stranger", tiny.llama_state(5)[0], cfg)
    path = tmp_path / "cfg.yml"
    path.write_text(json.dumps(config(base_dir, [tuned, stranger])))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    probe = "model.layers.1.mlp.down_proj.weight"  # the largest tensor of the middle layer
    assert "before merging" in err and f"measured on {probe}, one tensor per model" in err
    delta = base[probe] - tiny.finetune(base, 1)[probe]
    expected = float(delta.double().norm() / base[probe].double().norm())
    assert f"{tuned}: task vector {expected:.2%} of the base's norm" in err
    assert f"warning: {stranger} was not fine-tuned from {base_dir}" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["merge", str(path), str(tmp_path / "out2"), "--no-progress", "--no-diagnose"]) == 0
    assert "before merging" not in capsys.readouterr().err


def test_diagnose_base_and_models_without_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [str(ZOO / "add"), str(ZOO / "rev")]

    def figures() -> list[str]:  # the printed lines but the measured read speed and the time taken
        return [
            line
            for line in capsys.readouterr().out.splitlines()
            if not line.startswith(("cost:", "diagnosed"))
        ]

    assert main(["diagnose", json_config(tmp_path, str(ZOO / "base"), models)]) == 0
    from_config = figures()
    assert main(["diagnose", "--base", str(ZOO / "base"), *models]) == 0
    assert figures() == from_config and len(from_config) == 5
    assert main(["diagnose", "--base", str(ZOO / "base")]) == 1
    assert "name the models to compare with it" in capsys.readouterr().err


def test_a_file_shorter_than_its_header_names_the_file_and_tensor(tmp_path: Path) -> None:
    import os

    from mergesmith._safetensors import _pread_all
    from mergesmith.errors import CheckpointError

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError) as info:
            _pread_all(fd, memoryview(bytearray(64)), 80, path, "model.norm.weight")
    finally:
        os.close(fd)
    message = str(info.value)
    assert str(path) in message and "'model.norm.weight' at byte 100" in message and "again" in message


def test_progress_counts_the_input_bytes_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    found = diagnose(config(ZOO / "base", [ZOO / "add"]), progress=True)
    err = capsys.readouterr().err
    total = f"{found.measured_bytes / 1e6:.2f}M"
    assert found.measured_bytes == found.read_bytes  # every input tensor, once
    assert f"diagnosing: 100%|██████████| {total}/{total}" in err


def test_a_base_plus_adapter_model_is_measured_with_its_update_when_sampling() -> None:
    # With a sample below the tensors' size the figures come from stored bytes; the tensors a LoRA
    # adapter changes have none of their own and must be read with the adapter applied.
    adapted = f"{ZOO / 'base'}+{ZOO.parent / 'adapters' / 'add'}"
    doc = config(ZOO / "base", [Path(adapted), ZOO / "rev"])
    sampled, exact = diagnose(doc, sample=100, progress=False), diagnose(doc, sample=0, progress=False)
    assert exact.relative_norm[adapted] > 0.01
    assert sampled.relative_norm[adapted] == pytest.approx(exact.relative_norm[adapted], rel=0.1)
    assert sampled.untouched[adapted] == exact.untouched[adapted] < 39
    assert not any("identical to the base" in v for v in sampled.verdicts)
