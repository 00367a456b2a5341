"""arcee_fusion, ram and ramplus_tl against their formulas, written out independently in numpy on
hand-built tensors, plus their parameters and a merge through a YAML config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError, load_config
from mergesmith.config import ConfigWarning
from mergesmith.methods import REGISTRY, arcee_fusion
from tests import tiny
from tests.test_methods import run

rng = np.random.default_rng(16)
A = rng.normal(size=(8, 6)).astype(np.float32)
B = rng.normal(size=(8, 6)).astype(np.float32)
C = rng.normal(size=(8, 6)).astype(np.float32)

TOL = {"rtol": 1e-5, "atol": 1e-6}


def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def sparse_change(base: np.ndarray, keep: float, seed: int) -> np.ndarray:
    """``base`` plus noise on about ``keep`` of its entries (exactly equal elsewhere)."""
    g = np.random.default_rng(seed)
    noise = g.normal(size=base.shape) * (g.random(base.shape) < keep)
    return (base + noise).astype(np.float32)


# -- arcee_fusion ---------------------------------------------------------------------------------


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(f64(x) - f64(x).max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_fusion_scores(base: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, float]:
    """Importance |d| * KL(softmax(other) + 1e-8 || softmax(base) + 1e-8) per row, and the
    threshold from the order statistics at floor(q (n - 1)): s[i2] + 1.5 (s[i3] - s[i1])."""
    p = np_softmax(other) + 1e-8
    q = np_softmax(base) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    scores = np.abs(f64(other) - f64(base)) * kl
    s = np.sort(scores.ravel())
    n = s.size
    q1, med, q3 = (s[int(np.floor(q * (n - 1)))] for q in (0.25, 0.5, 0.75))
    return scores, float(med + 1.5 * (q3 - q1))


def np_arcee_fusion(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The other model's entries whose importance reaches the threshold, the base's elsewhere."""
    scores, threshold = np_fusion_scores(base, other)
    return np.where(scores >= threshold, f64(other), f64(base))


def test_arcee_fusion_on_one_row_keeps_changes_past_median_plus_one_and_a_half_iqr() -> None:
    # one row: every entry shares the row's KL divergence, so the importance ranks by |change|
    base = np.zeros(9, dtype=np.float32)
    change = np.array([0.0, 0.1, 0.0, 0.3, 0.2, -0.1, 2.0, -0.3, 0.2], dtype=np.float32)
    out = run("arcee_fusion", [base + change], {}, [{}], base=base)
    # sorted |change|: 0 0 .1 .1 .2 .2 .3 .3 2; positions 2, 4, 6: q1 = .1, median = .2, q3 = .3
    # threshold .2 + 1.5 * .2 = .5: only the 2.0 entry is taken
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, 0, 2.0, 0, 0])


def test_arcee_fusion_quartiles_are_order_statistics_at_truncated_positions() -> None:
    base = np.zeros(8, dtype=np.float32)
    change = np.array([0.3, 0.0, 1.0, 0.1, 0.0, 0.8, 0.3, 0.0], dtype=np.float32)
    out = run("arcee_fusion", [base + change], {}, [{}], base=base)
    # sorted |change|: 0 0 0 .1 .3 .3 .8 1; n = 8 gives positions floor(1.75) = 1, floor(3.5) = 3,
    # floor(5.25) = 5: q1 = 0, median = .1, q3 = .3, threshold .1 + 1.5 * .3 = .55: .8 and 1 taken.
    np.testing.assert_array_equal(out, np.array([0, 0, 1.0, 0, 0, 0.8, 0, 0], dtype=np.float32))
    # interpolated quartiles (0, .2, .425) would give .8375 and drop the .8; positions rounded up
    # (2, 4, 6) would give .3 + 1.5 * .8 = 1.5 and take nothing
    s = np.sort(change.astype(np.float64))
    interpolated = np.quantile(s, 0.5) + 1.5 * (np.quantile(s, 0.75) - np.quantile(s, 0.25))
    assert interpolated == pytest.approx(0.8375)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 10, 11, 1023, 999_999, 1_000_000])
