"""Consensus merging (consensus_ta, consensus_ties) against its formulas, written out in numpy."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError, load_config
from mergesmith.errors import MethodError
from mergesmith.methods import REGISTRY, MergeInputs
from mergesmith.methods.consensus import (
    ConsensusTaModelParams,
    ConsensusTaParams,
    ConsensusTiesModelParams,
    ConsensusTiesParams,
    consensus_mask,
    tall_mask,
)
from tests import tiny
from tests.test_merge import states
from tests.test_methods import run

rng = np.random.default_rng(31)


def normal(*shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


# -- the formulas in numpy (float64) ----------------------------------------------------------------


def np_trim(delta: np.ndarray, density: float, rescale: bool) -> np.ndarray:
    """The k = max(1, floor(density * n)) largest magnitudes, equal ones lower index first."""
    flat = delta.ravel()
    if density >= 1:
        return delta.copy()
    k = max(1, int(density * flat.size))
    order = sorted(range(flat.size), key=lambda j: (-abs(flat[j]), j))
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    if rescale:
        before, after = np.abs(flat).sum(), np.abs(out).sum()
        if before >= 1e-7 and after >= 1e-7:
            out *= before / after
    return out.reshape(delta.shape)


def np_ta_vector(deltas: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    merged = sum(w * d for w, d in zip(weights, deltas))
    assert isinstance(merged, np.ndarray)
    if normalize and abs(sum(weights)) >= 1e-8:
        merged = merged / sum(weights)
    return merged


def np_ties_vector(
    deltas: list[np.ndarray], weights: list[float], densities: list[float], normalize: bool, rescale: bool
) -> np.ndarray:
    u = [w * np_trim(d, p, rescale) for d, w, p in zip(deltas, weights, densities)]
    sign = np.where(sum(u) >= 0, 1.0, -1.0)
    agree = [(x * sign > 0).astype(np.float64) for x in u]
    merged = sum(a * x for a, x in zip(agree, u))
    assert isinstance(merged, np.ndarray)
    if normalize:
        divisor = sum(a * w for a, w in zip(agree, weights))
        assert isinstance(divisor, np.ndarray)
        merged = merged / np.where(divisor == 0, 1.0, divisor)
    return merged


def np_masks(deltas: list[np.ndarray], merged: np.ndarray, lambdas: list[float]) -> list[np.ndarray]:
    return [np.abs(d) >= lam * np.abs(merged - d) for d, lam in zip(deltas, lambdas)]


def np_consensus(
    base: np.ndarray,
    models: list[np.ndarray],
    *,
    ties: bool,
    k: int = 2,
    lam: float = 1.0,
    weights: list[float] | None = None,
    lambdas: list[float] | None = None,
    densities: list[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
) -> np.ndarray:
    b = base.astype(np.float64)
    deltas = [m.astype(np.float64) - b for m in models]
    n = len(models)
    weights = weights or [1.0] * n
    lambdas = lambdas or [0.4] * n
    if ties:
        merged = np_ties_vector(deltas, weights, densities or [0.2] * n, normalize, rescale)
    else:
        merged = np_ta_vector(deltas, weights, normalize)
    count = sum(m.astype(int) for m in np_masks(deltas, merged, lambdas))
    return b + lam * np.where(np.asarray(count) >= k, merged, 0.0)


def per_model(**columns: list[Any]) -> list[dict[str, Any]]:
    n = len(next(iter(columns.values())))
    return [{key: values[i] for key, values in columns.items()} for i in range(n)]


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# -- the masks on a hand-worked example -------------------------------------------------------------

# three task vectors of four entries; the task-arithmetic multi-task vector is their sum [2, 3, 2, 1]
HAND = [np.array([1, 0, 2, -1.0]), np.array([1, 3, 0, 1.0]), np.array([0, 0, 0, 1.0])]


def test_tall_masks_and_their_count_by_hand() -> None:
    deltas = [torch.tensor(d, dtype=torch.float32) for d in HAND]
    merged = deltas[0] + deltas[1] + deltas[2]
    # |d_t| >= 0.5 * |sum - d_t|:  |sum - d_1| = [1, 3, 0, 2], |sum - d_2| = [1, 0, 2, 0], |sum - d_3| = [2, 3, 2, 0]
    masks = [tall_mask(d, merged, 0.5).tolist() for d in deltas]
    assert masks == [[True, False, True, True], [True, True, False, True], [False, False, False, True]]
    # marked by 2, 1, 1 and 3 models
    for k, kept in [
        (0, [True] * 4),
        (1, [True] * 4),
        (2, [True, False, False, True]),
        (3, [False, False, False, True]),
        (4, [False] * 4),
    ]:
        assert consensus_mask(deltas, merged, [0.5] * 3, k).tolist() == kept


def test_hand_example_through_the_method() -> None:
    base = np.full(4, 10.0, dtype=np.float32)
    models = [(base + d).astype(np.float32) for d in HAND]
    params = per_model(tall_lambda=[0.5, 0.5, 0.5])
    out = run("consensus_ta", models, {"lambda": 0.5}, params, base=base)
    close(out, base + 0.5 * np.array([2, 0, 0, 1.0]))  # entries 2 and 3 dropped (one task each)
    out = run("consensus_ta", models, {"lambda": 0.5, "min_agreement": 3}, params, base=base)
    close(out, base + 0.5 * np.array([0, 0, 0, 1.0]))
    # tall_lambda 0 marks every entry for every model, so nothing is dropped
    out = run("consensus_ta", models, {}, per_model(tall_lambda=[0.0, 0.0, 0.0]), base=base)
    close(out, base + np.array([2, 3, 2, 1.0]))


# -- numbers against numpy --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("normalize", [False, True])
def test_consensus_ta_matches_numpy(k: int, normalize: bool) -> None:
    base = normal(6, 9)
    models = [base + 0.1 * normal(6, 9) for _ in range(4)]
    weights, lambdas = [1.0, 0.6, 1.3, -0.4], [0.4, 0.2, 0.6, 0.5]
    params = {"min_agreement": k, "normalize": normalize, "lambda": 0.7}
    out = run("consensus_ta", models, params, per_model(weight=weights, tall_lambda=lambdas), base=base)
    expected = np_consensus(
        base, models, ties=False, k=k, lam=0.7, weights=weights, lambdas=lambdas, normalize=normalize
    )
    close(out, expected)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize(("normalize", "rescale"), [(False, False), (True, False), (False, True)])
def test_consensus_ties_matches_numpy(k: int, normalize: bool, rescale: bool) -> None:
    base = normal(7, 8)
    models = [base + 0.1 * normal(7, 8) for _ in range(3)]
    weights, lambdas, densities = [1.0, 0.8, 1.2], [0.3, 0.4, 0.6], [0.2, 0.5, 1.0]
    params = {"min_agreement": k, "normalize": normalize, "rescale": rescale, "lambda": 1.5}
    mps = per_model(weight=weights, tall_lambda=lambdas, density=densities)
    out = run("consensus_ties", models, params, mps, base=base)
    expected = np_consensus(
        base,
        models,
        ties=True,
        k=k,
        lam=1.5,
        weights=weights,
        lambdas=lambdas,
        densities=densities,
        normalize=normalize,
        rescale=rescale,
    )
    close(out, expected)


def test_defaults_are_the_papers_settings() -> None:
    base = normal(5, 6)
    models = [base + 0.1 * normal(5, 6) for _ in range(5)]
    # k = 2, tall_lambda 0.4, unit weights, the plain sum; TIES keeps the top 20% and sums what agrees
    close(run("consensus_ta", models, {}, [{}] * 5, base=base), np_consensus(base, models, ties=False))
    close(run("consensus_ties", models, {}, [{}] * 5, base=base), np_consensus(base, models, ties=True))


def test_the_masks_of_consensus_ties_are_taken_against_the_ties_vector() -> None:
    base = normal(6, 6)
    models = [base + normal(6, 6) for _ in range(3)]
    b = base.astype(np.float64)
    deltas = [m - b for m in models]
    ties_vector = np_ties_vector(deltas, [1.0] * 3, [0.2] * 3, False, False)
    count_ties = sum(m.astype(int) for m in np_masks(deltas, ties_vector, [0.4] * 3))
    count_sum = sum(m.astype(int) for m in np_masks(deltas, sum(deltas), [0.4] * 3))
    assert (np.asarray(count_ties) != np.asarray(count_sum)).any()  # the choice shows in the result
    out = run("consensus_ties", models, {}, [{}] * 3, base=base)
    close(out, b + np.where(np.asarray(count_ties) >= 2, ties_vector, 0.0))


def test_min_agreement_zero_is_task_arithmetic_and_ties() -> None:
    base = normal(4, 10)
    models = [base + normal(4, 10) for _ in range(3)]
    weights = [{"weight": w} for w in (0.5, 1.0, 0.8)]
    ta = run("task_arithmetic", models, {"lambda": 0.6}, weights, base=base)
    close(run("consensus_ta", models, {"lambda": 0.6, "min_agreement": 0}, weights, base=base), ta)
    ties_mps = [{**w, "density": 0.4} for w in weights]
    ties = run("ties", models, {"normalize": False}, ties_mps, base=base)
    close(run("consensus_ties", models, {"min_agreement": 0}, ties_mps, base=base), ties)


def test_a_higher_threshold_keeps_a_subset() -> None:
    base = normal(8, 8)
    models = [base + normal(8, 8) for _ in range(5)]
    kept = [run("consensus_ta", models, {"min_agreement": k}, [{}] * 5, base=base) != base for k in range(6)]
    for looser, stricter in itertools.pairwise(kept):
        assert (looser | ~stricter).all()
    assert kept[1].sum() > kept[3].sum() > kept[5].sum()  # entries do get dropped step by step


def np_paper_ties_vector(trimmed: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    """The authors' TIES on task vectors already trimmed: weighted sign election, disjoint sum, or
    with ``normalize`` the mean over the agreeing models' count."""
    u = [w * d for d, w in zip(trimmed, weights)]
    sign = np.where(sum(u) >= 0, 1.0, -1.0)
    agree = [(x * sign > 0).astype(np.float64) for x in u]
    merged = sum(a * x for a, x in zip(agree, u))
    assert isinstance(merged, np.ndarray)
    if normalize:
        merged = merged / np.maximum(sum(agree), 1.0)
    return merged


