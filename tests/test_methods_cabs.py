"""CABS against its procedure, written out independently in numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError, load_config
from mergesmith.errors import MethodError
from mergesmith.methods import REGISTRY, MergeInputs
from mergesmith.methods.cabs import CabsModelParams, CabsParams, n_m_keep, pruning_sequence
from tests import tiny
from tests.test_merge import states
from tests.test_methods import run

rng = np.random.default_rng(23)


def normal(*shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def numpy_cabs(
    base: np.ndarray, models: list[np.ndarray], weights: list[float], sizes: list[tuple[int, int]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The merged tensor (float64) and each model's kept entries, block by block in plain loops."""
    flat_base = base.astype(np.float64).ravel()
    length = flat_base.size
    taken = np.zeros(length, dtype=bool)
    merged = flat_base.copy()
    kept_sets = []
    for model, w, (n, m) in zip(models, weights, sizes):
        delta = model.astype(np.float64).ravel() - flat_base
        kept = np.zeros(length, dtype=bool)
        for start in range(0, length, m):
            idx = np.arange(start, min(start + m, length))
            candidates = [j for j in idx if not taken[j] and delta[j] != 0]
            candidates.sort(key=lambda j: (-abs(delta[j]), j))  # largest first, lower index on ties
            for j in candidates[:n]:
                kept[j] = True
        merged += w * np.where(kept, delta, 0.0)
        taken |= kept
        kept_sets.append(kept.reshape(base.shape))
    return merged.reshape(base.shape), kept_sets


def model_params(weights: list[float], sizes: list[tuple[int, int] | None]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for w, s in zip(weights, sizes):
        out.append({"weight": w} if s is None else {"weight": w, "n_val": s[0], "m_val": s[1]})
    return out


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


# -- numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "sizes"),
    [
        ((8, 12), [(1, 4), (1, 4), (1, 4)]),
        ((8, 12), [(2, 8), (2, 8), (2, 8), (2, 8)]),
        ((6, 10), [(3, 4), (1, 4), (2, 4)]),  # more than the tensor holds: later models keep less
        ((5, 7), [(2, 6), (1, 3), (3, 5)]),  # per-model block sizes, none dividing 35
        ((64,), [(16, 64), (16, 64)]),
    ],
)
def test_matches_numpy(shape: tuple[int, ...], sizes: list[tuple[int, int]]) -> None:
    base = normal(*shape)
    models = [normal(*shape) for _ in sizes]
    weights = [1.2, 0.7, -0.4, 0.9][: len(sizes)]
    out = run("cabs", models, {}, model_params(weights, list(sizes)), base=base)
    expected, _ = numpy_cabs(base, models, weights, sizes)
    close(out, expected)


def test_defaults_are_one_of_every_four() -> None:
    base = normal(6, 8)
    models = [normal(6, 8) for _ in range(3)]
    out = run("cabs", models, {}, [{}, {}, {}], base=base)
    expected, kept = numpy_cabs(base, models, [1.0, 1.0, 1.0], [(1, 4)] * 3)
    close(out, expected)
    assert [int(k.sum()) for k in kept] == [12, 12, 12]


def test_merge_wide_defaults_apply_to_models_without_their_own_sizes() -> None:
    base = normal(4, 12)
    models = [normal(4, 12) for _ in range(3)]
    sizes: list[tuple[int, int] | None] = [None, (1, 3), None]
    out = run(
        "cabs",
        models,
        {"default_n_val": 2, "default_m_val": 6},
        model_params([1.0, 0.5, 2.0], sizes),
        base=base,
    )
    expected, _ = numpy_cabs(base, models, [1.0, 0.5, 2.0], [(2, 6), (1, 3), (2, 6)])
    close(out, expected)


