"""KnOTS-TIES against the formula written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_methods import numpy_ties, run

RNG = np.random.default_rng(11)
BASE = RNG.normal(size=(6, 5)).astype(np.float32)
MODELS = [(BASE + 0.1 * RNG.normal(size=BASE.shape)).astype(np.float32) for _ in range(3)]


def numpy_knots_ties(
    base: np.ndarray, models: list[np.ndarray], weights: list[float], densities: list[float], lam: float
) -> np.ndarray:
    b = base.astype(np.float64)
    cols = b.shape[1]
    stacked = np.concatenate([m.astype(np.float64) - b for m in models], axis=1)
    u, s, vt = np.linalg.svd(stacked, full_matrices=False)
    factors = [vt[:, i * cols : (i + 1) * cols] for i in range(len(models))]
    merged = numpy_ties(np.zeros_like(factors[0]), factors, weights, densities, normalize=True, lam=lam)
    return b + (u * s) @ merged


@pytest.mark.parametrize("densities", [[1.0, 1.0, 1.0], [0.5, 0.7, 0.3]])
def test_knots_ties_matches_numpy(densities: list[float]) -> None:
    weights = [1.0, 0.5, 0.8]
    out = run(
        "knots_ties",
        MODELS,
        {"lambda": 0.9},
        [{"weight": w, "density": d} for w, d in zip(weights, densities)],
        base=BASE,
    )
    expected = numpy_knots_ties(BASE, MODELS, weights, densities, 0.9)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_one_model_at_full_density_is_its_task_vector_scaled() -> None:
    out = run("knots_ties", [MODELS[0]], {"lambda": 0.5}, [{"weight": 1.0}], base=BASE)
    np.testing.assert_allclose(out, BASE + 0.5 * (MODELS[0] - BASE), rtol=1e-5, atol=1e-6)


def test_identical_models_merge_to_themselves() -> None:
    out = run("knots_ties", [MODELS[1], MODELS[1]], {}, [{"weight": 1.0}, {"weight": 1.0}], base=BASE)
    np.testing.assert_allclose(out, MODELS[1], rtol=1e-5, atol=1e-5)


def test_vectors_fall_back_to_ties() -> None:
    base = BASE[0]
    models = [m[0] for m in MODELS]
    out = run(
        "knots_ties",
        models,
        {},
        [{"weight": 1.0, "density": 0.6}] * 3,
        base=base,
        name="model.layers.0.input_layernorm.weight",
    )
    np.testing.assert_allclose(out, numpy_ties(base, models, [1.0] * 3, [0.6] * 3), rtol=1e-5, atol=1e-6)


def test_knots_differs_from_plain_ties_when_trimming() -> None:
    dens = [{"weight": 1.0, "density": 0.4}] * 3
    knots = run("knots_ties", MODELS, {}, dens, base=BASE)
    plain = run("ties", MODELS, {}, dens, base=BASE)
    assert not np.allclose(knots, plain, atol=1e-4)


def test_a_model_that_changed_nothing_takes_no_part() -> None:
    with_idle = run(
        "knots_ties",
        [MODELS[0], BASE, MODELS[1]],
        {},
        [{"weight": 0.4}, {"weight": 0.5}, {"weight": 0.6}],
        base=BASE,
    )
    without = run("knots_ties", [MODELS[0], MODELS[1]], {}, [{"weight": 0.4}, {"weight": 0.6}], base=BASE)
    np.testing.assert_allclose(with_idle, without, rtol=1e-5, atol=1e-6)
