"""CART against its formula, written out independently in numpy (float64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError, MethodError, load_config
from mergesmith.methods import REGISTRY, MergeInputs
from mergesmith.methods.cart import kept_rank
from tests import tiny
from tests.test_merge import states
from tests.test_methods import run

MATRIX = "model.layers.0.mlp.up_proj.weight"

rng = np.random.default_rng(11)


def normal(*shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def truncate(x: np.ndarray, r: int) -> np.ndarray:
    """The best rank-r approximation of x: its r leading singular triplets (numpy.linalg.svd)."""
    u, s, vt = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def numpy_cart(models: list[np.ndarray], rank: int, lam: float) -> np.ndarray:
    """theta_avg + lam * sum_i SVD_rank(theta_i - theta_avg), in float64."""
    x = [m.astype(np.float64) for m in models]
    avg = sum(x) / len(x)
    return avg + lam * sum(truncate(m - avg, rank) for m in x)


def average(models: list[np.ndarray]) -> np.ndarray:
    return sum(m.astype(np.float64) for m in models) / len(models)


def close(actual: np.ndarray, expected: np.ndarray, tol: float = 2e-5) -> None:
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * float(np.abs(expected).max()))


def cart(models: list[np.ndarray], params: dict[str, Any], name: str = MATRIX) -> np.ndarray:
    return run("cart", models, params, [{}] * len(models), name=name)


# -- the rank -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "ratio", "expected"),
    [
        (100, 0.08, 8),
        (64, 0.08, 5),  # 5.12 rounds down
        (32, 0.08, 2),  # 2.56 rounds down
        (10, 0.05, 1),  # 0.5 would be 0: at least one direction
        (3, 0.01, 1),
        (10, 0.99, 9),
        (10, 1.0, 10),
        (7, 0.5, 3),
    ],
)
def test_kept_rank_is_the_floor_of_the_fraction_and_at_least_one(
    rank: int, ratio: float, expected: int
) -> None:
    assert kept_rank(rank, ratio) == expected


# -- the formula ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "count", "ratio", "lam", "rank"),
    [
        ((10, 8), 3, 0.25, 1.0, 2),
        ((10, 8), 4, 0.5, 1.7, 4),
        ((6, 11), 5, 0.4, 0.6, 2),
        ((9, 9), 3, 0.08, 2.0, 1),
        ((12, 10), 6, 0.75, -0.5, 7),
    ],
)
def test_cart_matches_the_paper_formula(
    shape: tuple[int, int], count: int, ratio: float, lam: float, rank: int
) -> None:
    models = [normal(*shape) for _ in range(count)]
    out = cart(models, {"rank_ratio": ratio, "lambda": lam})
    close(out, numpy_cart(models, rank, lam), tol=1e-4)
    # and it differs from the plain average by a real amount
    assert np.abs(out - average(models)).max() > 1e-2


def test_default_parameters_keep_eight_percent_of_the_rank_at_lambda_one() -> None:
    models = [normal(40, 30) for _ in range(3)]
    close(cart(models, {}), numpy_cart(models, 2, 1.0), tol=1e-4)  # floor(0.08 * 30) = 2


def test_the_low_rank_step_is_per_model_not_on_the_sum() -> None:
    # the centered task vectors sum to zero, so truncating their sum would give the average
    models = [normal(10, 8) for _ in range(3)]
    out = cart(models, {"rank_ratio": 0.25})
    assert np.abs(out - average(models)).max() > 1e-1
    close(out, numpy_cart(models, 2, 1.0), tol=1e-4)


def test_lambda_zero_gives_the_plain_average() -> None:
    models = [normal(10, 8) for _ in range(4)]
    close(cart(models, {"lambda": 0.0, "rank_ratio": 0.3}), average(models), tol=1e-6)


@pytest.mark.parametrize("shape", [(10, 8), (5, 9)])
def test_full_rank_gives_the_plain_average(shape: tuple[int, int]) -> None:
    # SVD_r of a matrix of rank <= r is the matrix itself, and sum_i (theta_i - theta_avg) = 0
    models = [normal(*shape) for _ in range(3)]
    x = [m.astype(np.float64) for m in models]
    avg = average(models)
    assert np.abs(sum(m - avg for m in x)).max() < 1e-12
    close(numpy_cart(models, min(shape), 1.5), avg, tol=1e-6)
    close(cart(models, {"rank_ratio": 1.0, "lambda": 1.5}), avg, tol=1e-6)


def test_two_models_always_give_the_plain_average() -> None:
    # theta_1 - avg = -(theta_2 - avg): their truncations to any rank cancel
    models = [normal(10, 8), normal(10, 8)]
    for ratio in (0.125, 0.25, 0.5):
        close(numpy_cart(models, int(ratio * 8), 2.0), average(models), tol=1e-6)
        close(cart(models, {"rank_ratio": ratio, "lambda": 2.0}), average(models), tol=1e-5)


def test_one_model_gives_that_model() -> None:
    model = normal(8, 6)
    np.testing.assert_array_equal(cart([model], {"rank_ratio": 0.2, "lambda": 3.0}), model)


def test_identical_models_give_that_model() -> None:
    model = normal(8, 6)
    close(cart([model, model.copy(), model.copy()], {"rank_ratio": 0.2}), model, tol=1e-6)


def test_a_model_equal_to_the_average_adds_nothing() -> None:
    a, b = normal(10, 8), normal(10, 8)
    c = ((a.astype(np.float64) + b) / 2).astype(np.float32)  # avg of a, b, c is c
    out = cart([a, b, c], {"rank_ratio": 0.25, "lambda": 1.0})
    close(out, numpy_cart([a, b, c], 2, 1.0), tol=1e-4)


def test_orthogonal_centered_ranks_add_their_truncations() -> None:
    # three models whose offsets from their average have known singular values
    qm, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    qn, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    d1 = (qm[:, :3] * [6.0, 4.0, 1.0]) @ qn[:, :3].T
    d2 = (qm[:, 3:6] * [5.0, 3.0, 0.5]) @ qn[:, 3:6].T
    center = rng.normal(size=(12, 10))
    models = [(center + d).astype(np.float32) for d in (d1, d2, -(d1 + d2))]
    out = cart(models, {"rank_ratio": 0.2})  # 2 directions of each
    expected = center + truncate(d1, 2) + truncate(d2, 2) + truncate(-(d1 + d2), 2)
    close(out, expected, tol=1e-4)


# -- other tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("model.layers.0.input_layernorm.weight", (6,)),
        ("model.layers.0.self_attn.q_proj.bias", (6,)),
        ("model.embed_tokens.weight", (9, 4)),
        ("lm_head.weight", (9, 4)),
        ("model.layers.0.block_sparse_moe.experts", (2, 3, 4)),
    ],
)
def test_other_tensors_take_the_plain_average(name: str, shape: tuple[int, ...]) -> None:
    # their centered task vectors are kept whole, and those sum to zero
    models = [normal(*shape) for _ in range(3)]
    close(cart(models, {"lambda": 2.5, "rank_ratio": 0.3}, name=name), average(models), tol=1e-6)


def test_float64_inputs_stay_float64() -> None:
    m = REGISTRY["cart"]
    models = [rng.normal(size=(9, 7)) for _ in range(3)]
    inputs: MergeInputs[Any, Any] = MergeInputs(
        tensor_name=MATRIX,
        base=None,
        tensors=[torch.tensor(x) for x in models],
        params=m.build_params({"lambda": 1.2, "rank_ratio": 0.3}),
        model_params=[m.build_model_params({})] * 3,
    )
    out = m.merge(inputs)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), numpy_cart(models, 2, 1.2), rtol=1e-10, atol=1e-10)


def test_non_finite_model_is_a_clear_error() -> None:
    bad = normal(8, 6)
    bad[1, 2] = np.inf
    with pytest.raises(
        MethodError, match=r"up_proj\.weight: the centered task vector of model 1 .*NaN or infinite"
    ):
        cart([bad, normal(8, 6), normal(8, 6)], {"rank_ratio": 0.3})


# -- configuration --------------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


HEAD = "merge_method: cart\nmodels:\n  - model: a\n  - model: b\n  - model: c\n"


@pytest.mark.parametrize(("value", "shown"), [("0", "0"), ("0.0", "0"), ("1.5", "1.5"), ("-0.2", "-0.2")])
def test_rank_ratio_outside_its_range_is_refused(value: str, shown: str) -> None:
    found = problems(HEAD + f"parameters:\n  rank_ratio: {value}\n")
    assert found == [f"line 7: parameters.rank_ratio: {shown} is outside (0, 1]"]


def test_lambda_must_be_a_number() -> None:
    found = problems(HEAD + "parameters:\n  lambda: lots\n")
    assert len(found) == 1 and "parameters.lambda" in found[0]


def test_no_base_model_is_needed_and_no_weight_is_taken() -> None:
    m = REGISTRY["cart"]
    assert m.base == "unused" and m.min_models == 1
    assert [i.key for i in m.param_infos] == ["lambda", "rank_ratio"]
    assert m.model_param_infos == []
    cfg = load_config(HEAD + "parameters:\n  lambda: 1.5\n  rank_ratio: 0.1\n")
    assert cfg.base_model is None


# -- end to end -----------------------------------------------------------------------------------


def test_tiny_llama_merge_matches_the_formula(zoo: dict[str, Path], tmp_path: Path) -> None:
    text = "\n".join(
        [
            "merge_method: cart",
            "models:",
            *[f"  - model: {zoo[m]}" for m in "abc"],
            "parameters:",
            "  rank_ratio: 0.25",
            "  lambda: [0.0, 3.0]",  # a gradient: 0, 1.5 and 3 on the three layers
            "dtype: float32",
        ]
    )
    out = tmp_path / "out"
    mergesmith.merge(text + "\n", out)
    merged = tiny.load_state(out)
    src = states(zoo, ["a", "b", "c"])

    def models(name: str) -> list[np.ndarray]:
        return [src[m][name].numpy() for m in "abc"]

    for layer, lam in [(0, 0.0), (1, 1.5), (2, 3.0)]:
        for name, rank in [("mlp.up_proj.weight", 8), ("self_attn.q_proj.weight", 8)]:  # 64 x 32, 32 x 32
            key = f"model.layers.{layer}.{name}"
            close(merged[key].numpy(), numpy_cart(models(key), rank, lam), tol=1e-4)
    key = "model.layers.2.mlp.down_proj.weight"
    assert np.abs(merged[key].numpy() - average(models(key))).max() > 1e-3
    for key in ["model.layers.1.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight"]:
        close(merged[key].numpy(), average(models(key)), tol=1e-6)
