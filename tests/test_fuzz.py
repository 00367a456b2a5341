"""Property-based tests: whatever a config document or a safetensors header says, the parsers
either accept it or raise mergesmith's own errors, never anything else."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergesmith.config import load_config
from mergesmith.errors import CheckpointError, ConfigError
from mergesmith.sources import Checkpoint

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = [
    "merge_method", "base_model", "models", "model", "parameters", "slices", "sources", "layer_range",
    "dtype", "out_dtype", "tokenizer_source", "chat_template", "seed", "weight", "density", "t", "filter",
    "value", "normalize", "lambda", "gamma", "epsilon", "mode", "lora", "revision", "tokenizer",
]  # fmt: skip
METHODS = ["linear", "slerp", "ties", "dare_ties", "task_arithmetic", "passthrough", "model_stock", "nope"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([*METHODS, "float16", "bfloat16", "int8", "base", "union", "chatml", "paper", "./m", ""]),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
    ),
    max_leaves=25,
)
numbers = (
    st.floats(0.1, 1)
    | st.floats(0.1, 1)
    | st.floats(-2, 2)
    | st.integers(-1, 3)
    | st.lists(st.floats(0, 1), min_size=1, max_size=3)
)


# per method: (per-model parameters, merge-wide parameters, needs a base)
SHAPES = {
    "linear": (["weight"], ["normalize"], False),
    "task_arithmetic": (["weight"], ["lambda", "normalize"], True),
    "ties": (["weight", "density"], ["lambda", "normalize", "mode"], True),
    "dare_ties": (["weight", "density"], ["lambda", "rescale"], True),
    "slerp": ([], ["t"], True),
    "model_stock": ([], ["filter_wise"], True),
}


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible config, sometimes with a key replaced by anything: many examples are valid."""
    method = draw(st.sampled_from(sorted(SHAPES)))
    per_model, merge_wide, needs_base = SHAPES[method]
    names = draw(st.permutations(["./a", "org/b@main", "./c+./adapter", "x"]))[: draw(st.integers(1, 3))]
    models = [{"model": name, "parameters": {k: draw(numbers) for k in per_model}} for name in names]
    doc: dict[str, Any] = {"merge_method": method, "models": models}
    if needs_base or draw(st.booleans()):
        doc["base_model"] = "./base"
    doc["parameters"] = {
        k: draw(numbers | st.booleans() | st.sampled_from(["paper", "mergekit"])) for k in merge_wide
    }
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=1)):
        doc[key] = draw(values)
    return doc


documents = near_valid() | st.fixed_dictionaries(
    {"merge_method": st.sampled_from(METHODS) | scalars},
    optional={k: values for k in KEYS if k != "merge_method"},
)


@FUZZ
@given(documents)
def test_any_config_mapping_is_accepted_or_refused_with_a_config_error(doc: dict[str, Any]) -> None:
    try:
        load_config(doc)
    except ConfigError as exc:
        assert str(exc)


@FUZZ
@given(
    st.text(max_size=300)
    | st.sampled_from(["models: [", "merge_method: !!python/object:os.system {}", "a: *x"])
)
def test_any_yaml_text_is_accepted_or_refused_with_a_config_error(text: str) -> None:
    try:
        load_config(text + "\n")  # text with a newline is YAML, never a path
    except ConfigError as exc:
        assert str(exc)


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "X9", 7, None]
dims = st.integers(-2, 2**40) | st.sampled_from([0, 1, 2, 3, 4, 8])
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(DTYPES),
        "shape": st.lists(dims, max_size=4) | scalars,
        "data_offsets": st.lists(st.integers(-8, 2**41) | st.sampled_from([0, 4, 8, 16, 64]), max_size=3)
        | scalars,
    },
)
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def near_valid_header(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A consistent header (tensors packed back to back), then some entries bent; and its data size."""
    header: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = SIZES[dtype] * (1 if not shape else __import__("math").prod(shape))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    for name in draw(st.lists(st.sampled_from([*header, "__metadata__", "new"]), max_size=2)):
        header[name] = draw(entries | values)
    return header, offset


headers = st.dictionaries(
    st.text(min_size=1, max_size=8) | st.just("__metadata__"), entries | values, max_size=4
)


def _open_and_read(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "model.safetensors").write_bytes(raw)
        try:
            ckpt = Checkpoint(d)
        except CheckpointError as exc:
            assert str(exc)
            return
        for name in ckpt.keys():  # noqa: SIM118 - a Checkpoint is not a mapping
            info = ckpt.info(name)
            try:
                tensor = ckpt.get(name)
            except CheckpointError as exc:
                assert str(exc)
                continue
            assert tuple(tensor.shape) == tuple(info.shape)


@FUZZ
@given(
    near_valid_header() | headers.map(lambda h: (h, 0)),
    st.binary(max_size=32),
    st.sampled_from([0, 0, 0, 0, 0, -1, 1, 5]),
    st.integers(-8, 8),
)
def test_any_safetensors_header_opens_or_fails_with_a_checkpoint_error(
    header_and_size: tuple[dict[str, Any], int], extra: bytes, length_error: int, data_error: int
) -> None:
    header, size = header_and_size
    raw = json.dumps(header).encode()
    data = bytes(max(0, size + data_error)) + extra
    _open_and_read(struct.pack("<Q", max(0, len(raw) + length_error)) + raw + data)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_as_a_safetensors_file_fail_with_a_checkpoint_error(raw: bytes) -> None:
    _open_and_read(raw)