@pytest.mark.parametrize("normalize", [False, True])
def test_paper_mode_trims_at_the_given_thresholds(normalize: bool) -> None:
    base = normal(6, 7)
    models = [base + normal(6, 7) for _ in range(3)]
    weights, lambdas, thresholds = [1.0, 0.5, 1.5], [0.4, 0.3, 0.5], [0.8, 1.2, 0.0]
    method = REGISTRY["consensus_ties"]
    inputs: MergeInputs[Any, Any] = MergeInputs(
        tensor_name="model.layers.0.mlp.up_proj.weight",
        base=torch.tensor(base),
        tensors=[torch.tensor(m) for m in models],
        params=ConsensusTiesParams(mode="paper", normalize=normalize, lambda_=0.8),
        model_params=[
            ConsensusTiesModelParams(weight=w, tall_lambda=lam) for w, lam in zip(weights, lambdas)
        ],
        thresholds=thresholds,
    )
    out = method.merge(inputs).numpy()
    deltas = [m - base for m in models]  # float32, as the method sees them
    trimmed = [np.where(np.abs(d) >= t, d, 0).astype(np.float64) for d, t in zip(deltas, thresholds)]
    merged = np_paper_ties_vector(trimmed, weights, normalize)
    count = sum(m.astype(int) for m in np_masks([d.astype(np.float64) for d in deltas], merged, lambdas))
    close(out, base + 0.8 * np.where(np.asarray(count) >= 2, merged, 0.0))


