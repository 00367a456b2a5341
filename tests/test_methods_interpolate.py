"""The interpolation methods (model_stock, nuslerp, multislerp, karcher, nearswap) against their
formulas, written out independently in numpy on hand-built tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergesmith import ConfigError, load_config
from mergesmith.errors import MethodError
from mergesmith.methods import REGISTRY
from mergesmith.methods.multislerp import MultiSlerpModelParams, MultiSlerpParams
from mergesmith.methods.multislerp import check as multislerp_check
from tests.test_methods import run

rng = np.random.default_rng(7)
A = rng.normal(size=(8, 6)).astype(np.float32)
B = rng.normal(size=(8, 6)).astype(np.float32)
C = rng.normal(size=(8, 6)).astype(np.float32)
D = rng.normal(size=(8, 6)).astype(np.float32)

TOL = {"rtol": 1e-5, "atol": 1e-6}


def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def unit(x: np.ndarray) -> np.ndarray:
    return f64(x) / np.linalg.norm(f64(x))


def np_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle interpolation of two flattened vectors, coefficients applied to the vectors."""
    a, b = f64(a), f64(b)
    cos = np.clip(np.dot(unit(a).ravel(), unit(b).ravel()), -1, 1)
    if abs(cos) == 1:
        return (1 - t) * a + t * b
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def angle_vector(degrees: float, norm: float = 1.0) -> np.ndarray:
    r = math.radians(degrees)
    return np.array([norm * math.cos(r), norm * math.sin(r)], dtype=np.float32)


# -- model_stock ----------------------------------------------------------------------------------


def np_model_stock(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """t = k c / (1 + (k - 1) c) with c the mean pairwise cosine of the task vectors."""
    deltas = [(f64(m) - f64(base)).ravel() for m in models]
    k = len(deltas)
    cosines = [
        np.dot(deltas[i], deltas[j]) / (np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]))
        for i in range(k)
        for j in range(i + 1, k)
    ]
    c = float(np.mean(cosines))
    t = k * c / (1 + (k - 1) * c)
    return t * np.mean([f64(m) for m in models], axis=0) + (1 - t) * f64(base)


def test_model_stock_two_models_at_sixty_degrees_gives_t_two_thirds() -> None:
    base = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    d1 = np.array([2.0, 0.0, 0.0], dtype=np.float32)
    d2 = np.array([0.5, math.sqrt(3) / 2, 0.0], dtype=np.float32)  # 60 degrees from d1: cos = 1/2
    out = run("model_stock", [base + d1, base + d2], {}, [{}, {}], base=base)
    t = 2 * 0.5 / (1 + 0.5)  # = 2/3
    expected = base + t * (d1 + d2) / 2
    np.testing.assert_allclose(out, expected, **TOL)
    np.testing.assert_allclose(out, [1.0 + 2.5 / 3, -2.0 + math.sqrt(3) / 6, 0.5], **TOL)


def test_model_stock_three_models_uses_the_mean_pairwise_cosine() -> None:
    base = A
    models = [A + 0.5 * B + 0.3 * C, A + 0.5 * B - 0.2 * D, A + 0.4 * B + 0.3 * D]
    out = run("model_stock", models, {}, [{}, {}, {}], base=base)
    np.testing.assert_allclose(out, np_model_stock(base, models), **TOL)


def test_model_stock_orthogonal_task_vectors_keep_the_base() -> None:
    base = np.array([3.0, 4.0, 5.0], dtype=np.float32)
    d1 = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    d2 = np.array([0.0, 2.0, 0.0], dtype=np.float32)
    out = run("model_stock", [base + d1, base + d2], {}, [{}, {}], base=base)
    np.testing.assert_allclose(out, base, **TOL)


def test_model_stock_opposite_task_vectors_are_singular_and_keep_the_base() -> None:
    base = np.array([3.0, 4.0, 5.0], dtype=np.float32)
    d = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    out = run("model_stock", [base + d, base - d], {}, [{}, {}], base=base)  # 1 + cos = 0
    np.testing.assert_array_equal(out, base)