@pytest.mark.parametrize("sizes", [[(1, 4)] * 4, [(2, 8), (3, 8), (1, 8)], [(2, 5), (1, 3), (4, 7)]])
def test_kept_sets_never_overlap_and_blocks_keep_exactly_n(sizes: list[tuple[int, int]]) -> None:
    base = normal(9, 11)  # 99 entries: no block size here divides it
    models = [normal(9, 11) for _ in sizes]
    weights = [1.0] * len(sizes)
    out = run("cabs", models, {}, model_params(weights, list(sizes)), base=base)
    expected, kept = numpy_cabs(base, models, weights, sizes)
    close(out, expected)
    moved = np.zeros(base.shape, dtype=int)
    for k in kept:
        moved += k
    assert moved.max() <= 1  # no entry kept twice
    # each model's kept entries are exactly where the merge moved by its weighted task vector
    delta_out = out.astype(np.float64).ravel() - base.astype(np.float64).ravel()
    union = np.logical_or.reduce([k.ravel() for k in kept])
    assert np.all(delta_out[~union] == 0)
    taken = np.zeros(base.size, dtype=bool)
    for (n, m), k, model in zip(sizes, kept, models):
        flat = k.ravel()
        available = ~taken & (model.ravel() != base.ravel())
        for start in range(0, base.size, m):
            block = slice(start, min(start + m, base.size))
            want = min(n, int(available[block].sum()))
            assert int(flat[block].sum()) == want, (n, m, start)
        taken |= flat


def test_a_block_keeps_its_largest_entries_and_later_models_take_what_is_left() -> None:
    base = np.zeros(8, dtype=np.float32)
    first = np.array([5, -4, 1, 0, 0, 2, -3, 1], dtype=np.float32)
    second = np.array([9, 1, -2, 3, 8, 7, 1, 1], dtype=np.float32)
    out = run("cabs", [first, second], {}, model_params([1.0, 10.0], [(2, 4), (2, 4)]), base=base)
    # block 0: first keeps 5 and -4; second keeps -2 and 3. block 1: first keeps -3 and 2; second 8, 1
    expected = np.array([5, -4, -20, 30, 80, 2, -3, 10], dtype=np.float32)
    np.testing.assert_array_equal(out, expected)


def test_equal_magnitudes_are_taken_lower_index_first() -> None:
    base = np.zeros(6, dtype=np.float32)
    first = np.array([1, -1, 1, 2, -2, 2], dtype=np.float32)
    second = np.full(6, 4, dtype=np.float32)
    out = run("cabs", [first, second], {}, model_params([1.0, 1.0], [(1, 3), (1, 3)]), base=base)
    np.testing.assert_array_equal(out, [1, 4, 0, 2, 4, 0])


def test_zero_entries_are_not_taken_and_stay_for_later_models() -> None:
    base = np.ones(4, dtype=np.float32)
    first = np.array([1, 1, 3, 1], dtype=np.float32)  # one non-zero task-vector entry in the block
    second = np.array([5, 7, 6, 1], dtype=np.float32)
    out = run("cabs", [first, second], {}, model_params([1.0, 1.0], [(2, 4), (2, 4)]), base=base)
    np.testing.assert_array_equal(out, [5, 7, 3, 1])


def test_a_zero_task_vector_keeps_nothing_and_leaves_everything_to_the_others() -> None:
    base, other = normal(4, 8), normal(4, 8)
    out = run("cabs", [base.copy(), other], {}, model_params([3.0, 0.5], [(2, 4), (2, 4)]), base=base)
    expected, kept = numpy_cabs(base, [base.copy(), other], [3.0, 0.5], [(2, 4), (2, 4)])
    close(out, expected)
    assert not kept[0].any() and int(kept[1].sum()) == 16


def test_one_model_is_its_n_m_pruned_task_vector() -> None:
    base, model = normal(3, 8), normal(3, 8)
    out = run("cabs", [model], {}, model_params([0.5], [(2, 4)]), base=base)
    delta = model.astype(np.float64) - base
    blocks = np.abs(delta).reshape(-1, 4)
    keep = np.zeros_like(blocks, dtype=bool)
    top = np.argsort(-blocks, axis=1, kind="stable")[:, :2]
    np.put_along_axis(keep, top, True, axis=1)
    close(out, base + 0.5 * np.where(keep.reshape(delta.shape), delta, 0.0))