def test_paper_mode_needs_the_thresholds() -> None:
    params = {"mode": "paper"}
    with pytest.raises(MethodError, match="consensus_ties in paper mode needs the whole-model thresholds"):
        run("consensus_ties", [normal(2, 3), normal(2, 3)], params, [{}] * 2, base=normal(2, 3))


# -- edge cases -------------------------------------------------------------------------------------


def test_one_model_keeps_everything_with_k_1_and_nothing_with_k_2() -> None:
    base = normal(3, 7)
    model = base + normal(3, 7)
    delta = model.astype(np.float64) - base
    # the multi-task vector is the task vector itself: |d| >= tall_lambda * 0 marks every entry
    close(
        run("consensus_ta", [model], {"min_agreement": 1, "lambda": 0.5}, [{}], base=base), base + 0.5 * delta
    )
    # min_agreement: 2 asks for two models; called past the plan-time check, it keeps nothing
    np.testing.assert_array_equal(run("consensus_ta", [model], {}, [{}], base=base), base)
    np.testing.assert_array_equal(run("consensus_ties", [model], {}, [{}], base=base), base)


def test_one_weighted_model_marks_entries_by_weight() -> None:
    base = normal(3, 7)
    model = base + normal(3, 7)
    delta = model.astype(np.float64) - base
    # |d| >= tall_lambda * |3 d - d| holds where tall_lambda * 2 <= 1
    out = run(
        "consensus_ta", [model], {"min_agreement": 1}, [{"weight": 3.0, "tall_lambda": 0.45}], base=base
    )
    close(out, base + 3 * delta)
    out = run("consensus_ta", [model], {"min_agreement": 1}, [{"weight": 3.0, "tall_lambda": 0.6}], base=base)
    np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
