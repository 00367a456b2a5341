"""PCB-merging against its formula, written out independently in numpy (float64)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mergesmith
from mergesmith import ConfigError, load_config
from mergesmith.methods import REGISTRY, MergeInputs, NoParams
from mergesmith.methods.pcb import PcbParams, kept_count
from mergesmith.methods.pcb import merge as pcb_merge
from tests import tiny
from tests.test_merge import states
from tests.test_methods import run

rng = np.random.default_rng(23)


def normal(*shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


BASE = normal(8, 6)
MODELS = [BASE + 0.1 * normal(8, 6) for _ in range(4)]


def numpy_norm(x: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1]; a constant vector scales to 0."""
    span = x.max() - x.min()
    if span == 0:
        return np.zeros_like(x)
    return (x - x.min()) / span


def numpy_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def numpy_scores(tvs: np.ndarray) -> np.ndarray:
    """b_i = softmax(N norm(t_i t_i)) * sum_j softmax(norm(t_i t_j)), one row per task vector."""
    n = tvs.shape[0]
    rows = []
    for i in range(n):
        intra = numpy_softmax(n * numpy_norm(tvs[i] * tvs[i]))
        inter = np.sum([numpy_softmax(numpy_norm(tvs[i] * tvs[j])) for j in range(n)], axis=0)
        rows.append(intra * inter)
    return np.array(rows)


def numpy_pcb(base: np.ndarray, models: list[np.ndarray], density: float, weight: float = 1.0) -> np.ndarray:
    base64 = base.astype(np.float64)
    tvs = np.stack([m.astype(np.float64) - base64 for m in models]).reshape(len(models), -1)
    d = tvs.shape[1]
    scores = numpy_scores(tvs)
    k = d if density >= 1 else max(1, math.floor(density * d))
    kept = np.zeros_like(scores)
    for i, row in enumerate(scores):
        top = np.argsort(-row, kind="stable")[:k]  # equal scores: lower index first
        kept[i, top] = row[top]
    divisor = kept.sum(axis=0)
    merged = np.where(divisor > 0, (kept * tvs).sum(axis=0) / np.where(divisor > 0, divisor, 1.0), 0.0)
    return base64 + weight * merged.reshape(base.shape)


def pcb(models: list[np.ndarray], density: float, weight: float = 1.0, base: np.ndarray = BASE) -> np.ndarray:
    return run("pcb", models, {"density": density, "weight": weight}, [{} for _ in models], base=base)


def close(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * float(np.abs(expected).max()))


# -- the formula ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.05])
def test_pcb_matches_numpy(count: int, density: float) -> None:
    models = MODELS[:count]
    close(pcb(models, density), numpy_pcb(BASE, models, density))


@pytest.mark.parametrize("weight", [0.0, 0.7, 1.5, -1.0])
def test_pcb_weight_scales_the_merged_task_vector(weight: float) -> None:
    close(pcb(MODELS[:3], 0.3, weight), numpy_pcb(BASE, MODELS[:3], 0.3, weight))
    unit = pcb(MODELS[:3], 0.3) - BASE
    close(pcb(MODELS[:3], 0.3, weight) - BASE, weight * unit.astype(np.float64))


def test_pcb_matches_numpy_on_a_3d_tensor_with_larger_task_vectors() -> None:
    base = normal(3, 4, 5)
    models = [base + s * normal(3, 4, 5) for s in (0.5, 1.0, 2.0)]
    close(pcb(models, 0.4, base=base), numpy_pcb(base, models, 0.4))


def test_pcb_on_a_hand_worked_pair() -> None:
    # task vectors [1, 0] and [0, 1], N = 2, nothing dropped:
    #   intra_1 = softmax(2 * [1, 0]) = [e^2, 1] / (e^2 + 1)
    #   inter_1 = softmax([1, 0]) + softmax(norm([0, 0]) = [0, 0]) = [e, 1] / (e + 1) + [1/2, 1/2]
    # and model 2 is the mirror image; entry 0 is model 1's 1 weighted by b_1[0] over b_1[0] + b_2[0]
    e = math.e
    b_high = e**2 / (e**2 + 1) * (e / (e + 1) + 0.5)
    b_low = 1 / (e**2 + 1) * (1 / (e + 1) + 0.5)
    share = b_high / (b_high + b_low)
    base = np.zeros(2, dtype=np.float32)
    out = pcb(
        [np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)], 1.0, base=base
    )
    np.testing.assert_allclose(out, [share, share], rtol=1e-6)
    # keeping one entry per model drops each model's 0, so each entry is that model's 1 alone
    out = pcb(
        [np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)], 0.5, base=base
    )
    np.testing.assert_array_equal(out, [1.0, 1.0])