def test_arcee_fusion_quartile_positions_are_mergekits_float32_truncation(n: int) -> None:
    values = torch.randperm(n, generator=torch.Generator().manual_seed(n)).to(torch.float64)
    got = [int(v) for v in arcee_fusion.order_statistics(values)]
    # mergekit: (float32 q * (n - 1)) truncated to an integer position of the sorted values
    expected = [int(np.float32(q) * np.float32(n - 1)) for q in (0.25, 0.5, 0.75)]
    assert got == expected


def test_arcee_fusion_weighs_changes_by_the_row_kl_divergence() -> None:
    # row 1's changes are larger, but shifting a whole row barely moves its softmax (tiny KL),
    # while row 0's opposite changes move it a lot
    base = np.zeros((2, 4), dtype=np.float32)
    change = np.array([[1.0, -1.0, 0.0, 0.0], [1.2, 1.2, 1.2, 1.1]], dtype=np.float32)
    out = run("arcee_fusion", [base + change], {}, [{}], base=base)
    np.testing.assert_allclose(out, np_arcee_fusion(base, base + change), rtol=0, atol=0)
    np.testing.assert_array_equal(out, np.array([[1.0, -1.0, 0, 0], [0, 0, 0, 0]], dtype=np.float32))


def test_arcee_fusion_matches_the_formula_on_random_tensors() -> None:
    for seed, keep in ((1, 1.0), (2, 0.5), (3, 0.2)):
        other = sparse_change(A, keep, seed)
        out = run("arcee_fusion", [other], {}, [{}], base=A)
        np.testing.assert_allclose(out, np_arcee_fusion(A, other), **TOL)
        taken = out != A
        assert 0 < taken.sum() < A.size
    vec = rng.normal(size=50).astype(np.float32)
    other = sparse_change(vec, 0.6, 4)
    np.testing.assert_allclose(
        run("arcee_fusion", [other], {}, [{}], base=vec), np_arcee_fusion(vec, other), **TOL
    )


def test_arcee_fusion_uses_exact_quartiles_on_tensors_over_a_million_entries() -> None:
    # mergekit estimates the quartiles from a random sample above 1e6 entries; these are exact
    g = np.random.default_rng(5)
    base = g.normal(size=(1001, 1000)).astype(np.float32)
    other = (base + 0.02 * g.normal(size=base.shape)).astype(np.float32)
    scores, threshold = np_fusion_scores(base, other)
    got = arcee_fusion.threshold(arcee_fusion.importance(torch.tensor(base), torch.tensor(other)))
    assert float(got) == pytest.approx(threshold, rel=1e-4)
    out = run("arcee_fusion", [other], {}, [{}], base=base)
    # float32 sums of a thousand-entry row's KL terms are good to about 1e-3 (relative): compare the
    # entries clear of the threshold by more than that
    clear = np.abs(scores - threshold) > 5e-3 * threshold
    assert clear.mean() > 0.99
    np.testing.assert_allclose(out[clear], np_arcee_fusion(base, other)[clear], **TOL)
    np.testing.assert_array_equal(run("arcee_fusion", [other], {}, [{}], base=base, seed=9), out)


def test_arcee_fusion_identical_inputs_merge_to_themselves() -> None:
    np.testing.assert_array_equal(run("arcee_fusion", [A], {}, [{}], base=A), A)


# -- ram and ramplus_tl ---------------------------------------------------------------------------


def np_ram(
    base: np.ndarray, models: list[np.ndarray], epsilon: float = 1e-5, boosts: list[float] | None = None
) -> np.ndarray:
    """Per entry: no contributor -> base; one -> base + its change (times its boost); several ->
    base + the mean of their changes. A model contributes where |change| > epsilon."""
    deltas = [f64(m - base) for m in models]  # task vectors as float32 subtraction gives them
    contrib = [np.abs(d) > epsilon for d in deltas]
    count = np.sum(contrib, axis=0)
    boosts = boosts or [1.0] * len(models)
    out = f64(base).copy()
    for idx in np.ndindex(base.shape):
        changes = [d[idx] for d, c in zip(deltas, contrib) if c[idx]]
        if count[idx] == 1:
            (i,) = [i for i, c in enumerate(contrib) if c[idx]]
            out[idx] += changes[0] * boosts[i]
        elif count[idx] > 1:
            out[idx] += sum(changes) / len(changes)
    return out