def test_zero_task_vectors_give_the_base(method: str) -> None:
    base = normal(4, 5)
    out = run(method, [base.copy(), base.copy(), base.copy()], {"min_agreement": 1}, [{}] * 3, base=base)
    np.testing.assert_array_equal(out, base)


def test_a_zero_task_vector_marks_nothing_the_others_change() -> None:
    base = normal(4, 5)
    model = base + normal(4, 5)
    # the zero task vector's mask holds only where the multi-task vector is 0: with k = 2 nothing is
    # kept; with k = 1 the other model's mask (full) keeps everything
    np.testing.assert_array_equal(run("consensus_ta", [model, base.copy()], {}, [{}] * 2, base=base), base)
    out = run("consensus_ta", [model, base.copy()], {"min_agreement": 1}, [{}] * 2, base=base)
    close(out, model)


def test_a_nan_reaches_the_result() -> None:
    base = np.zeros(4, dtype=np.float32)
    models = [np.array([1, np.nan, 1, 2], dtype=np.float32), np.array([1, 1, 1, 2], dtype=np.float32)]
    for method in ("consensus_ta", "consensus_ties"):
        out = run(
            method, models, {}, [{"density": 1.0}] * 2 if method == "consensus_ties" else [{}] * 2, base=base
        )
        assert np.isnan(out[1]), method


# -- parameters -------------------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
def test_bounds_are_refused_at_config_time(method: str) -> None:
    head = f"merge_method: {method}\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n"
    assert problems(head + "parameters:\n  min_agreement: -1\n") == [
        "line 7: parameters.min_agreement: -1 is outside [0, inf)"
    ]
    assert problems(head + "parameters:\n  min_agreement: 1.5\n") == [
        "line 7: parameters.min_agreement: expected a whole number, found 1.5"
    ]
    found = problems(head + "parameters:\n  tall_lambda: -0.1\n")
    assert len(found) == 1 and "tall_lambda: -0.1 is outside [0, inf)" in found[0]


def test_density_is_refused_outside_its_range() -> None:
    head = (
        "merge_method: consensus_ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {density: 0}\n"
    )
    found = problems(head)
    assert len(found) == 1 and "density: 0 is outside (0, 1]" in found[0]
    found = problems(head.replace("density: 0", "density: 1.5"))
    assert len(found) == 1 and "density: 1.5 is outside (0, 1]" in found[0]


def test_a_base_model_is_required() -> None:
    found = problems("merge_method: consensus_ta\nmodels:\n  - model: b\n  - model: c\n")
    assert len(found) == 1 and "base_model" in found[0]


def test_the_check_refuses_more_agreement_than_models() -> None:
    check = REGISTRY["consensus_ta"].check
    assert check is not None
    trouble = check(ConsensusTaParams(min_agreement=3), [ConsensusTaModelParams()] * 2)
    assert trouble is not None
    assert "consensus_ta: min_agreement: 3 keeps the entries that at least 3 models mark" in trouble
    assert "merged from 2 models besides the base" in trouble and "at most 2" in trouble
    assert check(ConsensusTaParams(min_agreement=2), [ConsensusTaModelParams()] * 2) is None
    ties_check = REGISTRY["consensus_ties"].check
    assert ties_check is not None
    trouble = ties_check(ConsensusTiesParams(), [ConsensusTiesModelParams()])
    assert (
        trouble is not None and "consensus_ties: min_agreement: 2" in trouble and "1 model besides" in trouble
    )
    assert ties_check(ConsensusTiesParams(min_agreement=1), [ConsensusTiesModelParams()]) is None


def test_one_model_with_the_default_k_is_refused_at_plan_time(zoo: dict[str, Path]) -> None:
    text = f"merge_method: consensus_ta\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\ndtype: float32\n"
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    message = str(info.value)
    assert "min_agreement: 2" in message and "1 model besides the base" in message
    assert "set min_agreement to at most 1" in message
    assert message.count("min_agreement: 2 keeps") == 1  # one problem, not one per tensor
    mergesmith.validate(text + "parameters: {min_agreement: 1}\n")