def test_a_size_not_a_multiple_of_m_keeps_up_to_n_in_the_short_last_block() -> None:
    base = np.zeros(10, dtype=np.float32)
    model = np.arange(1, 11, dtype=np.float32)  # blocks [1..4], [5..8], [9, 10]
    out = run("cabs", [model], {}, model_params([1.0], [(3, 4)]), base=base)
    np.testing.assert_array_equal(out, [0, 2, 3, 4, 0, 6, 7, 8, 9, 10])
    out = run("cabs", [model], {}, model_params([1.0], [(1, 4)]), base=base)
    np.testing.assert_array_equal(out, [0, 0, 0, 4, 0, 0, 0, 8, 0, 10])


def test_n_equal_to_m_keeps_every_entry_not_yet_taken_and_n_zero_keeps_none() -> None:
    base = normal(4, 6)
    a, b = normal(4, 6), normal(4, 6)
    out = run("cabs", [a, b], {}, model_params([1.0, 1.0], [(6, 6), (6, 6)]), base=base)
    close(out, a)  # the first model takes every entry
    out = run("cabs", [a, b], {}, model_params([1.0, 1.0], [(0, 6), (6, 6)]), base=base)
    close(out, b)
    out = run("cabs", [a], {}, model_params([1.0], [(0, 3)]), base=base)
    np.testing.assert_array_equal(out, base)


def merge_named(
    models: list[np.ndarray], names: list[str], order: tuple[str, ...], weights: list[float]
) -> np.ndarray:
    method = REGISTRY["cabs"]
    inputs: MergeInputs[Any, Any] = MergeInputs(
        tensor_name="model.layers.0.mlp.up_proj.weight",
        base=torch.zeros(models[0].shape),
        tensors=[torch.tensor(m) for m in models],
        params=CabsParams(default_n_val=1, default_m_val=2, pruning_order=order),
        model_params=[CabsModelParams(weight=w) for w in weights],
        models=names,
    )
    return method.merge(inputs).numpy()