def np_boosts(
    base: np.ndarray, models: list[np.ndarray], r: float, alpha: float, epsilon: float
) -> list[float]:
    """1 + r * clip(shared / max(unique, epsilon), 0, alpha) per model."""
    contrib = [np.abs(f64(m - base)) > epsilon for m in models]
    count = np.sum(contrib, axis=0)
    out = []
    for c in contrib:
        shared, unique = int((c & (count > 1)).sum()), int((c & (count == 1)).sum())
        out.append(1 + r * min(max(shared / max(unique, epsilon), 0), alpha))
    return out


def test_ram_by_hand() -> None:
    base = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    m1 = base + np.array([0.5, 0.2, 0.3, 0.0, 4e-6, 0.6], dtype=np.float32)
    m2 = base + np.array([0.0, 0.4, 0.6, 0.0, -0.1, 0.0], dtype=np.float32)
    m3 = base + np.array([0.0, 0.0, -0.3, 0.0, 0.0, 0.0], dtype=np.float32)
    out = run("ram", [m1, m2, m3], {}, [{}, {}, {}], base=base)
    # entry 0: m1 alone; 1: m1 and m2 -> mean .3; 2: all three -> mean .2; 3: nobody;
    # 4: m1's 4e-6 is below epsilon, so m2 alone; 5: m1 alone
    expected = [1.5, 1.3, 1.2, 1.0, 0.9, 1.6]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    # the plain mean of the changes would differ at entries 0, 1, 4 and 5
    assert not np.allclose(out, (m1 + m2 + m3) / 3)


def test_ram_epsilon_decides_who_contributes() -> None:
    base = np.zeros(4, dtype=np.float32)
    m1 = np.array([0.05, 0.2, 0.05, 0.0], dtype=np.float32)
    m2 = np.array([0.4, 0.4, 0.0, 0.0], dtype=np.float32)
    out = run("ram", [m1, m2], {"epsilon": 0.1}, [{}, {}], base=base)
    # m1's .05 entries do not count: entry 0 is m2's alone, entry 2 nobody's (m1's change dropped)
    np.testing.assert_allclose(out, [0.4, 0.3, 0.0, 0.0], rtol=1e-6, atol=1e-7)
    out0 = run("ram", [m1, m2], {"epsilon": 0.0}, [{}, {}], base=base)
    np.testing.assert_allclose(out0, [0.225, 0.3, 0.05, 0.0], rtol=1e-6, atol=1e-7)


def test_ram_matches_the_formula_on_random_sparse_changes() -> None:
    models = [sparse_change(A, 0.5, 11), sparse_change(A, 0.4, 12), sparse_change(A, 0.7, 13)]
    out = run("ram", models, {}, [{}, {}, {}], base=A)
    np.testing.assert_allclose(out, np_ram(A, models), **TOL)
    out = run("ram", models, {"epsilon": 0.5}, [{}, {}, {}], base=A)
    np.testing.assert_allclose(out, np_ram(A, models, epsilon=0.5), **TOL)


def test_ram_one_model_is_that_model_where_it_changed_more_than_epsilon() -> None:
    m = A + np.where(np.abs(B) > 1, B, B * 1e-6).astype(np.float32)
    out = run("ram", [m], {}, [{}], base=A)
    np.testing.assert_allclose(out, np.where(np.abs(B) > 1, m, A), **TOL)