def test_pcb_scores_prefer_large_entries_that_other_tasks_share() -> None:
    # entries 0 and 1 of model 1 are equally large; only entry 1 is large in model 2 as well, so the
    # inter-balancing term ranks it first and, keeping one entry, model 1 keeps entry 1
    base = np.zeros(4, dtype=np.float32)
    m1 = np.array([2.0, 2.0, 0.1, 0.0], dtype=np.float32)
    m2 = np.array([0.0, 2.0, 0.0, 0.1], dtype=np.float32)
    scores = numpy_scores(np.stack([m1, m2]).astype(np.float64))
    assert scores[0, 1] > scores[0, 0]
    np.testing.assert_allclose(pcb([m1, m2], 0.25, base=base), [0.0, 2.0, 0.0, 0.0], rtol=1e-6)


# -- edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_pcb_of_one_model_keeps_its_largest_entries(density: float) -> None:
    # with one model both scores grow with the entry's square, so the drop keeps the largest |delta|
    model = MODELS[0]
    delta = (model.astype(np.float64) - BASE).ravel()
    k = kept_count(density, delta.size)
    keep = np.zeros(delta.size, dtype=bool)
    keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
    close(pcb([model], density, 0.8), BASE + 0.8 * np.where(keep, delta, 0.0).reshape(BASE.shape))


def test_pcb_of_identical_models_is_that_model_trimmed() -> None:
    model = MODELS[1]
    close(pcb([model, model, model], 1.0), model.astype(np.float64))
    close(pcb([model, model], 0.5), pcb([model], 0.5).astype(np.float64))


def test_pcb_with_every_task_vector_zero_is_the_base() -> None:
    np.testing.assert_array_equal(pcb([BASE.copy(), BASE.copy()], 0.3), BASE)
    np.testing.assert_array_equal(pcb([BASE.copy()], 1.0), BASE)


def test_a_zero_task_vector_still_competes_and_dilutes_the_others() -> None:
    # a zero task vector's scores are uniform (its products are constant): it takes part in the
    # rescaling with weight but adds nothing, which pulls each entry towards the base
    models = [MODELS[0], BASE.copy()]
    out = pcb(models, 1.0)
    close(out, numpy_pcb(BASE, models, 1.0))
    moved = np.abs(out.astype(np.float64) - BASE)
    assert np.all(moved < np.abs(MODELS[0].astype(np.float64) - BASE) - 1e-6)
    close(pcb([*MODELS[:2], BASE.copy()], 0.3), numpy_pcb(BASE, [*MODELS[:2], BASE.copy()], 0.3))


def test_pcb_entries_no_model_keeps_stay_the_base() -> None:
    base = normal(10)
    m1, m2 = base.copy(), base.copy()
    m1[2] += 5.0
    m2[7] -= 3.0
    m1[[0, 4]] += 0.01
    m2[[1, 5]] -= 0.01
    out = pcb([m1, m2], 0.1, base=base)  # one entry each: model 1 keeps entry 2, model 2 entry 7
    expected = base.astype(np.float64)
    expected[2] += 5.0
    expected[7] -= 3.0
    close(out, expected)
    assert np.array_equal(np.delete(out, [2, 7]), np.delete(base, [2, 7]))


def test_pcb_equal_scores_are_kept_in_index_order() -> None:
    base = np.zeros(4, dtype=np.float32)
    model = np.array([1.0, -1.0, 1.0, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(pcb([model], 0.5, base=base), [1.0, -1.0, 0.0, 0.0])
    np.testing.assert_array_equal(pcb([model], 0.75, base=base), [1.0, -1.0, 1.0, 0.0])


def test_pcb_keeps_at_least_one_entry_and_all_of_them_at_density_one() -> None:
    assert kept_count(1.0, 48) == 48
    assert kept_count(0.5, 48) == 24
    assert kept_count(0.35, 10) == 3
    assert kept_count(0.01, 48) == 1
    assert kept_count(1e-9, 1) == 1
    base = np.zeros(5, dtype=np.float32)
    model = np.array([0.5, -4.0, 1.0, 3.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(pcb([model], 0.01, base=base), [0.0, -4.0, 0.0, 0.0, 0.0])
    close(pcb(MODELS[:3], 1.0), numpy_pcb(BASE, MODELS[:3], 1.0))
    # keeping everything, each entry is a weighted mean of the task vectors: between their extremes
    tvs = np.stack([m.astype(np.float64) - BASE for m in MODELS[:3]])
    merged = pcb(MODELS[:3], 1.0) - BASE
    assert np.all(merged >= tvs.min(axis=0) - 1e-6) and np.all(merged <= tvs.max(axis=0) + 1e-6)


def test_pcb_of_a_single_entry_tensor_is_the_score_weighted_mean() -> None:
    # one entry: every softmax is 1, so intra is 1, inter is N, and the entry is the plain mean
    base = np.array([1.0], dtype=np.float32)
    out = pcb([np.array([2.0], dtype=np.float32), np.array([5.0], dtype=np.float32)], 0.5, base=base)
    np.testing.assert_allclose(out, [1.0 + (1.0 + 4.0) / 2], rtol=1e-6)


def test_pcb_works_in_float64_and_leaves_an_empty_tensor_alone() -> None:
    base64, models64 = BASE.astype(np.float64), [m.astype(np.float64) for m in MODELS[:3]]
    inputs: MergeInputs[PcbParams, NoParams] = MergeInputs(
        tensor_name="model.layers.0.mlp.up_proj.weight",
        base=torch.tensor(base64),
        tensors=[torch.tensor(m) for m in models64],
        params=PcbParams(density=0.4, weight=1.0),
        model_params=[NoParams()] * 3,
    )
    out = pcb_merge(inputs)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), numpy_pcb(base64, models64, 0.4), rtol=1e-12, atol=1e-12)
    empty = np.zeros((0, 3), dtype=np.float32)
    assert pcb([empty, empty], 0.5, base=empty).shape == (0, 3)


# -- parameters -----------------------------------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


HEAD = "merge_method: pcb\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n"


def test_pcb_is_registered_with_mergekits_parameter_names() -> None:
    method = REGISTRY["pcb"]
    assert method.base == "required" and method.paper == "https://arxiv.org/abs/2410.02396"
    shared = {i.key: i for i in method.param_infos}
    assert set(shared) == {"density", "weight"}
    assert shared["density"].required and shared["density"].bounds_text() == "(0, 1]"
    assert shared["weight"].default == 1.0
    assert method.model_param_infos == []
    config = load_config(HEAD + "parameters:\n  density: 0.2\n  weight: 0.9\n")
    assert config.method == "pcb"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("parameters:\n  density: 0\n", "line 7: parameters.density: 0 is outside (0, 1]"),
        ("parameters:\n  density: 1.5\n", "line 7: parameters.density: 1.5 is outside (0, 1]"),
        ("parameters:\n  density: -0.2\n", "line 7: parameters.density: -0.2 is outside (0, 1]"),
        ("parameters:\n  density: [0.5, 1.2]\n", "line 7: parameters.density[1]: 1.2 is outside (0, 1]"),
        (
            "parameters:\n  density: 0.5\n  weight: x\n",
            "line 8: parameters.weight: expected a number, found 'x'",
        ),
    ],
)
def test_pcb_refuses_parameters_out_of_range(extra: str, expected: str) -> None:
    found = problems(HEAD + extra)
    assert found == [expected]


