"""Each method against its formula, written out independently in numpy on hand-built tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mergesmith.methods import REGISTRY, MergeInputs, _steps


def run(
    method: str,
    tensors: list[np.ndarray],
    params: dict[str, Any],
    model_params: list[dict[str, Any]],
    base: np.ndarray | None = None,
    name: str = "model.layers.0.mlp.up_proj.weight",
    seed: int = 0,
) -> np.ndarray:
    m = REGISTRY[method]
    shared = {i.key: params.get(i.key, i.default) for i in m.param_infos}
    per = [{i.key: mp.get(i.key, i.default) for i in m.model_param_infos} for mp in model_params]
    inputs: MergeInputs[Any, Any] = MergeInputs(
        tensor_name=name,
        base=torch.tensor(base, dtype=torch.float32) if base is not None else None,
        tensors=[torch.tensor(t, dtype=torch.float32) for t in tensors],
        params=m.build_params(shared),
        model_params=[m.build_model_params(p) for p in per],
        seed=seed,
    )
    return m.merge(inputs).numpy()


rng = np.random.default_rng(0)
A = rng.normal(size=(8, 6)).astype(np.float32)
B = rng.normal(size=(8, 6)).astype(np.float32)
C = rng.normal(size=(8, 6)).astype(np.float32)


# -- linear ---------------------------------------------------------------------------------------


def test_linear_is_the_normalized_weighted_average() -> None:
    out = run("linear", [A, B, C], {}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}])
    expected = (0.5 * A + 0.3 * B + 0.7 * C) / 1.5
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_linear_without_normalize_is_the_weighted_sum() -> None:
    out = run("linear", [A, B], {"normalize": False}, [{"weight": 2.0}, {"weight": -1.0}])
    np.testing.assert_allclose(out, 2 * A - B, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_identical_inputs_merge_to_themselves(method: str) -> None:
    mp = [{"weight": 0.4, "density": 0.5}, {"weight": 0.6, "density": 0.5}]
    mp = [
        {k: v for k, v in p.items() if k in {i.key for i in REGISTRY[method].model_param_infos}} for p in mp
    ]
    base = A if REGISTRY[method].base == "required" else None
    out = run(method, [A, A], {}, mp, base=base)
    np.testing.assert_allclose(out, A, rtol=1e-6, atol=1e-6)


def test_slerp_of_identical_inputs_is_the_input() -> None:
    np.testing.assert_allclose(run("slerp", [A], {"t": 0.3}, [{}], base=A), A, rtol=1e-6, atol=1e-6)


# -- slerp ----------------------------------------------------------------------------------------


def numpy_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    cos = np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_the_formula(t: float) -> None:
    out = run("slerp", [B], {"t": t}, [{}], base=A)
    np.testing.assert_allclose(out, numpy_slerp(t, A, B), rtol=1e-5, atol=1e-5)


def test_slerp_endpoints_are_exact() -> None:
    np.testing.assert_array_equal(run("slerp", [B], {"t": 0.0}, [{}], base=A), A)
    np.testing.assert_allclose(run("slerp", [B], {"t": 1.0}, [{}], base=A), B, rtol=1e-6, atol=1e-6)


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle() -> None:
    e0 = np.array([1.0, 0.0], dtype=np.float32)
    e1 = np.array([0.0, 1.0], dtype=np.float32)
    out = run("slerp", [e1], {"t": 0.5}, [{}], base=e0)
    np.testing.assert_allclose(out, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def test_slerp_falls_back_to_lerp_when_colinear() -> None:
    out = run("slerp", [2 * A], {"t": 0.25}, [{}], base=A)
    np.testing.assert_allclose(out, 0.75 * A + 0.25 * 2 * A, rtol=1e-6, atol=1e-6)


# -- task arithmetic --------------------------------------------------------------------------------


def test_task_arithmetic_formula_with_negative_weight_and_lambda() -> None:
    out = run("task_arithmetic", [B, C], {"lambda": 0.8}, [{"weight": 0.7}, {"weight": -0.4}], base=A)
    expected = A + 0.8 * (0.7 * (B - A) - 0.4 * (C - A))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_at_weight_zero_is_the_base() -> None:
    out = run("task_arithmetic", [B, C], {}, [{"weight": 0.0}, {"weight": 0.0}], base=A)
    np.testing.assert_array_equal(out, A)


def test_task_arithmetic_normalize_divides_by_the_weight_sum() -> None:
    out = run("task_arithmetic", [B, C], {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}], base=A)
    np.testing.assert_allclose(out, A + ((B - A) + 3 * (C - A)) / 4, rtol=1e-5, atol=1e-6)


# -- TIES -----------------------------------------------------------------------------------------


def numpy_ties(
    base: np.ndarray,
    models: list[np.ndarray],
    weights: list[float],
    densities: list[float],
    normalize: bool = True,
    lam: float = 1.0,
) -> np.ndarray:
    deltas = []
    for m, d in zip(models, densities):
        delta = (m - base).astype(np.float64).ravel()
        k = max(1, int(d * delta.size))
        keep = np.zeros(delta.size, dtype=bool)
        keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
        deltas.append(np.where(keep, delta, 0.0))
    weighted = [w * d for w, d in zip(weights, deltas)]
    elected = np.where(np.sum(weighted, axis=0) >= 0, 1.0, -1.0)
    total = np.zeros_like(weighted[0])
    divisor = np.zeros_like(weighted[0])
    for w, d in zip(weights, weighted):
        agree = np.sign(d) == elected
        total += np.where(agree, d, 0.0)
        divisor += np.where(agree, w, 0.0)
    divisor[divisor == 0] = 1
    merged = total / divisor if normalize else total
    return (base.astype(np.float64).ravel() + lam * merged).reshape(base.shape)


def test_ties_keeps_the_majority_sign_on_a_hand_built_conflict() -> None:
    base = np.zeros(4, dtype=np.float32)
    m1 = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    m2 = np.array([2.0, 1.0, -0.5, -1.0], dtype=np.float32)
    m3 = np.array([-0.5, 1.5, -1.0, -1.0], dtype=np.float32)
    out = run("ties", [m1, m2, m3], {}, [{"weight": 1.0}] * 3, base=base)
    # entry 0: sum +2.5 -> positive, mean of 1 and 2; entry 1: sum +0.5 -> positive, mean of 1 and 1.5;
    # entry 2: sum -1.0 -> negative, mean of -0.5 and -1; entry 3: sum +1 -> positive: only 3.
    np.testing.assert_allclose(out, [1.5, 1.25, -0.75, 3.0], rtol=1e-6)


def test_ties_matches_numpy_with_trimming_and_weights() -> None:
    out = run("ties", [B, C], {}, [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.6}], base=A)
    expected = numpy_ties(A, [B, C], [0.7, 0.5], [0.3, 0.6])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_ties_without_normalize_and_with_lambda() -> None:
    out = run(
        "ties",
        [B, C],
        {"normalize": False, "lambda": 0.5},
        [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
        base=A,
    )
    expected = numpy_ties(A, [B, C], [1.0, 1.0], [0.5, 0.5], normalize=False, lam=0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_trim_keeps_exactly_k_even_with_ties() -> None:
    delta = torch.tensor([1.0, -1.0, 1.0, 0.5, -3.0, 1.0])
    _steps.trim_to_top(delta, 0.5)
    assert delta.tolist() == [1.0, -1.0, 0.0, 0.0, -3.0, 0.0]


def test_trim_matches_numpy_top_k_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_steps, "_CHUNK", 1000)
    rng = np.random.default_rng(3)
    values = rng.integers(-20, 21, size=4321).astype(np.float32) / 4  # many ties at every magnitude
    for density in (0.01, 0.37, 0.5, 0.99):
        k = max(1, int(density * values.size))
        order = np.lexsort((np.arange(values.size), -np.abs(values)))  # by magnitude, ties by index
        expected = np.zeros_like(values)
        expected[order[:k]] = values[order[:k]]
        out = _steps.trim_to_top(torch.tensor(values), density).numpy()
        np.testing.assert_array_equal(out, expected)
        l1 = _steps.trim_to_top(torch.tensor(values), density, "l1").numpy()
        np.testing.assert_allclose(l1, expected * np.abs(values).sum() / np.abs(expected).sum(), rtol=1e-5)


def test_trim_with_kept_sorted_magnitudes_equals_the_selection() -> None:
    rng = np.random.default_rng(4)
    values = torch.tensor(rng.integers(-20, 21, size=4321).astype(np.float32) / 4)  # many ties
    store: dict[str, object] = {}
    for density in (0.5, 0.01, 0.37, 0.99, 0.5):
        want = _steps.trim_to_top(values.clone(), density)
        got = _steps.trim_to_top(values.clone(), density, reuse=store)
        assert torch.equal(got, want), density
        if density == 0.5 and "first" not in store:
            store["first"] = store["sorted_magnitudes"]
    assert store["sorted_magnitudes"] is store["first"]  # sorted once
    sorted_ = store["sorted_magnitudes"]
    assert isinstance(sorted_, torch.Tensor)
    assert torch.equal(sorted_, values.abs().sort().values)


# -- DARE -----------------------------------------------------------------------------------------


def test_dare_with_density_one_is_task_arithmetic() -> None:
    for method in ("dare_linear", "dare_ties"):
        out = run(
            method, [B, C], {}, [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}], base=A
        )
        if method == "dare_linear":
            expected = A + 0.6 * (B - A) + 0.4 * (C - A)
        else:
            expected = numpy_ties(A, [B, C], [0.6, 0.4], [1.0, 1.0], normalize=False)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


BIG_BASE = np.zeros((200, 100), dtype=np.float32)
BIG_DELTA = np.random.default_rng(1).normal(size=(200, 100)).astype(np.float32)


def test_dare_paper_mode_divides_survivors_by_density_and_keeps_the_mean() -> None:
    out = run("dare_linear", [BIG_DELTA], {"mode": "paper"}, [{"weight": 1.0, "density": 0.3}], base=BIG_BASE)
    kept = out != 0
    np.testing.assert_allclose(out[kept], BIG_DELTA[kept] / 0.3, rtol=1e-6)
    assert abs(kept.mean() - 0.3) < 0.01
    # In expectation the sparse task vector equals the dense one: average over many seeds.
    mean = np.mean(
        [
            run(
                "dare_linear",
                [BIG_DELTA[:20, :20]],
                {"mode": "paper"},
                [{"weight": 1.0, "density": 0.5}],
                base=BIG_BASE[:20, :20],
                seed=s,
            )
            for s in range(400)
        ],
        axis=0,
    )
    assert np.abs(mean - BIG_DELTA[:20, :20]).mean() < 0.06


def test_dare_mergekit_mode_keeps_the_l1_norm() -> None:
    out = run("dare_linear", [BIG_DELTA], {}, [{"weight": 1.0, "density": 0.4}], base=BIG_BASE)
    kept = out != 0
    assert abs(kept.mean() - 0.4) < 0.01
    np.testing.assert_allclose(np.abs(out).sum(), np.abs(BIG_DELTA).sum(), rtol=1e-5)
    scale = np.abs(BIG_DELTA).sum() / np.abs(BIG_DELTA[kept]).sum()
    np.testing.assert_allclose(out[kept], BIG_DELTA[kept] * scale, rtol=1e-5)


def test_dare_without_rescale_only_drops() -> None:
    out = run(
        "dare_linear", [BIG_DELTA], {"rescale": False}, [{"weight": 1.0, "density": 0.5}], base=BIG_BASE
    )
    kept = out != 0
    np.testing.assert_array_equal(out[kept], BIG_DELTA[kept])


def test_dare_mask_depends_on_seed_and_tensor_name_only() -> None:
    args: tuple[Any, ...] = ([BIG_DELTA], {}, [{"weight": 1.0, "density": 0.5}])
    one = run("dare_linear", *args, base=BIG_BASE, name="x", seed=7)
    torch.set_num_threads(1)
    try:
        again = run("dare_linear", *args, base=BIG_BASE, name="x", seed=7)
    finally:
        torch.set_num_threads(2)
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, run("dare_linear", *args, base=BIG_BASE, name="y", seed=7))
    assert not np.array_equal(one, run("dare_linear", *args, base=BIG_BASE, name="x", seed=8))


def test_random_mask_is_the_same_whatever_the_chunking() -> None:
    gen = torch.Generator().manual_seed(3)
    whole = torch.rand(5_000_000, generator=gen) < 0.5
    chunked = _steps.random_mask(
        torch.Size([5_000_000]), 0.5, torch.Generator().manual_seed(3), torch.device("cpu")
    )
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trim_keeps_values_one_ulp_apart_correctly(dtype: torch.dtype) -> None:
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    t = np_dtype(0.3)
    below = np.nextafter(t, np_dtype(0))
    values = np.array([below, -t, t, below, 0.1, -below], dtype=np_dtype)
    out = _steps.trim_to_top(torch.tensor(values, dtype=dtype), 0.34).numpy()  # k = 2: the two at |t|
    np.testing.assert_array_equal(out, np.array([0, -t, t, 0, 0, 0], dtype=np_dtype))
    out = _steps.trim_to_top(torch.tensor(values, dtype=dtype), 0.5).numpy()  # k = 3: first of the ties below
    np.testing.assert_array_equal(out, np.array([below, -t, t, 0, 0, 0], dtype=np_dtype))


def test_steps_work_in_place_on_non_contiguous_tensors() -> None:
    values = torch.tensor([[0.5, -0.2, 0.9], [0.3, -0.7, 0.1]])
    delta = values.T.clone()  # column-major strides, as SVD factors come
    assert not delta.is_contiguous()
    _steps.trim_to_top(delta, 0.5)
    expected = values.T.clone().contiguous()
    _steps.trim_to_top(expected, 0.5)
    assert torch.equal(delta, expected) and int(torch.count_nonzero(delta)) == 3
    base = torch.zeros(3, 2).T.clone()
    assert not base.is_contiguous()
    out = _steps.combine(base, [values.clone()], [1.0], consensus="sum", normalize=True, lambda_=2.0)
    assert out is base and torch.equal(base, 2 * values)