def test_ramplus_tl_by_hand() -> None:
    base = np.zeros(6, dtype=np.float32)
    m1 = np.array([0.5, 0.2, 0.3, 0.1, 0.0, 0.0], dtype=np.float32)
    m2 = np.array([0.0, 0.0, 0.5, 0.3, 0.4, 0.0], dtype=np.float32)
    out = run("ramplus_tl", [m1, m2], {"r": 0.5, "alpha": 5.0}, [{}, {}], base=base)
    # counts 1 1 2 2 1 0. m1: 2 shared, 2 unique -> rho 1 -> boost 1 + .5 * 1 = 1.5
    #                      m2: 2 shared, 1 unique -> rho 2 -> boost 1 + .5 * 2 = 2.0
    expected = [0.5 * 1.5, 0.2 * 1.5, 0.4, 0.2, 0.4 * 2.0, 0.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    # alpha caps rho: with the defaults (r .1, alpha .2) both boosts are 1 + .1 * .2 = 1.02
    out = run("ramplus_tl", [m1, m2], {}, [{}, {}], base=base)
    expected = [0.5 * 1.02, 0.2 * 1.02, 0.4, 0.2, 0.4 * 1.02, 0.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_ramplus_tl_model_without_unique_entries_gets_the_capped_boost() -> None:
    base = np.zeros(3, dtype=np.float32)
    m1 = np.array([0.2, 0.4, 0.6], dtype=np.float32)
    m2 = np.array([0.4, 0.0, 0.0], dtype=np.float32)  # shares entry 0, has nothing of its own
    out = run("ramplus_tl", [m1, m2], {"r": 1.0, "alpha": 0.5}, [{}, {}], base=base)
    # m1: 1 shared, 2 unique -> rho .5 -> boost 1.5; m2: rho = 1 / epsilon, capped at .5 (unused)
    np.testing.assert_allclose(out, [0.3, 0.6, 0.9], rtol=1e-6, atol=1e-7)
    assert np_boosts(base, [m1, m2], 1.0, 0.5, 1e-5) == [1.5, 1.5]


def test_ramplus_tl_matches_the_formula_on_random_sparse_changes() -> None:
    models = [sparse_change(A, 0.3, 21), sparse_change(A, 0.6, 22), sparse_change(A, 0.5, 23)]
    for params in ({}, {"r": 0.7, "alpha": 3.0}, {"r": 2.0, "alpha": 10.0, "epsilon": 0.3}):
        r, alpha, eps = params.get("r", 0.1), params.get("alpha", 0.2), params.get("epsilon", 1e-5)
        boosts = np_boosts(A, models, r, alpha, eps)
        assert len(set(boosts)) > 1 or params == {}
        out = run("ramplus_tl", models, params, [{}, {}, {}], base=A)
        np.testing.assert_allclose(out, np_ram(A, models, eps, boosts), **TOL)


def test_ramplus_tl_with_r_zero_is_ram() -> None:
    models = [sparse_change(A, 0.3, 31), sparse_change(A, 0.6, 32)]
    np.testing.assert_array_equal(
        run("ramplus_tl", models, {"r": 0.0}, [{}, {}], base=A), run("ram", models, {}, [{}, {}], base=A)
    )


# -- registry, parameters and config --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lo", "hi", "params"),
    [
        ("arcee_fusion", 1, 1, {}),
        ("ram", 1, None, {"epsilon": 1e-5}),
        ("ramplus_tl", 1, None, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    ],
)
def test_base_policy_model_counts_and_defaults_follow_mergekit(
    name: str, lo: int, hi: int | None, params: dict[str, float]
) -> None:
    m = REGISTRY[name]
    assert (m.base, m.min_models, m.max_models, m.random) == ("required", lo, hi, False)
    assert {i.key: i.default for i in m.param_infos} == params
    assert m.model_param_infos == []


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


def test_bad_values_and_model_counts_are_refused_at_config_time() -> None:
    two = "base_model: a\nmodels:\n  - model: b\n  - model: c\n"
    assert problems(f"merge_method: ram\n{two}parameters: {{epsilon: -0.1}}\n") == [
        "line 6: parameters.epsilon: -0.1 is outside [0, inf)"
    ]
    assert problems(f"merge_method: ramplus_tl\n{two}parameters: {{epsilon: 0}}\n") == [
        "line 6: parameters.epsilon: 0 is outside (0, inf)"
    ]
    assert problems(f"merge_method: ramplus_tl\n{two}parameters: {{alpha: -1}}\n") == [
        "line 6: parameters.alpha: -1 is outside [0, inf)"
    ]
    assert problems(f"merge_method: arcee_fusion\n{two}") == [
        "line 3: models: arcee_fusion takes a base_model and exactly 1 other model; found 2"
    ]
    assert problems("merge_method: ram\nmodels:\n  - model: a\n  - model: b\n") == [
        "line 1: base_model: ram needs a base_model: add base_model: <the model the others were fine-tuned from>"
    ]
    found = problems("merge_method: ram\nbase_model: a\nmodels:\n  - model: b\n    parameters: {wieght: 1}\n")
    assert found == [
        "line 5: models[0].parameters.wieght: unknown parameter for ram; its per-model parameters: none; "
        "its merge-wide parameters (top-level parameters:): epsilon"
    ]
    with pytest.warns(ConfigWarning):  # a parameter of other methods is ignored, as mergekit does
        cfg = load_config(
            "merge_method: ram\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1}\n"
        )
    assert cfg.warnings == (
        "line 5: models[0].parameters.weight: ram does not use weight, so it has no effect for b "
        "(mergekit accepts and ignores it too); remove it to silence this warning",
    )


def test_mergekit_configs_load_unchanged() -> None:
    # mergekit users list the base among the models
    cfg = load_config(
        "merge_method: arcee_fusion\nbase_model: base\nmodels:\n  - model: base\n  - model: other\ndtype: bfloat16\n"
    )
    assert cfg.method == "arcee_fusion"
    cfg = load_config(
        "merge_method: ramplus_tl\nbase_model: base\nmodels:\n  - model: base\n  - model: a\n  - model: b\n"
        "parameters:\n  r: 0.2\n  alpha: [0.1, 0.4]\n  epsilon: 1.0e-6\n"
    )
    assert cfg.method == "ramplus_tl"


# -- a merge through a YAML config ----------------------------------------------------------------


def test_merges_through_yaml_match_the_formulas(zoo: dict[str, Path], tmp_path: Path) -> None:
    src = {n: tiny.load_state(zoo[n]) for n in ("base", "a", "b")}
    configs = {
        "arcee_fusion": f"merge_method: arcee_fusion\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['base']}\n  - model: {zoo['a']}\ndtype: float32\n",
        "ram": f"merge_method: ram\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\n"
        f"  - model: {zoo['b']}\nparameters: {{epsilon: 0.02}}\ndtype: float32\n",
        "ramplus_tl": f"merge_method: ramplus_tl\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\n"
        f"  - model: {zoo['b']}\nparameters:\n  r: 0.5\n  alpha: [0.5, 2.0]\n  epsilon: 0.02\ndtype: float32\n",
    }
    for method, text in configs.items():
        out = tmp_path / method
        mergesmith.merge(text, out)
        merged = tiny.load_state(out)
        assert set(merged) == set(src["base"])
        for layer, alpha in ((0, 0.5), (2, 2.0)):
            name = f"model.layers.{layer}.mlp.up_proj.weight"
            base, a, b = (src[n][name].numpy() for n in ("base", "a", "b"))
            got = merged[name].numpy()
            if method == "arcee_fusion":
                expected = np_arcee_fusion(base, a)
                assert 0 < (got != base).mean() < 0.5
                # float32 rounding of the small KL divergences can flip entries within 1e-4 of
                # the threshold (relative); compare all the others
                scores, threshold = np_fusion_scores(base, a)
                clear = np.abs(scores - threshold) > 1e-4 * threshold
                assert clear.mean() > 0.99
                np.testing.assert_allclose(got[clear], expected[clear], rtol=1e-5, atol=1e-6)
                continue
            elif method == "ram":
                expected = np_ram(base, [a, b], 0.02)
            else:
                expected = np_ram(base, [a, b], 0.02, np_boosts(base, [a, b], 0.5, alpha, 0.02))
            torch.testing.assert_close(
                merged[name], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6
            )