def test_more_agreement_than_models_is_refused_at_plan_time(zoo: dict[str, Path]) -> None:
    text = (
        f"merge_method: consensus_ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n  - model: {zoo['b']}\nparameters: {{min_agreement: 3}}\ndtype: float32\n"
    )
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    assert "consensus_ties: min_agreement: 3" in str(info.value) and "at most 2" in str(info.value)


# -- end to end -------------------------------------------------------------------------------------


def layer_position(name: str) -> float:
    """The tensor's t in the tiny Llama (3 layers): layer / 2, and 0 outside the layers."""
    parts = name.split(".")
    return int(parts[2]) / 2 if parts[:2] == ["model", "layers"] else 0.0


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
def test_tiny_llama_merge_matches_numpy(method: str, zoo: dict[str, Path], tmp_path: Path) -> None:
    ties = method == "consensus_ties"
    density = "density: 0.5, " if ties else ""
    text = (
        f"merge_method: {method}\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{{density}weight: 1.0, tall_lambda: [0.2, 0.6]}}\n"
        f"  - model: {zoo['b']}\n    parameters: {{{density}weight: 0.8}}\n"
        f"  - model: {zoo['c']}\n    parameters: {{weight: 1.2, tall_lambda: 0.3}}\n"
        "parameters:\n  lambda: 0.9\n  min_agreement: 2\ndtype: float32\n"
    )
    out = tmp_path / "out"
    plan = mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a", "b", "c"])
    assert sorted(merged) == sorted(j.name for j in plan.jobs)
    dropped = 0
    for name in merged:
        lambdas = [0.2 + 0.4 * layer_position(name), 0.4, 0.3]  # the gradient [0.2, 0.6] over 3 layers
        settings: dict[str, Any] = {
            "ties": ties,
            "lam": 0.9,
            "weights": [1.0, 0.8, 1.2],
            "lambdas": lambdas,
            "densities": [0.5, 0.5, 0.2],
        }
        models = [src[m][name].numpy() for m in "abc"]
        expected = np_consensus(src["base"][name].numpy(), models, k=2, **settings)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
        unmasked = np_consensus(src["base"][name].numpy(), models, k=0, **settings)
        dropped += int((np.abs(unmasked - expected) > 1e-6).sum())
    assert dropped > 0  # the consensus mask did drop entries of the merge
    layer2 = next(j for j in plan.jobs if j.name == "model.layers.2.mlp.up_proj.weight")
    assert layer2.built_model_params[0].tall_lambda == pytest.approx(0.6)


def test_paper_mode_refuses_rescale() -> None:
    check = REGISTRY["consensus_ties"].check
    assert check is not None
    trouble = check(ConsensusTiesParams(mode="paper", rescale=True), [ConsensusTiesModelParams()] * 2)
    assert (
        trouble is not None and "consensus_ties mode: paper keeps the trimmed entries as they are" in trouble
    )


def test_paper_mode_trims_over_the_whole_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"merge_method: consensus_ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{density: 0.3}}\n"
        f"  - model: {zoo['b']}\n    parameters: {{density: 0.3, weight: 0.5, tall_lambda: 0.3}}\n"
        f"  - model: {zoo['c']}\n    parameters: {{density: 0.2}}\n"
        "parameters: {mode: paper, lambda: 0.9}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    mergesmith.merge(text, out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a", "b", "c"])
    names = sorted(src["base"])
    deltas = {m: {n: (src[m][n] - src["base"][n]).numpy() for n in names} for m in "abc"}
    thresholds = []
    for m, density in zip("abc", (0.3, 0.3, 0.2)):
        flat = np.sort(np.concatenate([np.abs(deltas[m][n]).ravel() for n in names]))[::-1]
        thresholds.append(float(flat[int(density * flat.size)]))  # the (keep + 1)-th largest
    for n in names:
        ds = [deltas[m][n] for m in "abc"]
        trimmed = [np.where(np.abs(d) >= t, d, 0).astype(np.float64) for d, t in zip(ds, thresholds)]
        vector = np_paper_ties_vector(trimmed, [1.0, 0.5, 1.0], False)
        count = sum(
            k.astype(int) for k in np_masks([d.astype(np.float64) for d in ds], vector, [0.4, 0.3, 0.4])
        )
        expected = src["base"][n].numpy() + 0.9 * np.where(np.asarray(count) >= 2, vector, 0.0)
        np.testing.assert_allclose(merged[n].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=n)
    # the trim is over the whole model: the share of a model's entries kept varies across tensors
    kept = [float((np.abs(deltas["a"][n]) >= thresholds[0]).mean()) for n in names]
    assert max(kept) - min(kept) > 0.2