def test_model_stock_negative_cosine_extrapolates_away_from_the_mean() -> None:
    base = np.zeros(2, dtype=np.float32)
    d1, d2 = angle_vector(0), angle_vector(120)  # cos = -1/2: t = -1/(1/2) = -2
    out = run("model_stock", [d1, d2], {}, [{}, {}], base=base)
    np.testing.assert_allclose(out, -2 * (d1 + d2) / 2, **TOL)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio() -> None:
    base = np.zeros((2, 2), dtype=np.float32)
    m1 = np.array([[1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    m2 = np.array([[0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    out = run("model_stock", [m1, m2], {"filter_wise": True}, [{}, {}], base=base)
    # row 0: orthogonal (t = 0, the base); row 1: same direction (t = 1, the mean)
    np.testing.assert_allclose(out, [[0.0, 0.0], [1.5, 1.5]], **TOL)
    whole = run("model_stock", [m1, m2], {}, [{}, {}], base=base)
    np.testing.assert_allclose(whole, np_model_stock(base, [m1, m2]), **TOL)


def test_model_stock_filter_wise_on_3d_tensors_uses_the_last_dimension() -> None:
    base = rng.normal(size=(2, 3, 4)).astype(np.float32)
    models = [base + rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(3)]
    out = run("model_stock", models, {"filter_wise": True}, [{}] * 3, base=base)
    expected = np.empty((2, 3, 4))
    for i in range(2):
        for j in range(3):
            expected[i, j] = np_model_stock(base[i, j], [m[i, j] for m in models])
    np.testing.assert_allclose(out, expected, **TOL)


def test_model_stock_filter_wise_on_a_1d_tensor_is_the_whole_tensor() -> None:
    base, models = A[0], [B[0], C[0]]
    per_row = run("model_stock", models, {"filter_wise": True}, [{}, {}], base=base)
    whole = run("model_stock", models, {}, [{}, {}], base=base)
    np.testing.assert_allclose(per_row, whole, **TOL)
    np.testing.assert_allclose(whole, np_model_stock(base, models), **TOL)


def test_model_stock_identical_fine_tunes_give_the_fine_tune_and_unchanged_ones_the_base() -> None:
    np.testing.assert_allclose(run("model_stock", [B, B], {}, [{}, {}], base=A), B, **TOL)
    np.testing.assert_array_equal(run("model_stock", [A, A, A], {}, [{}] * 3, base=A), A)


# -- nuslerp --------------------------------------------------------------------------------------


def test_nuslerp_equal_weights_is_slerp_at_one_half() -> None:
    out = run("nuslerp", [A, B], {}, [{"weight": 1.0}, {"weight": 1.0}])
    np.testing.assert_allclose(out, np_slerp(0.5, A, B), **TOL)


def test_nuslerp_position_is_the_second_weights_share() -> None:
    out = run("nuslerp", [A, B], {}, [{"weight": 0.5}, {"weight": 1.5}])
    np.testing.assert_allclose(out, np_slerp(0.75, A, B), **TOL)


def test_nuslerp_weights_summing_to_zero_give_one_half() -> None:
    out = run("nuslerp", [A, B], {}, [{"weight": 1.0}, {"weight": -1.0}])
    np.testing.assert_allclose(out, np_slerp(0.5, A, B), **TOL)


def test_nuslerp_of_orthogonal_unit_vectors_stays_on_the_circle() -> None:
    out = run("nuslerp", [angle_vector(0), angle_vector(90)], {}, [{"weight": 2.0}, {"weight": 1.0}])
    np.testing.assert_allclose(out, angle_vector(30), **TOL)  # t = 1/3 of 90 degrees


def test_nuslerp_with_a_base_interpolates_the_task_vectors() -> None:
    out = run("nuslerp", [B, C], {}, [{"weight": 0.3}, {"weight": 0.7}], base=A)
    np.testing.assert_allclose(out, A + np_slerp(0.7, B - A, C - A), **TOL)


def test_nuslerp_without_flatten_interpolates_each_row() -> None:
    out = run("nuslerp", [A, B], {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 3.0}])
    expected = np.stack([np_slerp(0.75, A[i], B[i]) for i in range(A.shape[0])])
    np.testing.assert_allclose(out, expected, **TOL)


def test_nuslerp_row_wise_interpolates_each_column() -> None:
    """nuslerp_row_wise (with nuslerp_flatten: false) runs the vectors along the first dimension."""
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    out = run("nuslerp", [A, B], params, [{"weight": 1.0}, {"weight": 3.0}], base=C)
    expected = np.stack([C[:, j] + np_slerp(0.75, A[:, j] - C[:, j], B[:, j] - C[:, j]) for j in range(6)], 1)
    np.testing.assert_allclose(out, expected, **TOL)


def test_nuslerp_row_wise_on_3d_tensors_pairs_the_first_and_last_dimensions() -> None:
    x = rng.normal(size=(3, 2, 4)).astype(np.float32)
    y = rng.normal(size=(3, 2, 4)).astype(np.float32)
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    out = run("nuslerp", [x, y], params, [{"weight": 1.0}, {"weight": 1.0}])
    expected = np.empty((3, 2, 4))
    for j in range(2):
        for k in range(4):
            expected[:, j, k] = np_slerp(0.5, x[:, j, k], y[:, j, k])
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_row_options_on_a_1d_tensor_are_the_whole_vector(row_wise: bool) -> None:
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise}
    out = run("nuslerp", [A[0], B[0]], params, [{"weight": 1.0}, {"weight": 2.0}])
    np.testing.assert_allclose(out, np_slerp(2 / 3, A[0], B[0]), **TOL)


def test_nuslerp_colinear_inputs_interpolate_linearly() -> None:
    v = np.array([1.0, 2.0, -2.0], dtype=np.float32)
    out = run("nuslerp", [v, 3 * v], {}, [{"weight": 3.0}, {"weight": 1.0}])
    np.testing.assert_allclose(out, 0.75 * v + 0.25 * 3 * v, **TOL)


def test_nuslerp_zero_vector_is_treated_as_orthogonal() -> None:
    """A zero vector has cosine 0 with anything: the result is sin(t pi/2) times the other vector."""
    zero = np.zeros(3, dtype=np.float32)
    v = np.array([1.0, 2.0, -2.0], dtype=np.float32)
    out = run("nuslerp", [zero, v], {}, [{"weight": 1.0}, {"weight": 1.0}])
    np.testing.assert_allclose(out, math.sin(math.pi / 4) * v, **TOL)


def test_nuslerp_identical_inputs_merge_to_themselves() -> None:
    np.testing.assert_allclose(run("nuslerp", [A, A], {}, [{"weight": 1.0}, {"weight": 2.0}]), A, **TOL)
    np.testing.assert_allclose(
        run("nuslerp", [A, A], {}, [{"weight": 1.0}, {"weight": 2.0}], base=A), A, **TOL
    )
    np.testing.assert_allclose(
        run("nuslerp", [B, B], {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 2.0}], base=A),
        B,
        **TOL,
    )


# -- multislerp -----------------------------------------------------------------------------------


def np_multislerp(
    models: list[np.ndarray],
    weights: list[float],
    base: np.ndarray | None = None,
    normalize: bool = True,
    eps: float = 1e-8,
) -> np.ndarray:
    """The tangent-space procedure: project the directions onto the tangent space at their weighted
    Euclidean mean, combine them there, map back with the exponential map, scale to the weighted
    mean norm."""
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    x = np.stack([(f64(m) - (0 if base is None else f64(base))).ravel() for m in models])
    norms = np.linalg.norm(x, axis=1)
    units = x / (norms[:, None] + eps)
    mean = (w[:, None] * units).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangents = units - (units @ mean)[:, None] * mean
    v = (w[:, None] * tangents).sum(0)
    n = np.linalg.norm(v) + eps
    on_sphere = mean * np.cos(n) + v * np.sin(n) / n
    out = (on_sphere * (w * norms).sum()).reshape(models[0].shape)
    return out if base is None else out + f64(base)


def test_multislerp_two_models_equal_weight_is_the_slerp_midpoint() -> None:
    b = B * (np.linalg.norm(A) / np.linalg.norm(B))  # same norm as A
    out = run("multislerp", [A, b], {}, [{"weight": 1.0}, {"weight": 1.0}])
    np.testing.assert_allclose(out, np_slerp(0.5, A, b), **TOL)


def test_multislerp_with_a_base_works_in_the_tangent_space_at_the_base() -> None:
    c = A + (C - A) * (np.linalg.norm(B - A) / np.linalg.norm(C - A))
    out = run("multislerp", [B, c], {}, [{"weight": 2.0}, {"weight": 2.0}], base=A)
    np.testing.assert_allclose(out, A + np_slerp(0.5, B - A, c - A), **TOL)


def test_multislerp_unequal_norms_take_the_midpoint_direction_and_the_mean_norm() -> None:
    out = run("multislerp", [angle_vector(0, 2.0), angle_vector(90, 4.0)], {}, [{"weight": 1}, {"weight": 1}])
    np.testing.assert_allclose(out, angle_vector(45, 3.0), **TOL)


def test_multislerp_unequal_weights_normalize_the_weighted_directions() -> None:
    # weights 1/4 and 3/4 of two orthogonal unit vectors: direction (1, 3) / sqrt(10), norm 1
    out = run("multislerp", [angle_vector(0), angle_vector(90)], {}, [{"weight": 1}, {"weight": 3}])
    np.testing.assert_allclose(out, np.array([1.0, 3.0]) / math.sqrt(10), **TOL)


def test_multislerp_matches_the_tangent_space_procedure() -> None:
    models, weights = [B, C, D], [0.2, 0.5, 0.3]
    out = run("multislerp", models, {}, [{"weight": w} for w in weights], base=A)
    np.testing.assert_allclose(out, np_multislerp(models, weights, base=A), **TOL)
    out = run("multislerp", models, {"eps": 0.3}, [{"weight": w} for w in weights])
    np.testing.assert_allclose(out, np_multislerp(models, weights, eps=0.3), **TOL)


def test_multislerp_without_normalize_scales_by_the_weighted_norm_sum() -> None:
    models, weights = [B, C, D], [1.0, 0.5, 1.5]
    out = run("multislerp", models, {"normalize_weights": False}, [{"weight": w} for w in weights], base=A)
    np.testing.assert_allclose(out, np_multislerp(models, weights, base=A, normalize=False), **TOL)
    e0, e1 = angle_vector(0), angle_vector(90)
    out = run("multislerp", [e0, e1], {"normalize_weights": False}, [{"weight": 1}, {"weight": 1}])
    np.testing.assert_allclose(out, angle_vector(45, 2.0), **TOL)


def test_multislerp_one_model_is_returned_as_is() -> None:
    np.testing.assert_array_equal(run("multislerp", [B], {}, [{"weight": 0.3}], base=A), B)


def test_multislerp_opposite_pair_falls_back_to_the_weighted_sum() -> None:
    v = np.array([1.0, -2.0, 2.0], dtype=np.float32)
    out = run("multislerp", [v, -v], {}, [{"weight": 1.0}, {"weight": 1.0}])
    np.testing.assert_allclose(out, np.zeros(3), atol=1e-7)


def test_multislerp_unchanged_models_give_the_base() -> None:
    out = run("multislerp", [A, A, A], {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], base=A)
    np.testing.assert_array_equal(out, A)


def test_multislerp_cancelling_directions_of_three_models_are_an_error() -> None:
    v = np.array([1.0, -2.0, 2.0], dtype=np.float32)
    w = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    with pytest.raises(MethodError, match="directions is zero"):
        run("multislerp", [v, -v, w], {}, [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}])


def test_multislerp_identical_inputs_merge_to_themselves() -> None:
    mp = [{"weight": 0.2}, {"weight": 0.8}]
    np.testing.assert_allclose(run("multislerp", [A, A], {}, mp), A, **TOL)
    np.testing.assert_allclose(run("multislerp", [B, B], {}, mp, base=A), B, **TOL)


def test_multislerp_refuses_weights_summing_to_zero_when_normalizing() -> None:
    weights = [MultiSlerpModelParams(1.0), MultiSlerpModelParams(-1.0)]
    trouble = multislerp_check(MultiSlerpParams(), weights)
    assert trouble is not None and "normalize_weights" in trouble and "sum to 0" in trouble
    assert multislerp_check(MultiSlerpParams(normalize_weights=False), weights) is None
    with pytest.raises(MethodError, match="sum to 0"):
        run("multislerp", [A, B], {}, [{"weight": 1.0}, {"weight": -1.0}])


# -- karcher --------------------------------------------------------------------------------------


def np_karcher(models: list[np.ndarray], iters: int = 500) -> np.ndarray:
    """Riemannian gradient descent to convergence in float64, scaled to the mean norm."""
    x = np.stack([f64(m).ravel() for m in models])
    norms = np.linalg.norm(x, axis=1)
    units = x / norms[:, None]
    mean = units.mean(0)
    mean /= np.linalg.norm(mean)
    for _ in range(iters):
        cos = np.clip(units @ mean, -1, 1)
        theta = np.arccos(cos)
        factor = np.where(theta > 1e-12, theta / np.sin(np.maximum(theta, 1e-12)), 1.0)
        grad = (factor[:, None] * (units - cos[:, None] * mean)).mean(0)
        step = np.linalg.norm(grad)
        if step < 1e-15:
            break
        mean = np.cos(step) * mean + np.sin(step) * grad / step
        mean /= np.linalg.norm(mean)
    return (mean * norms.mean()).reshape(models[0].shape)


def test_karcher_of_two_vectors_is_the_slerp_midpoint_direction_with_the_mean_norm() -> None:
    out = run("karcher", [A, B], {}, [{}, {}])
    direction = np_slerp(0.5, unit(A), unit(B))
    expected = direction / np.linalg.norm(direction) * (np.linalg.norm(A) + np.linalg.norm(B)) / 2
    np.testing.assert_allclose(out, expected, **TOL)
    out = run("karcher", [angle_vector(0, 2.0), angle_vector(90, 4.0)], {}, [{}, {}])
    np.testing.assert_allclose(out, angle_vector(45, 3.0), **TOL)


def test_karcher_on_a_circle_is_the_mean_angle() -> None:
    """On a circle, within a half-turn, the intrinsic mean is the arithmetic mean of the angles."""
    models = [angle_vector(0, 1.0), angle_vector(30, 2.0), angle_vector(90, 3.0)]
    out = run("karcher", models, {}, [{}, {}, {}])
    np.testing.assert_allclose(out, angle_vector(40, 2.0), **TOL)
    # max_iter 0 stops at the normalized Euclidean mean of the directions, a different point
    start = run("karcher", models, {"max_iter": 0}, [{}, {}, {}])
    chord = (angle_vector(0) + angle_vector(30) + angle_vector(90)) / 3
    np.testing.assert_allclose(start, chord / np.linalg.norm(chord) * 2.0, **TOL)


def test_karcher_matches_riemannian_gradient_descent() -> None:
    models = [A, B + 0.5 * A, C - 0.3 * B, D]
    out = run("karcher", models, {"max_iter": 100, "tol": 1e-9}, [{}] * 4)
    np.testing.assert_allclose(out, np_karcher(models), **TOL)
    # the mean is stationary: the log maps of the directions sum to zero there
    m = unit(out).ravel()
    logs = []
    for x in models:
        u = unit(x).ravel()
        theta = np.arccos(np.clip(u @ m, -1, 1))
        logs.append(theta / np.sin(theta) * (u - np.cos(theta) * m))
    assert np.linalg.norm(np.sum(logs, axis=0)) < 1e-4


def test_karcher_includes_the_base_model_as_one_more_input() -> None:
    with_base = run("karcher", [B, C], {}, [{}, {}], base=A)
    np.testing.assert_allclose(with_base, run("karcher", [B, C, A], {}, [{}] * 3), **TOL)
    tight = {"max_iter": 100, "tol": 1e-9}
    np.testing.assert_allclose(run("karcher", [B, C], tight, [{}, {}], base=A), np_karcher([A, B, C]), **TOL)


def test_karcher_zero_tensor_counts_only_in_the_norm() -> None:
    zero = np.zeros(2, dtype=np.float32)
    out = run("karcher", [angle_vector(60, 3.0), zero], {}, [{}, {}])
    np.testing.assert_allclose(out, angle_vector(60, 1.5), **TOL)
    np.testing.assert_array_equal(run("karcher", [zero, zero], {}, [{}, {}]), zero)


def test_karcher_single_and_identical_inputs_merge_to_themselves() -> None:
    np.testing.assert_array_equal(run("karcher", [A], {}, [{}]), A)
    np.testing.assert_allclose(run("karcher", [A, A, A], {}, [{}] * 3), A, **TOL)
    np.testing.assert_allclose(run("karcher", [A], {}, [{}], base=A), A, **TOL)


# -- nearswap -------------------------------------------------------------------------------------


def np_nearswap(base: np.ndarray, other: np.ndarray, t: float) -> np.ndarray:
    w = np.clip(t / np.maximum(np.abs(f64(base) - f64(other)), 1e-6), 0, 1)
    return w * f64(other) + (1 - w) * f64(base)


def test_nearswap_takes_close_entries_and_steps_t_toward_far_ones() -> None:
    base = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0], dtype=np.float32)
    other = np.array([0.05, -0.1, 0.5, -2.0, 1.0, 1.75], dtype=np.float32)
    out = run("nearswap", [other], {"t": 0.1}, [{}], base=base)
    # |diff| <= 0.1: other's value; larger: base moved by 0.1 toward other
    np.testing.assert_allclose(out, [0.05, -0.1, 0.1, -0.1, 1.0, 1.9], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[:2], other[:2])


