"""TSV-M, Iso-C and Iso-CTS against their formulas, written out independently in numpy (float64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError, MethodError, load_config
from mergesmith.methods import REGISTRY, MergeInputs
from mergesmith.methods.iso import split_rank
from tests import tiny
from tests.test_merge import config_for, states
from tests.test_methods import run

SUBSPACE = ["tsv", "iso_c", "iso_cts"]
MATRIX = "model.layers.0.mlp.up_proj.weight"

rng = np.random.default_rng(7)


def normal(*shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def orthonormal(n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q


def svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    return u, s, vt


def truncate(x: np.ndarray, r: int) -> np.ndarray:
    """The best rank-r approximation of x (Eckart-Young): its r leading singular triplets."""
    u, s, vt = svd(x)
    return (u[:, :r] * s[:r]) @ vt[:r]


def polar(x: np.ndarray) -> np.ndarray:
    """U V^T from the reduced SVD x = U S V^T."""
    u, _, vt = svd(x)
    return u @ vt


def numpy_tsv(
    base: np.ndarray, models: list[np.ndarray], weights: list[float], per_task: int, alpha: float
) -> np.ndarray:
    """TSV-M as in the paper: stack each task's top singular triplets, orthonormalise U and V."""
    us, ss, vts = [], [], []
    for m, w in zip(models, weights):
        u, s, vt = svd(m.astype(np.float64) - base)
        us.append(u[:, :per_task])
        ss.append(w * s[:per_task])
        vts.append(vt[:per_task])
    u_hat, s_hat, vt_hat = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vts, axis=0)
    return base + alpha * (polar(u_hat) * s_hat) @ polar(vt_hat.T).T


def numpy_iso_c(base: np.ndarray, models: list[np.ndarray], weights: list[float], alpha: float) -> np.ndarray:
    total = sum(w * (m.astype(np.float64) - base) for m, w in zip(models, weights))
    u, s, vt = svd(total)
    return base + alpha * s.mean() * (u @ vt)


def numpy_iso_cts(
    base: np.ndarray, models: list[np.ndarray], weights: list[float], fraction: float, alpha: float
) -> np.ndarray:
    """Iso-CTS as in the paper's code, with models whose task matrix is zero giving no directions."""
    deltas = [w * (m.astype(np.float64) - base) for m, w in zip(models, weights)]
    r, t = min(base.shape), len(models)
    common = int(r * fraction)
    per_task = int(np.round((r - common) / t))  # numpy rounds half to even, as Python's round does
    per_task = min(per_task, r // t)
    common = r - t * per_task
    u, s, vt = svd(sum(deltas))
    us, ss, vts = [u[:, :common]], [s[:common]], [vt[:common]]
    for d in deltas:
        if per_task == 0 or not np.any(d):
            continue
        residual = d - u[:, :common] @ (u[:, :common].T @ d)
        ru, rs, rvt = svd(residual)
        us.append(ru[:, :per_task])
        ss.append(rs[:per_task])
        vts.append(rvt[:per_task])
    u_hat, s_hat, vt_hat = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vts, axis=0)
    return base + alpha * s_hat.mean() * (polar(u_hat) @ polar(vt_hat.T).T)


def close(actual: np.ndarray, expected: np.ndarray, tol: float = 2e-5) -> None:
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * float(np.abs(expected).max()))


# -- TSV-M ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"k": 1.0}, {"k": 1.0, "alpha": 0.7}])
def test_tsv_one_model_keeping_every_direction_adds_its_task_vector(params: dict[str, Any]) -> None:
    base, model = normal(8, 6), normal(8, 6)
    out = run("tsv", [model], params, [{}], base=base)
    close(out, base + params.get("alpha", 1.0) * (model - base))


@pytest.mark.parametrize(("shape", "rank"), [((8, 6), 1), ((8, 6), 2), ((8, 6), 4), ((5, 9), 3)])
def test_tsv_one_model_keeps_its_best_rank_r_approximation(shape: tuple[int, int], rank: int) -> None:
    base, model = normal(*shape), normal(*shape)
    out = run("tsv", [model], {"k": rank / min(shape), "alpha": 1.3}, [{}], base=base)
    delta = model.astype(np.float64) - base
    close(out, base + 1.3 * truncate(delta, rank))
    # and it is the best one: the error is the norm of the dropped singular values
    _, s, _ = svd(delta)
    assert np.linalg.norm((out - base) / 1.3 - delta) == pytest.approx(np.linalg.norm(s[rank:]), rel=1e-4)