def test_named_models_go_sorted_by_name_or_in_pruning_order() -> None:
    a = np.array([2, 1], dtype=np.float32)
    b = np.array([3, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(merge_named([b, a], ["y", "x"], (), [1.0, 1.0]), [2, 0.5])
    np.testing.assert_array_equal(merge_named([a, b], ["x", "y"], ("y", "x"), [1.0, 1.0]), [3, 1])
    np.testing.assert_array_equal(
        merge_named([a, b], ["x", "y"], ("base", "y", "x", "y"), [1.0, 1.0]), [3, 1]
    )


def test_pruning_sequence() -> None:
    assert pruning_sequence(["m/b", "m/a", "m/c"], ()) == [1, 0, 2]
    assert pruning_sequence(["m/b", "m/a", "m/b"], ()) == [1, 0, 2]  # equal names keep their order
    assert pruning_sequence(["m/b", "m/a", "m/c"], ("m/c", "base", "m/b", "m/a")) == [2, 0, 1]
    assert pruning_sequence(["x", "y", "x"], ("y", "x", "y")) == [1, 0, 2]
    assert pruning_sequence([], ()) == []


def test_the_order_of_the_models_decides_who_keeps_a_shared_entry() -> None:
    base = np.zeros(2, dtype=np.float32)
    a = np.array([2, 1], dtype=np.float32)
    b = np.array([3, 0.5], dtype=np.float32)
    sizes = model_params([1.0, 1.0], [(1, 2), (1, 2)])
    np.testing.assert_array_equal(run("cabs", [a, b], {}, sizes, base=base), [2, 0.5])
    np.testing.assert_array_equal(run("cabs", [b, a], {}, sizes, base=base), [3, 1])


def test_large_tensors_are_handled_in_chunks_with_the_same_result() -> None:
    base = normal(3, 100_003)  # over the chunk size, and no block size divides it
    models = [normal(3, 100_003) for _ in range(2)]
    sizes = [(2, 7), (3, 7)]
    out = run("cabs", models, {}, model_params([1.0, 0.5], list(sizes)), base=base)
    flat_base = torch.tensor(base).reshape(-1).double()
    taken = torch.zeros(flat_base.numel(), dtype=torch.bool)
    expected = flat_base.clone()
    for model, w, (n, m) in zip(models, [1.0, 0.5], sizes):
        delta = torch.tensor(model).reshape(-1).double() - flat_base
        keep = n_m_keep(delta.abs().masked_fill(taken, -1.0), n, m)  # the whole tensor at once
        expected += w * delta * keep
        taken |= keep
    close(out, expected.reshape(base.shape).numpy())


def test_a_nan_in_a_task_vector_is_kept_so_that_it_reaches_the_result() -> None:
    base = np.zeros(4, dtype=np.float32)
    model = np.array([5, np.nan, 1, 2], dtype=np.float32)
    out = run("cabs", [model], {}, model_params([1.0], [(1, 4)]), base=base)
    assert np.isnan(out[1]) and (out[[0, 2, 3]] == 0).all()


def test_n_m_keep_on_a_hand_built_block() -> None:
    magnitude = torch.tensor([0.5, 3.0, -1.0, 3.0, 0.0, 0.0, 2.0])
    assert n_m_keep(magnitude, 2, 4).tolist() == [False, True, False, True, False, False, True]
    assert n_m_keep(magnitude, 4, 4).tolist() == [True, True, False, True, False, False, True]
    assert not n_m_keep(magnitude, 0, 4).any()


# -- parameters -------------------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


def test_bounds_are_refused_at_config_time() -> None:
    head = "merge_method: cabs\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n"
    assert problems(head + "parameters:\n  default_m_val: 0\n") == [
        "line 7: parameters.default_m_val: 0 is outside [1, inf)"
    ]
    assert problems(head + "parameters:\n  default_n_val: -1\n") == [
        "line 7: parameters.default_n_val: -1 is outside [0, inf)"
    ]
    found = problems(head + "parameters:\n  default_n_val: 1.5\n")
    assert found == ["line 7: parameters.default_n_val: expected a whole number, found 1.5"]
    found = problems(
        "merge_method: cabs\nbase_model: a\nmodels:\n  - model: b\n    parameters: {n_val: -2, m_val: 4}\n"
    )
    assert len(found) == 1 and "n_val: -2 is outside [-1, inf)" in found[0]


def test_a_base_model_is_required() -> None:
    found = problems("merge_method: cabs\nmodels:\n  - model: b\n  - model: c\n")
    assert len(found) == 1 and "base_model" in found[0]


@pytest.mark.parametrize(
    ("params", "models", "message"),
    [
        (
            CabsParams(default_n_val=5, default_m_val=4),
            [CabsModelParams()],
            "default_n_val must lie in [0, default_m_val]; found default_n_val=5, default_m_val=4",
        ),
        (
            CabsParams(),
            [CabsModelParams(), CabsModelParams(n_val=3, m_val=2)],
            "model 2 (counting the models other than the base in config order) keeps n_val entries of "
            "every block of m_val, so n_val must lie in [0, m_val]; found n_val=3, m_val=2",
        ),
        (
            CabsParams(),
            [CabsModelParams(n_val=2)],
            "model 1 (counting the models other than the base in config order) sets n_val without m_val",
        ),
        (
            CabsParams(),
            [CabsModelParams(m_val=8)],
            "model 1 (counting the models other than the base in config order) sets m_val without n_val",
        ),
    ],
)
def test_check_names_the_values(params: CabsParams, models: list[CabsModelParams], message: str) -> None:
    check = REGISTRY["cabs"].check
    assert check is not None
    trouble = check(params, models)
    assert trouble is not None and message in trouble
    assert check(CabsParams(), [CabsModelParams(), CabsModelParams(n_val=2, m_val=2)]) is None


def test_bad_sizes_are_refused_before_merging(zoo: dict[str, Path]) -> None:
    text = (
        f"merge_method: cabs\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['a']}\n"
        f"  - model: {zoo['b']}\n    parameters: {{n_val: 5, m_val: 4}}\ndtype: float32\n"
    )
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    assert "found n_val=5, m_val=4" in str(info.value)


def test_the_merge_function_refuses_sizes_that_skipped_the_check() -> None:
    with pytest.raises(MethodError, match=r"cabs needs 0 <= n <= m and m >= 1; found n=5, m=4"):
        run("cabs", [normal(2, 4)], {}, model_params([1.0], [(5, 4)]), base=normal(2, 4))


# -- end to end -------------------------------------------------------------------------------------


def tiny_config(zoo: dict[str, Path], order: list[str] | None = None) -> str:
    text = (
        f"merge_method: cabs\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['c']}\n    parameters: {{weight: 0.8}}\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 1.3, n_val: 3, m_val: 8}}\n"
        f"  - model: {zoo['b']}\n    parameters:\n      weight: 0.6\n"
        "parameters:\n  default_n_val: 2\n  default_m_val: 8\n"
        "  n_val: [{filter: layernorm, value: 1}]\n  m_val: [{filter: layernorm, value: 4}]\n"
    )
    if order is not None:
        text += "  pruning_order:\n" + "".join(f"    - {zoo[m]}\n" for m in order)
    return text + "dtype: float32\n"


@pytest.mark.parametrize("order", [None, ["c", "b", "base", "a"]])
def test_tiny_llama_merge_matches_numpy(
    order: list[str] | None, zoo: dict[str, Path], tmp_path: Path
) -> None:
    assert sorted(str(zoo[m]) for m in "abc") == [str(zoo[m]) for m in "abc"]
    out = tmp_path / "out"
    plan = mergesmith.merge(tiny_config(zoo, order), out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a", "b", "c"])
    assert sorted(merged) == sorted(j.name for j in plan.jobs)
    # without pruning_order the models go sorted by name (a, b, c), whatever the config's order
    sequence = [m for m in (order or ["a", "b", "c"]) if m != "base"]
    weight = {"c": 0.8, "a": 1.3, "b": 0.6}
    for name in merged:
        norm = "layernorm" in name
        size = {"a": (3, 8), "b": (1, 4) if norm else (2, 8), "c": (1, 4) if norm else (2, 8)}
        base = src["base"][name].numpy()
        expected, kept = numpy_cabs(
            base,
            [src[m][name].numpy() for m in sequence],
            [weight[m] for m in sequence],
            [size[m] for m in sequence],
        )
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert (sum(k.astype(int) for k in kept) <= 1).all()


def test_the_merge_order_changes_the_result(zoo: dict[str, Path], tmp_path: Path) -> None:
    mergesmith.merge(tiny_config(zoo), tmp_path / "sorted")
    mergesmith.merge(tiny_config(zoo, ["c", "b", "a"]), tmp_path / "given")
    name = "model.layers.0.mlp.up_proj.weight"
    first, second = tiny.load_state(tmp_path / "sorted")[name], tiny.load_state(tmp_path / "given")[name]
    assert not torch.equal(first, second)


def test_validate_shows_the_pruning_order(zoo: dict[str, Path]) -> None:
    text = mergesmith.validate(tiny_config(zoo, ["b", "c", "a"])).describe()
    assert f"pruning_order=[{zoo['b']}, {zoo['c']}, {zoo['a']}]" in text


def test_pruning_order_must_name_models_of_the_merge(zoo: dict[str, Path]) -> None:
    text = tiny_config(zoo, ["c", "a"]).replace(f"    - {zoo['a']}\n", f"    - {zoo['a']}\n    - ./nowhere\n")
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(text)
    assert "pruning_order names './nowhere', which is not a model of this merge" in str(info.value)
    assert str(zoo["b"]) in str(info.value)  # the names it could have used


def test_pruning_order_must_list_every_model(zoo: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as info:
        mergesmith.validate(tiny_config(zoo, ["c", "a"]))
    assert f"pruning_order leaves out {str(zoo['b'])!r}; list every model besides the base" in str(info.value)


def test_pruning_order_is_a_list_of_names_for_the_whole_merge() -> None:
    head = "merge_method: cabs\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n"
    found = problems(head + "parameters:\n  pruning_order: b\n")
    assert found == ["line 7: parameters.pruning_order: expected a list of model names, found 'b'"]
    found = problems(head + "parameters:\n  pruning_order: [b, 3]\n")
    assert found == ["line 7: parameters.pruning_order: expected a list of model names, found ['b', 3]"]
    found = problems(
        head.replace("  - model: c\n", "  - model: c\n    parameters: {pruning_order: [c, b]}\n")
    )
    assert len(found) == 1 and "pruning_order applies to the whole merge, not to one model" in found[0]
    config = load_config(head + "parameters:\n  pruning_order: [c, b]\n")
    assert config.method == "cabs"