def test_nearswap_differences_below_one_millionth_are_floored() -> None:
    base = np.zeros(2, dtype=np.float32)
    other = np.array([8e-7, -4e-7], dtype=np.float32)
    out = run("nearswap", [other], {"t": 5e-7}, [{}], base=base)
    # weight t / 1e-6 = 0.5 for both, although the second one lies within t
    np.testing.assert_allclose(out, [4e-7, -2e-7], rtol=1e-5, atol=0)


def test_nearswap_matches_the_formula_on_random_tensors() -> None:
    for t in (0.0, 0.3, 1.0, 10.0):
        out = run("nearswap", [B], {"t": t}, [{}], base=A)
        np.testing.assert_allclose(out, np_nearswap(A, B, t), **TOL)
    np.testing.assert_array_equal(run("nearswap", [B], {"t": 0.0}, [{}], base=A), A)
    np.testing.assert_array_equal(run("nearswap", [B], {"t": 100.0}, [{}], base=A), B)


def test_nearswap_identical_inputs_merge_to_themselves() -> None:
    np.testing.assert_array_equal(run("nearswap", [A], {"t": 0.01}, [{}], base=A), A)


# -- registry and config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "base", "lo", "hi"),
    [
        ("model_stock", "required", 2, None),
        ("nuslerp", "optional", 2, 2),
        ("multislerp", "optional", 1, None),
        ("karcher", "optional", 1, None),
        ("nearswap", "required", 1, 1),
    ],
)
def test_base_policy_and_model_counts(name: str, base: str, lo: int, hi: int | None) -> None:
    m = REGISTRY[name]
    assert (m.base, m.min_models, m.max_models, m.random) == (base, lo, hi, False)


