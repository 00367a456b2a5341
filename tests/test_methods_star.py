"""STAR against its formula, written out independently in numpy (float64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError, MethodError, load_config
from mergesmith.methods import REGISTRY, MergeInputs
from mergesmith.methods.star import kept_rank
from tests import tiny
from tests.test_merge import states
from tests.test_methods import run

MATRIX = "model.layers.0.mlp.up_proj.weight"

rng = np.random.default_rng(11)


def normal(*shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def orthonormal(n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q


def with_spectrum(m: int, n: int, values: list[float]) -> np.ndarray:
    """An m x n matrix with the given singular values and random singular vectors (float64)."""
    k = len(values)
    return (orthonormal(m)[:, :k] * np.asarray(values)) @ orthonormal(n)[:, :k].T


def singular_values(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False))


def numpy_rank(s: np.ndarray, eta: float) -> int:
    """The smallest r >= 1 with s_1 + ... + s_r >= eta * (s_1 + ... + s_q)."""
    target = eta * s.sum()
    for r in range(1, len(s) + 1):
        if s[:r].sum() >= target:
            return r
    return len(s)


def numpy_star_matrix(delta: np.ndarray, eta: float) -> np.ndarray:
    """The task matrix truncated to its eta share of nuclear norm, then rescaled to the whole norm."""
    u, s, vt = np.linalg.svd(np.asarray(delta, dtype=np.float64), full_matrices=False)
    if s.sum() == 0:
        return np.zeros(delta.shape)
    r = numpy_rank(s, eta)
    kept = s[:r] * (s.sum() / s[:r].sum())
    return np.asarray((u[:, :r] * kept) @ vt[:r])


def numpy_star(
    base: np.ndarray, models: list[np.ndarray], weights: list[float], eta: float, alpha: float
) -> np.ndarray:
    base64 = base.astype(np.float64)
    tau = sum(w * numpy_star_matrix(m.astype(np.float64) - base64, eta) for m, w in zip(models, weights))
    return np.asarray(base64 + alpha * tau / len(models))


def close(actual: np.ndarray, expected: np.ndarray, tol: float = 2e-5) -> None:
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * float(np.abs(expected).max()))


# -- the rank ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eta", "expected"),
    [
        (0.0, 1),
        (0.3, 1),
        (0.4, 1),  # 4 >= 0.4 * 10: the boundary itself is reached by 1 direction
        (0.41, 2),
        (0.7, 2),  # 4 + 3 = 7 = 0.7 * 10 exactly
        (0.7000001, 3),
        (0.9, 3),
        (0.9000001, 4),
        (1.0, 4),
    ],
)
def test_kept_rank_is_the_fewest_directions_reaching_eta_of_the_nuclear_norm(
    eta: float, expected: int
) -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert kept_rank(s, eta) == expected == numpy_rank(s.numpy().astype(np.float64), eta)


def test_kept_rank_with_zero_singular_values_and_a_single_one() -> None:
    assert kept_rank(torch.tensor([3.0, 1.0, 0.0, 0.0]), 1.0) == 2  # zero directions are never needed
    assert kept_rank(torch.tensor([3.0, 1.0, 0.0, 0.0]), 0.75) == 1
    assert kept_rank(torch.tensor([5.0]), 0.5) == 1
    assert kept_rank(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64), 0.5) == 2  # ties count in order


@pytest.mark.parametrize(("eta", "rank"), [(0.6999, 2), (0.7001, 3), (0.39, 1), (0.41, 2), (0.95, 4)])
def test_one_model_keeps_the_chosen_directions_rescaled_to_its_nuclear_norm(eta: float, rank: int) -> None:
    spectrum = [4.0, 3.0, 2.0, 1.0]
    delta = with_spectrum(9, 7, spectrum)
    base = normal(9, 7)
    out = run("star", [(base + delta).astype(np.float32)], {"eta": eta}, [{}], base=base)
    merged = out.astype(np.float64) - base
    expected = np.zeros(7)
    expected[:rank] = np.asarray(spectrum[:rank]) * 10.0 / sum(spectrum[:rank])
    np.testing.assert_allclose(singular_values(merged), expected, rtol=1e-4, atol=1e-4)
    close(out, numpy_star(base, [base + delta], [1.0], eta, 1.0), tol=1e-4)


# -- the rescale ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.4, 0.8, 1.0])
@pytest.mark.parametrize("shape", [(12, 10), (6, 11)])
def test_the_rescale_keeps_each_task_matrix_nuclear_norm(eta: float, shape: tuple[int, int]) -> None:
    base, model = normal(*shape), normal(*shape)
    delta = model.astype(np.float64) - base
    s = singular_values(delta)
    merged = run("star", [model], {"eta": eta}, [{}], base=base).astype(np.float64) - base
    kept = singular_values(merged)
    r = numpy_rank(s, eta)
    assert np.sum(kept > 1e-4 * s[0]) == r
    assert kept.sum() == pytest.approx(s.sum(), rel=1e-5)  # the nuclear norm is unchanged
    np.testing.assert_allclose(kept[:r], s[:r] * s.sum() / s[:r].sum(), rtol=1e-4)
    if r < len(s):  # the Frobenius norm is not: the same total on fewer directions is larger
        assert np.linalg.norm(merged) > np.linalg.norm(delta) * (1 + 1e-4)


def test_eta_one_gives_each_task_vector_back() -> None:
    base, model = normal(8, 6), normal(8, 6)
    close(run("star", [model], {"eta": 1.0, "alpha": 0.7}, [{}], base=base), base + 0.7 * (model - base))


# -- several models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "eta", "alpha"),
    [((10, 8), 0.4, 1.0), ((10, 8), 0.1, 0.8), ((6, 11), 0.6, 1.3), ((7, 7), 0.9, 1.0), ((9, 5), 0.0, 1.0)],
)
def test_several_models_match_the_formula(shape: tuple[int, int], eta: float, alpha: float) -> None:
    base = normal(*shape)
    models = [base + normal(*shape) for _ in range(3)]
    weights = [1.0, 0.5, -0.7]
    out = run("star", models, {"eta": eta, "alpha": alpha}, [{"weight": w} for w in weights], base=base)
    close(out, numpy_star(base, models, weights, eta, alpha), tol=1e-4)


def test_models_of_different_spectra_keep_different_ranks() -> None:
    # eta = 0.5: the steep spectrum keeps 1 direction (10 of 15), the flat one 3 of 6 (3.3 of 5.7)
    base = normal(10, 8)
    steep = with_spectrum(10, 8, [10.0, 2.0, 1.0, 0.9, 0.6, 0.5])
    flat = with_spectrum(10, 8, [1.2, 1.1, 1.0, 0.9, 0.8, 0.7])
    models = [(base + steep).astype(np.float32), (base + flat).astype(np.float32)]
    out = run("star", models, {"eta": 0.5}, [{}, {}], base=base)
    u, _, vt = np.linalg.svd(steep)
    expected_steep = 15.0 * np.outer(u[:, 0], vt[0])
    uf, sf, vft = np.linalg.svd(flat)
    expected_flat = 5.7 / 3.3 * (uf[:, :3] * sf[:3]) @ vft[:3]
    close(out, base + (expected_steep + expected_flat) / 2, tol=1e-4)
    close(out, numpy_star(base, models, [1.0, 1.0], 0.5, 1.0), tol=1e-4)


def test_weights_scale_the_cleaned_task_matrices_in_the_mean() -> None:
    base = normal(8, 6)
    models = [base + normal(8, 6) for _ in range(2)]
    one = run("star", models, {"eta": 0.3}, [{"weight": 1.0}, {"weight": 0.0}], base=base)
    close(one, base + numpy_star_matrix(models[0].astype(np.float64) - base, 0.3) / 2)
    neg = run("star", models[:1], {"eta": 0.3}, [{"weight": -2.0}], base=base)
    close(neg, base - 2 * numpy_star_matrix(models[0].astype(np.float64) - base, 0.3))


# -- edge cases ----------------------------------------------------------------------------------


def test_a_model_that_left_the_matrix_unchanged_contributes_nothing_but_counts() -> None:
    base, model = normal(10, 8), normal(10, 8)
    out = run("star", [model, base], {"eta": 0.4}, [{}, {}], base=base)
    expected = base + numpy_star_matrix(model.astype(np.float64) - base, 0.4) / 2
    close(out, expected)
    assert np.all(np.isfinite(out))


def test_models_equal_to_the_base_merge_to_the_base() -> None:
    base = normal(8, 6)
    np.testing.assert_array_equal(run("star", [base, base, base], {}, [{}] * 3, base=base), base)


def test_zero_weights_and_zero_alpha_give_the_base() -> None:
    base = normal(8, 6)
    models = [normal(8, 6), normal(8, 6)]
    np.testing.assert_array_equal(run("star", models, {}, [{"weight": 0.0}] * 2, base=base), base)
    np.testing.assert_array_equal(run("star", models, {"alpha": 0.0}, [{}] * 2, base=base), base)


@pytest.mark.parametrize("eta", [0.4, 1.0])
def test_one_model(eta: float) -> None:
    base, model = normal(12, 9), normal(12, 9)
    out = run("star", [model], {"eta": eta, "alpha": 1.2}, [{"weight": 0.5}], base=base)
    close(out, numpy_star(base, [model], [0.5], eta, 1.2))


def test_single_row_and_single_column_matrices_are_kept_whole() -> None:
    # rank 1: the one direction is the whole spectrum at every eta
    for shape in [(1, 7), (7, 1)]:
        base, model = normal(*shape), normal(*shape)
        close(run("star", [model], {"eta": 0.1}, [{}], base=base), model.astype(np.float64))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("model.layers.0.input_layernorm.weight", (6,)),
        ("model.layers.0.self_attn.q_proj.bias", (6,)),
        ("model.norm.weight", (6,)),
        ("model.embed_tokens.weight", (9, 4)),
        ("lm_head.weight", (9, 4)),
        ("transformer.wte.weight", (9, 4)),
        ("model.layers.0.block_sparse_moe.experts", (2, 3, 4)),
    ],
)
def test_other_tensors_add_the_mean_of_the_weighted_task_vectors(name: str, shape: tuple[int, ...]) -> None:
    base, b, c = normal(*shape), normal(*shape), normal(*shape)
    out = run(
        "star", [b, c], {"alpha": 0.8, "eta": 0.1}, [{"weight": 1.0}, {"weight": 0.5}], base=base, name=name
    )
    close(out, base + 0.8 * ((b - base) + 0.5 * (c - base)) / 2, tol=1e-6)


def test_float64_inputs_stay_float64() -> None:
    m = REGISTRY["star"]
    base = rng.normal(size=(9, 7))
    models = [base + rng.normal(size=(9, 7)) for _ in range(3)]
    inputs: MergeInputs[Any, Any] = MergeInputs(
        tensor_name=MATRIX,
        base=torch.tensor(base),
        tensors=[torch.tensor(x) for x in models],
        params=m.build_params({"alpha": 0.9, "eta": 0.5}),
        model_params=[m.build_model_params({"weight": w}) for w in (1.0, 0.4, 1.5)],
    )
    out = m.merge(inputs)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(
        out.numpy(), numpy_star(base, models, [1.0, 0.4, 1.5], 0.5, 0.9), rtol=1e-10, atol=1e-10
    )


def test_non_finite_task_matrix_is_a_clear_error() -> None:
    base, bad = normal(8, 6), normal(8, 6)
    bad[2, 3] = np.inf
    with pytest.raises(
        MethodError, match=r"up_proj\.weight: the task vector of model 2 holds NaN or infinite"
    ):
        run("star", [normal(8, 6), bad], {}, [{}, {}], base=base)


# -- parameters ----------------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


HEAD = "merge_method: star\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("40", "40 is outside [0, 1]"),
        ("1.5", "1.5 is outside [0, 1]"),
        ("-0.1", "-0.1 is outside [0, 1]"),
        ("high", "expected a number, found 'high'"),
        ("[0.2, 1.2]", "[1]: 1.2 is outside [0, 1]"),
    ],
)
def test_eta_outside_its_bounds_is_refused_at_config_time(value: str, message: str) -> None:
    found = problems(HEAD + f"parameters:\n  eta: {value}\n")
    sep = "" if message.startswith("[") else ": "
    assert found == [f"line 7: parameters.eta{sep}{message}"]


def test_weight_and_alpha_must_be_numbers() -> None:
    found = problems(
        "merge_method: star\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: x}\n"
        "parameters:\n  alpha: .nan\n"
    )
    assert found == [
        "line 5: models[0].parameters.weight: expected a number, found 'x'",
        "line 7: parameters.alpha: expected a finite number, found nan",
    ]


def test_defaults_are_the_paper_setting_and_a_base_model_is_required() -> None:
    m = REGISTRY["star"]
    assert {i.key: i.default for i in m.param_infos} == {"alpha": 1.0, "eta": 0.4}
    assert {i.key: i.default for i in m.model_param_infos} == {"weight": 1.0}
    assert m.base == "required"
    found = problems("merge_method: star\nmodels:\n  - model: b\n  - model: c\n")
    assert len(found) == 1 and "base_model" in found[0]


# -- end to end ----------------------------------------------------------------------------------


def test_tiny_llama_merge_matches_the_formula(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = "\n".join(
        [
            "merge_method: star",
            f"base_model: {zoo['base']}",
            "models:",
            f"  - model: {zoo['a']}",
            "    parameters: {weight: 1.0}",
            f"  - model: {zoo['b']}",
            "    parameters: {weight: 0.6}",
            f"  - model: {zoo['c']}",
            "    parameters: {weight: 1.4}",
            "parameters:",
            "  eta: [0.2, 0.9]",  # a gradient: layers 0, 1, 2 at 0.2, 0.55, 0.9; other tensors 0.2
            "  alpha: 1.1",
            "dtype: float32",
        ]
    )
    out = tmp_path / "out"
    mergesmith.merge(config + "\n", out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a", "b", "c"])
    weights = [1.0, 0.6, 1.4]
    assert merged.keys() == src["base"].keys()

    def inputs(name: str) -> tuple[np.ndarray, list[np.ndarray]]:
        return src["base"][name].numpy(), [src[m][name].numpy() for m in "abc"]

    for layer, eta in [(0, 0.2), (1, 0.55), (2, 0.9)]:
        for part in ["mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj"]:
            name = f"model.layers.{layer}.{part}.weight"
            base, models = inputs(name)
            assert merged[name].dtype == torch.float32
            close(merged[name].numpy(), numpy_star(base, models, weights, eta, 1.1), tol=1e-4)
    # the gradient changes the rank: fewer directions survive in layer 0 than in layer 2
    ranks = []
    for layer, eta in [(0, 0.2), (2, 0.9)]:
        base, models = inputs(f"model.layers.{layer}.mlp.up_proj.weight")
        ranks.append(numpy_rank(singular_values(models[0].astype(np.float64) - base), eta))
    assert ranks[0] < ranks[1] < 32
    for name in [
        "model.layers.1.input_layernorm.weight",
        "model.norm.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ]:
        base, models = inputs(name)
        mean = sum(w * (m.astype(np.float64) - base) for m, w in zip(models, weights)) / 3
        close(merged[name].numpy(), base + 1.1 * mean, tol=1e-5)