def test_tsv_tasks_with_orthogonal_row_and_column_spaces_add_their_truncations() -> None:
    # two rank-5 task matrices on orthogonal column and row spaces; k = 0.3 keeps 3 directions of each
    qm, qn = orthonormal(12), orthonormal(10)
    d1 = (qm[:, :5] * [9.0, 7.0, 5.0, 3.0, 1.0]) @ qn[:, :5].T
    d2 = (qm[:, 5:10] * [8.0, 6.0, 4.0, 2.0, 0.5]) @ qn[:, 5:10].T
    base = normal(12, 10)
    out = run("tsv", [base + d1, base + d2], {"k": 0.3}, [{}, {}], base=base)
    close(out, base + truncate(d1, 3) + truncate(d2, 3))


def test_tsv_orthogonal_tasks_at_the_default_k_when_one_has_lower_rank_than_its_share() -> None:
    # rank 16 / 2 models = 8 directions each: d1 (rank 9) loses one, d2 (rank 5) keeps all it has
    qm, qn = orthonormal(18), orthonormal(16)
    d1 = (qm[:, :9] * np.arange(9, 0, -1.0)) @ qn[:, :9].T
    d2 = (qm[:, 9:14] * [4.0, 3.5, 3.0, 2.5, 2.0]) @ qn[:, 9:14].T
    base = normal(18, 16)
    out = run("tsv", [base + d1, base + d2], {}, [{}, {}], base=base)
    close(out, base + truncate(d1, 8) + d2)


@pytest.mark.parametrize(
    ("shape", "k", "per_task"),
    [((10, 8), 0.0, 2), ((10, 8), 0.5, 4), ((6, 10), 0.0, 2), ((10, 8), 1.0, 8), ((7, 7), 0.3, 2)],
)
def test_tsv_matches_the_paper_formula(shape: tuple[int, int], k: float, per_task: int) -> None:
    base = normal(*shape)
    models = [base + normal(*shape) for _ in range(3)]
    weights = [1.0, 0.5, -0.7]
    out = run("tsv", models, {"k": k, "alpha": 0.9}, [{"weight": w} for w in weights], base=base)
    close(out, numpy_tsv(base, models, weights, per_task, 0.9), tol=1e-4)


def test_tsv_keeps_at_least_one_direction_when_models_outnumber_the_rank() -> None:
    base = normal(3, 2)
    models = [base + normal(3, 2) for _ in range(3)]
    out = run("tsv", models, {}, [{}, {}, {}], base=base)
    close(out, numpy_tsv(base, models, [1.0] * 3, 1, 1.0), tol=1e-4)


def test_tsv_model_that_left_the_matrix_unchanged_contributes_nothing() -> None:
    base, model = normal(10, 8), normal(10, 8)
    expected = base + truncate(model.astype(np.float64) - base, 4)
    close(run("tsv", [model, base], {}, [{}, {}], base=base), expected)
    close(run("tsv", [model, normal(10, 8)], {}, [{}, {"weight": 0.0}], base=base), expected)


def test_tsv_negative_weight_subtracts() -> None:
    base, model = normal(8, 6), normal(8, 6)
    close(run("tsv", [model], {"alpha": 0.5}, [{"weight": -2.0}], base=base), base - (model - base))


# -- Iso-C ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(10, 7), (6, 9), (8, 8)])
def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrix(shape: tuple[int, int]) -> None:
    base = normal(*shape)
    models = [base + normal(*shape) for _ in range(3)]
    weights = [1.0, 0.6, -0.4]
    out = run("iso_c", models, {"alpha": 1.5}, [{"weight": w} for w in weights], base=base)
    merged = (out.astype(np.float64) - base) / 1.5
    total = sum(w * (m.astype(np.float64) - base) for m, w in zip(models, weights))
    u, s, vt = svd(total)
    # every singular value of the merged task matrix is the mean of the summed matrix's ...
    np.testing.assert_allclose(svd(merged)[1], np.full(min(shape), s.mean()), rtol=1e-4)
    # ... and its singular vectors are the summed matrix's (U V^T does not depend on their signs)
    close(merged, s.mean() * (u @ vt))
    close(out, numpy_iso_c(base, models, weights, 1.5))


def test_iso_c_of_one_model_keeps_its_singular_vectors() -> None:
    base, model = normal(9, 5), normal(9, 5)
    delta = model.astype(np.float64) - base
    u, s, vt = svd(delta)
    close(run("iso_c", [model], {}, [{}], base=base), base + s.mean() * (u @ vt))


