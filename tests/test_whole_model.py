"""TIES as its paper defines it: each model trimmed over its whole task vector, count-averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError
from mergesmith.whole_model import magnitude_thresholds
from tests import tiny


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 0.5, 0.999, 1.0])
def test_thresholds_match_a_full_sort(density: float) -> None:
    gen = torch.Generator().manual_seed(0)
    # three "tensors" per model; many repeated magnitudes, and values spread over many exponents
    parts = {
        m: [
            (torch.randint(-50, 51, (n,), generator=gen).float() / 8)
            * 10 ** torch.randint(-3, 2, (n,), generator=gen)
            for n in (1000, 37, 5000)
        ]
        for m in (0, 3)
    }
    jobs = [lambda j=j: [(m, parts[m][j]) for m in parts] for j in range(3)]
    found = magnitude_thresholds(jobs, {0: density, 3: density})
    for m, tensors in parts.items():
        mags = np.sort(np.abs(torch.cat(tensors).numpy()))[::-1]
        keep = int(density * mags.size)
        expected = 0.0 if keep >= mags.size else float(mags[keep])  # the (keep + 1)-th largest
        assert found[m] == expected, (m, density)


def numpy_ties_paper(
    base: dict[str, np.ndarray],
    models: list[dict[str, np.ndarray]],
    weights: list[float],
    density: float,
    lam: float,
) -> dict[str, np.ndarray]:
    names = sorted(base)
    thresholds = []
    for m in models:
        flat = np.concatenate([np.abs(m[n] - base[n]).ravel() for n in names])
        keep = int(density * flat.size)
        thresholds.append(np.sort(flat)[::-1][keep] if keep < flat.size else 0.0)
    out = {}
    for n in names:
        deltas = []
        for m, w, thr in zip(models, weights, thresholds):
            d = m[n] - base[n]
            deltas.append(w * np.where(np.abs(d) >= thr, d, 0))
        total = np.sum(deltas, axis=0)
        sign = np.where(total >= 0, 1.0, -1.0)
        agree = [np.where(sign > 0, d > 0, d < 0) for d in deltas]
        summed = np.sum([d * a for d, a in zip(deltas, agree)], axis=0)
        count = np.maximum(np.sum(agree, axis=0), 1)
        out[n] = base[n] + lam * summed / count
    return out


def test_paper_mode_trims_over_the_whole_model_and_averages_by_count(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    text = (
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
        f"  - model: {zoo['b']}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
        f"  - model: {zoo['c']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
        "parameters: {mode: paper, lambda: 0.9}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    base = {k: v.numpy() for k, v in tiny.load_state(zoo["base"]).items()}
    models = [{k: v.numpy() for k, v in tiny.load_state(zoo[m]).items()} for m in ("a", "b")]
    models.append(
        {k: v.numpy() for k, v in torch.load(zoo["c"] / "pytorch_model.bin", weights_only=True).items()}
    )
    expected = numpy_ties_paper(base, models, [1.0, 0.5, 1.0], 0.3, 0.9)
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)
    # the trim is global: some tensors keep far more than 30% of a model's entries, others far less
    a_delta = {n: models[0][n] - base[n] for n in base}
    flat = np.concatenate([np.abs(d).ravel() for d in a_delta.values()])
    thr = np.sort(flat)[::-1][int(0.3 * flat.size)]
    kept = [float((np.abs(d) >= thr).mean()) for d in a_delta.values()]
    assert max(kept) - min(kept) > 0.2


def test_paper_mode_needs_one_density_per_model(zoo: dict[str, Path]) -> None:
    text = (
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters:\n      weight: 1\n      density:\n"
        "        - filter: mlp\n          value: 0.2\n        - value: 0.5\n"
        "parameters: {mode: paper}\n"
    )
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    assert str(info.value) == (
        f"<config>: {zoo['a']}: density varies across tensors (0.2, 0.5), but ties trims over the whole model "
        "here and needs one density per model; give it a single value"
    )


def test_paper_mode_refuses_rescale(zoo: dict[str, Path]) -> None:
    text = (
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 1, density: 0.5}}\n"
        "parameters: {mode: paper, rescale: true}\n"
    )
    with pytest.raises(ConfigError, match="ties mode: paper keeps the trimmed entries as they are"):
        mergesmith.validate(text)
