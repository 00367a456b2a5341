"""Breadcrumbs, DELLA and SCE against their formulas, written out independently in numpy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError
from mergesmith.errors import MethodError
from mergesmith.methods import REGISTRY, _steps
from mergesmith.methods.della import DellaModelParams, DellaParams, keep_probabilities
from tests.test_merge import config_for
from tests.test_methods import numpy_ties, run

rng = np.random.default_rng(11)
A = rng.normal(size=(8, 6)).astype(np.float32)
B = rng.normal(size=(8, 6)).astype(np.float32)
C = rng.normal(size=(8, 6)).astype(np.float32)
D = rng.normal(size=(8, 6)).astype(np.float32)


def numpy_combine(
    base: np.ndarray,
    deltas: list[np.ndarray],
    weights: list[float],
    *,
    ties: bool,
    normalize: bool,
    lam: float = 1.0,
) -> np.ndarray:
    """base + lambda * (weighted sum of task vectors, or TIES's sign-elected one), in float64."""
    weighted = [w * d.astype(np.float64) for w, d in zip(weights, deltas)]
    if ties:
        elected = np.where(np.sum(weighted, axis=0) >= 0, 1.0, -1.0)
        agree = [np.sign(u) == elected for u in weighted]
        total = sum(np.where(a, u, 0.0) for a, u in zip(agree, weighted))
        divisor = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        total = sum(weighted)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    merged = total / divisor if normalize else total
    return base.astype(np.float64) + lam * merged


# -- breadcrumbs ----------------------------------------------------------------------------------


def numpy_band(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit's band over the whole tensor: skip the gamma largest, keep the next density,
    moving the band up to the smallest entries when it would run off the end."""
    flat = delta.ravel()
    n = flat.size
    if density >= 1:
        return np.ones(delta.shape, dtype=bool)
    keep_n, top_n = int(density * n), int(gamma * n)
    first = min(top_n, n - keep_n)
    order = np.argsort(-np.abs(flat), kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[first : first + keep_n]] = True
    return keep.reshape(delta.shape)


def numpy_row_band(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """The paper's band, per row along the last axis: skip the gamma largest, keep what follows."""
    rows = delta.reshape(-1, delta.shape[-1])
    cols = rows.shape[1]
    top_n, keep_n = int(gamma * cols), int(density * cols)
    keep = np.zeros(rows.shape, dtype=bool)
    for r, row in enumerate(rows):
        order = np.argsort(-np.abs(row), kind="stable")
        keep[r, order[top_n : top_n + keep_n]] = True
    return keep.reshape(delta.shape)


# ten entries with magnitudes 1..10, signs mixed, in shuffled order
TEN = np.array([-7.0, 2.0, 10.0, -1.0, 5.0, -9.0, 3.0, 8.0, -4.0, 6.0], dtype=np.float32)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_keeps_exactly_the_middle_band(method: str) -> None:
    base = np.zeros(10, dtype=np.float32)
    out = run(method, [TEN], {}, [{"weight": 1.0, "density": 0.5, "gamma": 0.2}], base=base)
    # drop the 2 largest (10, 9), keep the next 5 (8, 7, 6, 5, 4), drop the 3 smallest (3, 2, 1)
    expected = np.where((np.abs(TEN) >= 4) & (np.abs(TEN) <= 8), TEN, 0)
    np.testing.assert_array_equal(out, expected)


def test_breadcrumbs_density_wins_over_gamma_when_they_overlap() -> None:
    base = np.zeros(10, dtype=np.float32)
    out = run("breadcrumbs", [TEN], {}, [{"weight": 1.0, "density": 0.85, "gamma": 0.2}], base=base)
    # 8 entries are kept, so only the 2 largest can go: 1..8 stay although gamma asks for 2 dropped
    np.testing.assert_array_equal(out, np.where(np.abs(TEN) <= 8, TEN, 0))
    out = run("breadcrumbs", [TEN], {}, [{"weight": 1.0, "density": 0.9, "gamma": 0.2}], base=base)
    np.testing.assert_array_equal(out, np.where(np.abs(TEN) <= 9, TEN, 0))


def test_breadcrumbs_keeps_nothing_when_density_rounds_to_no_entry() -> None:
    base = np.zeros(10, dtype=np.float32)
    out = run("breadcrumbs", [TEN], {}, [{"weight": 1.0, "density": 0.05, "gamma": 0.0}], base=base)
    np.testing.assert_array_equal(out, np.zeros(10))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_matches_numpy_with_weights_and_lambda(method: str, normalize: bool) -> None:
    mp = [
        {"weight": 0.7, "density": 0.5, "gamma": 0.1},
        {"weight": -0.3, "density": 0.8, "gamma": 0.3},
        {"weight": 0.5, "density": 0.3},
    ]
    out = run(method, [B, C, D], {"lambda": 0.9, "normalize": normalize}, mp, base=A)
    deltas = [
        np.where(numpy_band(m - A, p["density"], p.get("gamma", 0.01)), m - A, 0)
        for m, p in zip([B, C, D], mp)
    ]
    expected = numpy_combine(
        A, deltas, [0.7, -0.3, 0.5], ties=method == "breadcrumbs_ties", normalize=normalize, lam=0.9
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_rescale_keeps_each_task_vectors_l1_norm() -> None:
    base = np.zeros((8, 6), dtype=np.float32)
    out = run(
        "breadcrumbs", [B], {"rescale": True}, [{"weight": 1.0, "density": 0.4, "gamma": 0.1}], base=base
    )
    keep = numpy_band(B, 0.4, 0.1)
    expected = np.where(keep, B, 0) * np.abs(B).sum() / np.abs(B[keep]).sum()
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(np.abs(out).sum(), np.abs(B).sum(), rtol=1e-5)


def test_breadcrumbs_paper_mode_takes_the_band_of_each_row() -> None:
    base = np.zeros((2, 10), dtype=np.float32)
    rows = np.stack([TEN, 100 * TEN[::-1]])  # the second row is far larger than the first
    out = run(
        "breadcrumbs", [rows], {"mode": "paper"}, [{"weight": 1.0, "density": 0.5, "gamma": 0.2}], base=base
    )
    expected = np.where((np.abs(TEN) >= 4) & (np.abs(TEN) <= 8), TEN, 0)
    np.testing.assert_array_equal(out, np.stack([expected, 100 * expected[::-1]]))
    # over the whole tensor (20 entries) 700..1000 go, then 100..600 and 7..10 are the next 10
    whole = run("breadcrumbs", [rows], {}, [{"weight": 1.0, "density": 0.5, "gamma": 0.2}], base=base)
    np.testing.assert_array_equal(whole[0], np.where(np.abs(TEN) >= 7, TEN, 0))
    np.testing.assert_array_equal(whole[1], np.where(np.abs(rows[1]) <= 600, rows[1], 0))


def test_breadcrumbs_paper_mode_lets_gamma_win_and_drops_outliers_at_density_one() -> None:
    base = np.zeros(10, dtype=np.float32)
    out = run(
        "breadcrumbs", [TEN], {"mode": "paper"}, [{"weight": 1.0, "density": 0.9, "gamma": 0.2}], base=base
    )
    np.testing.assert_array_equal(out, np.where(np.abs(TEN) <= 8, TEN, 0))  # 8 left, not 9
    out = run(
        "breadcrumbs", [TEN], {"mode": "paper"}, [{"weight": 1.0, "density": 1.0, "gamma": 0.1}], base=base
    )
    np.testing.assert_array_equal(out, np.where(np.abs(TEN) <= 9, TEN, 0))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_paper_mode_matches_numpy(method: str) -> None:
    x = np.random.default_rng(5).normal(size=(3, 16, 12)).astype(np.float32)
    base, models = x[0], [x[1], x[2]]
    mp = [{"weight": 0.6, "density": 0.5, "gamma": 0.1}, {"weight": 0.8, "density": 0.7, "gamma": 0.25}]
    out = run(method, models, {"mode": "paper", "normalize": True}, mp, base=base)
    deltas = [
        np.where(numpy_row_band(m - base, p["density"], p["gamma"]), m - base, 0) for m, p in zip(models, mp)
    ]
    expected = numpy_combine(base, deltas, [0.6, 0.8], ties=method == "breadcrumbs_ties", normalize=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["mergekit", "paper"])
def test_breadcrumbs_at_density_one_and_gamma_zero_is_task_arithmetic(mode: str) -> None:
    mp = [{"weight": 0.6, "density": 1.0, "gamma": 0.0}, {"weight": -0.2, "density": 1.0, "gamma": 0.0}]
    out = run("breadcrumbs", [B, C], {"mode": mode}, mp, base=A)
    np.testing.assert_allclose(out, A + 0.6 * (B - A) - 0.2 * (C - A), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_ignores_gamma_at_density_one() -> None:
    mp = [{"weight": 0.6, "density": 1.0, "gamma": 0.3}, {"weight": 0.4, "density": 1.0, "gamma": 0.5}]
    out = run("breadcrumbs", [B, C], {}, mp, base=A)
    np.testing.assert_allclose(out, A + 0.6 * (B - A) + 0.4 * (C - A), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_ties_with_gamma_zero_is_ties() -> None:
    mp = [{"weight": 0.7, "density": 0.3, "gamma": 0.0}, {"weight": 0.5, "density": 0.6, "gamma": 0.0}]
    out = run("breadcrumbs_ties", [B, C], {"normalize": True}, mp, base=A)
    np.testing.assert_allclose(out, numpy_ties(A, [B, C], [0.7, 0.5], [0.3, 0.6]), rtol=1e-5, atol=1e-6)


def test_top_k_mask_breaks_ties_by_index() -> None:
    values = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 1.0])
    assert _steps.top_k_mask(values, 2).tolist() == [False, True, True, False, False, False]
    assert _steps.top_k_mask(values, 4).tolist() == [True, True, True, False, True, False]
    assert not _steps.top_k_mask(values, 0).any() and _steps.top_k_mask(values, 6).all()


# -- DELLA ----------------------------------------------------------------------------------------


def numpy_keep_probabilities(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Per row (along axis 1; a 1-D array is one row): rank r = 0 for the smallest |x| of c entries,
    p = density - epsilon + 2 epsilon r / (c - 1)."""
    rows = delta.reshape(1, -1) if delta.ndim < 2 else np.moveaxis(delta, 1, -1).reshape(-1, delta.shape[1])
    c = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    probs = density - epsilon + 2 * epsilon * ranks / (c - 1)
    if delta.ndim < 2:
        return probs.reshape(delta.shape)
    moved = np.moveaxis(delta, 1, -1).shape
    return np.moveaxis(probs.reshape(moved), -1, 1)


def test_della_keep_probabilities_on_a_hand_built_row() -> None:
    delta = torch.tensor([[3.0, -1.0, 2.0, -5.0], [0.1, 0.4, -0.3, 0.2]])
    probs = keep_probabilities(delta, 0.5, 0.1)
    # ranks by magnitude: row 0 -> 2, 0, 1, 3; row 1 -> 0, 3, 2, 1; p = 0.4 + 0.2 * rank / 3
    expected = 0.4 + 0.2 * np.array([[2, 0, 1, 3], [0, 3, 2, 1]]) / 3
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 6), (6, 1)])
def test_della_keep_probabilities_match_the_formula(shape: tuple[int, ...]) -> None:
    delta = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    got = keep_probabilities(torch.tensor(delta), 0.4, 0.25).numpy()
    if shape[-1] == 1 and len(shape) == 2:
        expected = np.full(shape, 0.4)  # a row of one entry has no spread
    else:
        expected = numpy_keep_probabilities(delta, 0.4, 0.25)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    rows = got.reshape(1, -1) if got.ndim < 2 else np.moveaxis(got, 1, -1).reshape(-1, got.shape[1])
    np.testing.assert_allclose(rows.mean(axis=1), 0.4, rtol=1e-6)  # the mean keep rate is density


# 2000 identical rows: each column is drawn 2000 times with the same keep probability
ROW = np.array([0.3, -1.2, 0.05, 2.0, -0.7, 0.9, -0.15, 1.6, -2.4, 0.45], dtype=np.float32)
ROWS = np.tile(ROW, (2000, 1))
ZEROS = np.zeros_like(ROWS)


def test_della_keeps_each_rank_with_its_probability() -> None:
    out = run(
        "della_linear",
        [ROWS],
        {"rescale": False},
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}],
        base=ZEROS,
        seed=4,
    )
    kept = out != 0
    np.testing.assert_array_equal(out[kept], ROWS[kept])  # no rescale: survivors unchanged
    p = numpy_keep_probabilities(ROW, 0.5, 0.3)  # 0.2 for the smallest |x| ... 0.8 for the largest
    freq = kept.mean(axis=0)
    sd = np.sqrt(p * (1 - p) / ROWS.shape[0])
    assert np.all(np.abs(freq - p) < 5 * sd), (freq, p)
    assert freq[np.argmax(np.abs(ROW))] > freq[np.argmin(np.abs(ROW))] + 0.4


def test_della_paper_mode_divides_by_each_keep_probability_and_keeps_the_mean() -> None:
    out = run(
        "della_linear",
        [ROWS],
        {"mode": "paper"},
        [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}],
        base=ZEROS,
    )
    p = np.broadcast_to(numpy_keep_probabilities(ROW, 0.4, 0.2), ROWS.shape)
    kept = out != 0
    np.testing.assert_allclose(out[kept], ROWS[kept] / p[kept], rtol=1e-6)
    # E[mask / p] = 1 entry by entry; each column's mean over the rows has variance x^2 (1 - p) / (p n)
    n = ROWS.shape[0]
    sd = np.abs(ROW) * np.sqrt((1 - p[0]) / (p[0] * n))
    assert np.all(np.abs(out.mean(axis=0) - ROW) < 5 * sd)
    total_sd = math.sqrt(float(np.sum(ROWS.astype(np.float64) ** 2 * (1 - p) / p)))
    assert abs(float(out.astype(np.float64).sum()) - float(ROWS.astype(np.float64).sum())) < 5 * total_sd


def test_della_mergekit_mode_rescales_to_the_l1_norm() -> None:
    out = run("della_linear", [ROWS], {}, [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}], base=ZEROS)
    kept = out != 0
    scale = np.abs(ROWS).sum() / np.abs(ROWS[kept]).sum()
    np.testing.assert_allclose(out[kept], ROWS[kept] * scale, rtol=1e-5)
    np.testing.assert_allclose(np.abs(out).sum(), np.abs(ROWS).sum(), rtol=1e-5)


BIG = np.random.default_rng(8).normal(size=(3, 40, 30)).astype(np.float32)


@pytest.mark.parametrize("mode", ["mergekit", "paper"])
def test_della_with_epsilon_zero_is_dare(mode: str) -> None:
    base, models = BIG[0], [BIG[1], BIG[2]]
    mp = [{"weight": 0.6, "density": 0.3, "epsilon": 0.0}, {"weight": 0.5, "density": 0.7, "epsilon": 0.0}]
    dare_mp = [{"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.7}]
    for della, dare in (("della_linear", "dare_linear"), ("della", "dare_ties")):
        params = {"mode": mode, "normalize": True}
        a = run(della, models, params, mp, base=base, seed=9)
        b = run(dare, models, params, dare_mp, base=base, seed=9)
        np.testing.assert_array_equal(a, b)


def test_random_mask_like_with_equal_probabilities_is_random_mask() -> None:
    shape = torch.Size([3, 1000])
    a = _steps.random_mask(shape, 0.3, torch.Generator().manual_seed(5), torch.device("cpu"))
    b = _steps.random_mask_like(torch.full(shape, 0.3), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_della_at_density_one_is_ties_and_della_linear_is_task_arithmetic() -> None:
    mp = [{"weight": 0.7, "density": 1.0}, {"weight": 0.4, "density": 1.0}]
    out = run("della", [B, C], {}, mp, base=A)
    np.testing.assert_allclose(out, numpy_ties(A, [B, C], [0.7, 0.4], [1.0, 1.0]), rtol=1e-5, atol=1e-6)
    out = run("della_linear", [B, C], {"lambda": 0.5}, mp, base=A)
    np.testing.assert_allclose(out, A + 0.5 * (0.7 * (B - A) + 0.4 * (C - A)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_sparse_merge_matches_numpy_given_its_masks(method: str) -> None:
    base, models = BIG[0], [BIG[1], BIG[2]]
    mp = [{"weight": 0.8, "density": 0.5, "epsilon": 0.1}, {"weight": 0.3, "density": 0.6, "epsilon": 0.3}]
    params = {"mode": "paper", "lambda": 1.3}
    out = run(method, models, params, mp, base=base, seed=3)
    # della_linear with weight 1 on one model and 0 on the other gives that model's sparse task
    # vector: the masks depend only on the seed, the tensor name, the model's position and its delta
    deltas = []
    for i in range(2):
        one = [{**p, "weight": 1.0 if j == i else 0.0} for j, p in enumerate(mp)]
        deltas.append(run("della_linear", models, {"mode": "paper"}, one, base=base, seed=3) - base)
    for d, m, p in zip(deltas, models, mp):
        kept = d != 0
        probs = numpy_keep_probabilities(m - base, p["density"], p["epsilon"])
        np.testing.assert_allclose(d[kept], ((m - base) / probs)[kept], rtol=1e-4, atol=1e-5)
    normalize = method == "della"
    expected = numpy_combine(base, deltas, [0.8, 0.3], ties=method == "della", normalize=normalize, lam=1.3)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_della_masks_are_reproducible_and_depend_on_seed_and_tensor_name() -> None:
    args: tuple[Any, ...] = ([BIG[1]], {}, [{"weight": 1.0, "density": 0.5}])
    one = run("della_linear", *args, base=BIG[0], name="x", seed=1)
    np.testing.assert_array_equal(one, run("della_linear", *args, base=BIG[0], name="x", seed=1))
    assert not np.array_equal(one, run("della_linear", *args, base=BIG[0], name="y", seed=1))
    assert not np.array_equal(one, run("della_linear", *args, base=BIG[0], name="x", seed=2))


@pytest.mark.parametrize(("density", "epsilon"), [(0.9, 0.1), (0.1, 0.1), (0.3, 0.5)])
def test_della_refuses_keep_probabilities_outside_zero_one(density: float, epsilon: float) -> None:
    check = REGISTRY["della"].check
    assert check is not None
    ok = DellaModelParams(weight=1.0, density=0.5, epsilon=0.1)
    bad = DellaModelParams(weight=1.0, density=density, epsilon=epsilon)
    assert check(DellaParams(), [ok, ok]) is None
    assert check(DellaParams(), [ok, DellaModelParams(weight=1.0, density=1.0, epsilon=0.9)]) is None
    trouble = check(DellaParams(), [ok, bad])
    assert trouble is not None
    assert "model 2 (counting" in trouble and f"density {density:g} and epsilon {epsilon:g}" in trouble
    assert f"set epsilon below {min(density, 1 - density):g}" in trouble
    with pytest.raises(MethodError, match="must lie strictly between 0 and 1"):
        run("della", [B], {}, [{"weight": 1.0, "density": density, "epsilon": epsilon}], base=A)


def test_della_bad_epsilon_is_refused_at_plan_time(zoo: dict[str, Path]) -> None:
    text = config_for("della_linear", zoo, "parameters: {epsilon: 0.5}\n")  # every density is 0.6
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    assert "density 0.6 and epsilon 0.5" in str(info.value)
    assert "set epsilon below 0.4 or move density" in str(info.value)


# -- SCE ------------------------------------------------------------------------------------------


def numpy_sce(base: np.ndarray, models: list[np.ndarray], select_topk: float = 1.0) -> np.ndarray:
    tvs = np.stack([m.astype(np.float64) - base for m in models])
    if select_topk < 1:
        var = tvs.var(axis=0)  # population variance across models
        k = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-var.ravel(), kind="stable")[:k]] = True
        tvs = tvs * keep.reshape(var.shape)
    energy = (tvs**2).reshape(len(models), -1).mean(axis=1)
    w = energy / energy.sum() if energy.sum() >= 1e-6 else np.full(len(models), 1 / len(models))
    elected = np.where(tvs.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(tvs) == elected
    weights = w.reshape(-1, *[1] * base.ndim) * agree
    return base + (weights * tvs).sum(axis=0) / np.maximum(weights.sum(axis=0), 1e-6)


def test_sce_erases_the_minority_sign_on_a_hand_built_conflict() -> None:
    base = np.full(4, 10.0, dtype=np.float32)
    # each task vector holds the magnitudes 1..4, so their mean squares and weights are all equal
    m1 = base + np.array([1.0, -2.0, 3.0, -4.0], dtype=np.float32)
    m2 = base + np.array([2.0, 3.0, -4.0, 1.0], dtype=np.float32)
    m3 = base + np.array([-3.0, 4.0, -1.0, 2.0], dtype=np.float32)
    out = run("sce", [m1, m2, m3], {}, [{}, {}, {}], base=base)
    # entry 0: sum 0 -> +, mean of 1 and 2; entry 1: sum +5 -> +, mean of 3 and 4;
    # entry 2: sum -2 -> -, mean of -4 and -1; entry 3: sum -1 -> -: -4 alone outweighs +1 and +2
    np.testing.assert_allclose(out, base + np.array([1.5, 3.5, -2.5, -4.0]), rtol=1e-6)


def test_sce_weighs_models_by_their_mean_squared_task_vector() -> None:
    base = np.zeros(4, dtype=np.float32)
    m1 = np.array([1.0, 1.0, 1.0, -1.0], dtype=np.float32)  # mean square 1
    m2 = np.array([2.0, 2.0, -2.0, 2.0], dtype=np.float32)  # mean square 4
    out = run("sce", [m1, m2], {}, [{}, {}], base=base)
    # weights 0.2 and 0.8; entries 0, 1: both agree -> (0.2 * 1 + 0.8 * 2) / 1; entry 2: sum -1 -> only
    # m2 (-2) agrees; entry 3: sum +1 -> only m2 (+2)
    np.testing.assert_allclose(out, [1.8, 1.8, -2.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.25])
def test_sce_matches_numpy(select_topk: float) -> None:
    out = run("sce", [B, C, D], {"select_topk": select_topk}, [{}, {}, {}], base=A)
    np.testing.assert_allclose(out, numpy_sce(A, [B, C, D], select_topk), rtol=1e-5, atol=1e-6)


def test_sce_selects_the_highest_variance_among_the_entries_that_vary() -> None:
    base = np.zeros(6, dtype=np.float32)
    m1 = np.array([1.0, 5.0, 0.0, 2.0, 3.0, 0.5], dtype=np.float32)
    m2 = np.array([1.0, -5.0, 0.0, 1.0, 4.0, 0.4], dtype=np.float32)
    # variances: 0, 25, 0, 0.25, 0.25, 0.0025 -> 4 non-zero; select_topk 0.5 keeps 2: entries 1 and 3
    # (3 and 4 tie at 0.25: the lower index wins)
    out = run("sce", [m1, m2], {"select_topk": 0.5}, [{}, {}], base=base)
    # kept task vectors: m1 -> [0, 5, 0, 2, 0, 0], m2 -> [0, -5, 0, 1, 0, 0], mean squares 29/6, 26/6;
    # entry 1: sum 0 -> +, only m1's 5; entry 3: both agree -> (29 * 2 + 26 * 1) / 55
    np.testing.assert_allclose(out, [0, 5, 0, 84 / 55, 0, 0], rtol=1e-6, atol=1e-7)


def test_sce_weighs_equally_when_the_task_vectors_are_tiny() -> None:
    base = np.zeros(4, dtype=np.float32)
    m1 = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32) * 1e-4  # mean squares 1e-8 and 4e-8
    m2 = np.array([2.0, 2.0, 2.0, 2.0], dtype=np.float32) * 1e-4
    out = run("sce", [m1, m2], {}, [{}, {}], base=base)
    np.testing.assert_allclose(out, np.full(4, 1.5e-4), rtol=1e-5)  # not 0.2 * 1 + 0.8 * 2 = 1.8e-4


def test_sce_of_one_model_is_that_model_or_with_selection_the_base() -> None:
    np.testing.assert_allclose(run("sce", [B], {}, [{}], base=A), B, rtol=1e-6, atol=1e-6)
    # the variance across a single model is zero everywhere, so nothing is selected
    np.testing.assert_array_equal(run("sce", [B], {"select_topk": 0.5}, [{}], base=A), A)


def test_sce_leaves_the_base_where_no_task_vector_moves() -> None:
    base = np.ones(3, dtype=np.float32)
    out = run("sce", [base + np.array([0, 1, 0], dtype=np.float32), base.copy()], {}, [{}, {}], base=base)
    np.testing.assert_allclose(out, [1, 2, 1], rtol=1e-6)


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"])
def test_identical_inputs_merge_to_themselves(method: str) -> None:
    infos = {i.key for i in REGISTRY[method].model_param_infos}
    mp = [{k: v for k, v in {"weight": 0.5, "density": 0.5}.items() if k in infos}] * 2
    out = run(method, [A, A], {}, mp, base=A)
    np.testing.assert_array_equal(out, A)