# -- Iso-CTS --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "models", "fraction", "expected"),
    [
        (10, 3, 0.8, (7, 1)),
        (32, 4, 0.8, (24, 2)),
        (10, 4, 0.8, (10, 0)),
        (7, 2, 0.0, (1, 3)),
        (12, 3, 1.0, (12, 0)),
    ],
)
def test_iso_cts_splits_the_rank_as_the_paper_rounds_it(
    rank: int, models: int, fraction: float, expected: tuple[int, int]
) -> None:
    # (10, 4): 2 / 4 = 0.5 rounds to 0 (half to even); (7, 2, 0.0): round(3.5) = 4 is capped at 7 // 2
    assert split_rank(rank, models, fraction) == expected


@pytest.mark.parametrize("shape", [(12, 10), (7, 11)])
def test_iso_cts_with_the_whole_rank_common_is_iso_c(shape: tuple[int, int]) -> None:
    base = normal(*shape)
    models = [base + normal(*shape) for _ in range(3)]
    mp = [{"weight": 1.0}, {"weight": 0.8}, {"weight": 1.2}]
    cts = run("iso_cts", models, {"common_space_fraction": 1.0, "alpha": 0.6}, mp, base=base)
    close(cts, run("iso_c", models, {"alpha": 0.6}, mp, base=base))


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2, 0.0])
@pytest.mark.parametrize("shape", [(12, 10), (8, 13)])
def test_iso_cts_matches_the_paper_formula(fraction: float, shape: tuple[int, int]) -> None:
    base = normal(*shape)
    models = [base + normal(*shape) for _ in range(3)]
    weights = [1.0, 0.5, 1.5]
    out = run(
        "iso_cts",
        models,
        {"common_space_fraction": fraction, "alpha": 1.2},
        [{"weight": w} for w in weights],
        base=base,
    )
    close(out, numpy_iso_cts(base, models, weights, fraction, 1.2), tol=1e-4)


def test_iso_cts_spectrum_is_flat_over_the_whole_rank() -> None:
    base = normal(12, 10)
    models = [base + normal(12, 10) for _ in range(4)]
    merged = run("iso_cts", models, {}, [{}] * 4, base=base).astype(np.float64) - base
    s = svd(merged)[1]
    np.testing.assert_allclose(s, np.full(10, s.mean()), rtol=1e-4)


@pytest.mark.parametrize("fraction", [0.8, 0.3])
def test_iso_cts_of_one_model_is_iso_c(fraction: float) -> None:
    # the common directions plus the residual's leading ones are all of the model's directions
    base, model = normal(10, 8), normal(10, 8)
    cts = run("iso_cts", [model], {"common_space_fraction": fraction}, [{}], base=base)
    close(cts, run("iso_c", [model], {}, [{}], base=base), tol=1e-4)


def test_iso_cts_model_that_left_the_matrix_unchanged_adds_no_directions() -> None:
    base = normal(12, 10)
    models = [base + normal(12, 10), base, base + normal(12, 10)]
    out = run("iso_cts", models, {"common_space_fraction": 0.4}, [{}] * 3, base=base)
    close(out, numpy_iso_cts(base, models, [1.0] * 3, 0.4, 1.0), tol=1e-4)
    # the expected merged matrix has 4 + 2 * 2 directions, not the whole rank of 10
    assert np.sum(svd(out.astype(np.float64) - base)[1] > 1e-3) == 8


# -- every subspace method ------------------------------------------------------------------------


@pytest.mark.parametrize("method", SUBSPACE)
@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("model.layers.0.input_layernorm.weight", (6,)),
        ("model.layers.0.self_attn.q_proj.bias", (6,)),
        ("model.embed_tokens.weight", (9, 4)),
        ("lm_head.weight", (9, 4)),
        ("transformer.wte.weight", (9, 4)),
        ("model.layers.0.block_sparse_moe.experts", (2, 3, 4)),
    ],
)
def test_other_tensors_add_the_mean_of_the_weighted_task_vectors(
    method: str, name: str, shape: tuple[int, ...]
) -> None:
    base, b, c = normal(*shape), normal(*shape), normal(*shape)
    out = run(method, [b, c], {"alpha": 0.8}, [{"weight": 1.0}, {"weight": 0.5}], base=base, name=name)
    close(out, base + 0.8 * ((b - base) + 0.5 * (c - base)) / 2, tol=1e-6)