def test_pcb_needs_a_density_and_a_base_model() -> None:
    found = problems(HEAD)
    assert found == [
        "line 1: parameters.density: missing: pcb needs density (fraction of each task vector's entries kept, "
        "highest balancing score first); add it under parameters:"
    ]
    found = problems("merge_method: pcb\nmodels:\n  - model: b\n  - model: c\nparameters:\n  density: 0.5\n")
    assert len(found) == 1 and "pcb needs a base_model" in found[0]


def test_pcb_weight_is_merge_wide() -> None:
    text = "merge_method: pcb\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 0.5}\n"
    found = problems(text + "parameters:\n  density: 0.5\n")
    assert found == [
        "line 5: models[0].parameters.weight: weight applies to the whole merge, not to one model: "
        "move it to the top-level parameters"
    ]


# -- end to end -----------------------------------------------------------------------------------

LAYER_TENSORS = [
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
]
OTHER_TENSORS = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]


def pcb_config(zoo: dict[str, Path], parameters: str) -> str:
    return (
        f"merge_method: pcb\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n  - model: {zoo['b']}\n  - model: {zoo['c']}\n"
        f"parameters: {parameters}\ndtype: float32\n"
    )


def expected_tensor(
    src: dict[str, dict[str, torch.Tensor]], name: str, density: float, weight: float
) -> np.ndarray:
    return numpy_pcb(src["base"][name].numpy(), [src[m][name].numpy() for m in "abc"], density, weight)


def test_tiny_llama_merge_matches_numpy(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    mergesmith.merge(pcb_config(zoo, "{density: 0.3, weight: 0.8}"), out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a", "b", "c"])
    assert merged.keys() == src["base"].keys()
    for name in LAYER_TENSORS + OTHER_TENSORS:
        close(merged[name].numpy(), expected_tensor(src, name, 0.3, 0.8))
        assert not np.array_equal(merged[name].numpy(), src["base"][name].numpy()), name


def test_tiny_llama_merge_follows_a_density_gradient_across_the_layers(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    mergesmith.merge(pcb_config(zoo, "{density: [0.2, 1.0]}"), out)
    merged = tiny.load_state(out)
    src = states(zoo, ["base", "a", "b", "c"])
    # three layers at t = 0, 0.5, 1; tensors outside the layers take the gradient's start
    for layer, density in [(0, 0.2), (1, 0.6), (2, 1.0)]:
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        close(merged[name].numpy(), expected_tensor(src, name, density, 1.0))
    close(merged["lm_head.weight"].numpy(), expected_tensor(src, "lm_head.weight", 0.2, 1.0))
    # the densities differ, so the layers keep different fractions of the base's entries unchanged
    unchanged = [
        float(
            np.mean(
                merged[f"model.layers.{i}.mlp.up_proj.weight"].numpy()
                == src["base"][f"model.layers.{i}.mlp.up_proj.weight"].numpy()
            )
        )
        for i in range(3)
    ]
    assert unchanged[0] > unchanged[1] > unchanged[2] == 0.0