def test_parameter_names_and_defaults_follow_mergekit() -> None:
    def table(name: str) -> dict[str, object]:
        m = REGISTRY[name]
        return {i.key: i.default for i in [*m.param_infos, *m.model_param_infos]}

    assert table("model_stock") == {"filter_wise": False}
    nuslerp = table("nuslerp")
    assert nuslerp["nuslerp_flatten"] is True and nuslerp["nuslerp_row_wise"] is False
    assert REGISTRY["nuslerp"].model_param_infos[0].required
    multislerp = table("multislerp")
    assert multislerp["normalize_weights"] is True and multislerp["eps"] == 1e-8
    assert table("karcher") == {"max_iter": 10, "tol": 1e-5}
    assert REGISTRY["nearswap"].param_infos[0].key == "t" and REGISTRY["nearswap"].param_infos[0].required


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


def test_bad_values_and_model_counts_are_refused_at_config_time() -> None:
    found = problems("merge_method: nearswap\nbase_model: a\nmodels:\n  - model: b\nparameters: {t: -0.1}\n")
    assert found == ["line 5: parameters.t: -0.1 is outside [0, inf)"]
    found = problems(
        "merge_method: karcher\nmodels:\n  - model: a\n  - model: b\nparameters: {max_iter: -1}\n"
    )
    assert found == ["line 5: parameters.max_iter: -1 is outside [0, inf)"]
    found = problems(
        "merge_method: multislerp\nmodels:\n  - model: a\n    parameters: {weight: 1}\nparameters: {eps: 0}\n"
    )
    assert found == ["line 5: parameters.eps: 0 is outside (0, inf)"]
    (p,) = problems(
        "merge_method: nuslerp\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters: {weight: 1}\n  - model: c\n    parameters: {weight: 1}\n"
    )
    assert "nuslerp takes exactly 2 models besides an optional base_model; found 3" in p
    (p,) = problems("merge_method: model_stock\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n")
    assert "model_stock takes a base_model and 2 or more other models; found 1" in p
    (p,) = problems("merge_method: nearswap\nmodels:\n  - model: a\n  - model: b\nparameters: {t: 0.1}\n")
    assert "nearswap needs a base_model" in p


def test_mergekit_configs_load_unchanged() -> None:
    cfg = load_config(
        "merge_method: nuslerp\nbase_model: base\nmodels:\n  - model: a\n    parameters:\n      weight: 0.6\n"
        "  - model: b\n    parameters:\n      weight: 0.4\n  - model: base\nparameters:\n"
        "  nuslerp_flatten: false\n  nuslerp_row_wise: true\ndtype: bfloat16\n"
    )
    assert cfg.method == "nuslerp"
    cfg = load_config(
        "merge_method: karcher\nmodels:\n  - model: a\n  - model: b\nparameters: {max_iter: 20, tol: 1e-6}\n"
    )
    assert cfg.method == "karcher"
    cfg = load_config(
        "merge_method: model_stock\nbase_model: a\nmodels:\n  - model: b\n  - model: c\nparameters: {filter_wise: true}\n"
    )
    assert cfg.method == "model_stock"