@pytest.mark.parametrize("method", SUBSPACE)
def test_models_equal_to_the_base_merge_to_the_base(method: str) -> None:
    base = normal(8, 6)
    np.testing.assert_array_equal(run(method, [base, base, base], {}, [{}] * 3, base=base), base)


@pytest.mark.parametrize("method", SUBSPACE)
def test_zero_weights_give_the_base(method: str) -> None:
    base = normal(8, 6)
    out = run(method, [normal(8, 6), normal(8, 6)], {}, [{"weight": 0.0}] * 2, base=base)
    np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("method", SUBSPACE)
def test_alpha_zero_gives_the_base(method: str) -> None:
    base = normal(8, 6)
    out = run(method, [normal(8, 6), normal(8, 6)], {"alpha": 0.0}, [{}] * 2, base=base)
    np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("method", SUBSPACE)
def test_float64_inputs_stay_float64(method: str) -> None:
    m = REGISTRY[method]
    base = rng.normal(size=(9, 7))
    models = [base + rng.normal(size=(9, 7)) for _ in range(2)]
    inputs: MergeInputs[Any, Any] = MergeInputs(
        tensor_name=MATRIX,
        base=torch.tensor(base),
        tensors=[torch.tensor(x) for x in models],
        params=m.build_params({i.key: i.default for i in m.param_infos}),
        model_params=[m.build_model_params({"weight": 1.0})] * 2,
    )
    out = m.merge(inputs)
    assert out.dtype == torch.float64
    reference = {
        "tsv": lambda: numpy_tsv(base, models, [1.0, 1.0], 3, 1.0),
        "iso_c": lambda: numpy_iso_c(base, models, [1.0, 1.0], 1.0),
        "iso_cts": lambda: numpy_iso_cts(base, models, [1.0, 1.0], 0.8, 1.0),
    }[method]()
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", SUBSPACE)
def test_non_finite_task_matrix_is_a_clear_error(method: str) -> None:
    base, bad = normal(8, 6), normal(8, 6)
    bad[2, 3] = np.nan
    with pytest.raises(MethodError, match=r"up_proj\.weight: .*NaN or infinite"):
        run(method, [normal(8, 6), bad], {}, [{}, {}], base=base)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


def test_fractions_outside_their_bounds_are_refused_at_config_time() -> None:
    head = "base_model: a\nmodels:\n  - model: b\n  - model: c\n"
    found = problems("merge_method: tsv\n" + head + "parameters:\n  k: 1.5\n  alpha: 1.0\n")
    assert found == ["line 7: parameters.k: 1.5 is outside [0, 1]"]
    found = problems("merge_method: iso_cts\n" + head + "parameters:\n  common_space_fraction: -0.1\n")
    assert found == ["line 7: parameters.common_space_fraction: -0.1 is outside [0, 1]"]


@pytest.mark.parametrize("method", SUBSPACE)
def test_a_base_model_is_required(method: str) -> None:
    assert REGISTRY[method].base == "required"
    found = problems(f"merge_method: {method}\nmodels:\n  - model: b\n  - model: c\n")
    assert len(found) == 1 and "base_model" in found[0]


@pytest.mark.parametrize("method", SUBSPACE)
def test_tiny_llama_merge_matches_the_formulas(method: str, zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    mergesmith.merge(config_for(method, zoo), out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a", "b", "c", "d"])
    weights = [0.4, 0.3, 0.2, 0.1]  # config_for's weights for a, b, c, d

    def inputs(name: str) -> tuple[np.ndarray, list[np.ndarray]]:
        return src["base"][name].numpy(), [src[m][name].numpy() for m in "abcd"]

    base, models = inputs("model.layers.1.mlp.up_proj.weight")  # 64 x 32
    expected = {
        "tsv": lambda: numpy_tsv(base, models, weights, 32 // 4, 1.0),
        "iso_c": lambda: numpy_iso_c(base, models, weights, 1.0),
        "iso_cts": lambda: numpy_iso_cts(base, models, weights, 0.8, 1.0),
    }[method]()
    close(merged["model.layers.1.mlp.up_proj.weight"].numpy(), expected, tol=1e-4)
    for name in ["model.layers.1.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight"]:
        base, models = inputs(name)
        mean = sum(w * (m.astype(np.float64) - base) for m, w in zip(models, weights)) / 4
        close(merged[name].numpy(), base + mean, tol=1e-5)
