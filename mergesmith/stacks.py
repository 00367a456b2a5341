"""The layer stacks of a model, its vocabulary tensors and its tied weights, derived from the model's
own definition.

A model is more than one stack of layers: a vision-language model has a vision encoder beside its
text decoder, a sequence-to-sequence model an encoder and a decoder. Each stack has its own layer
positions, so a gradient or a slice must count layers within the stack a tensor belongs to.

Where transformers knows the config's ``model_type``, the model is built on the meta device (no
memory, no weights) from the checkpoint's own config.json, and its outermost ``ModuleList``s are its
stacks; the checkpoint's tensor names are mapped to the definition's with transformers' own loading
renames, so legacy and current layouts are both understood. Otherwise the stacks are read from the
tensor names alone: each distinct name prefix before a ``layers``/``h``/``blocks``/``block``/
``layer`` index is one stack.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CHECKED_TYPES", "Derived", "Stack", "derivable_types", "derive", "from_names"]

# names of config values that count layers, blocks or experts: a value past this is no real model,
# and building such a definition, even on the meta device, would take a very long time
MAX_COUNT = 4096
_COUNT_KEY = re.compile(r"layer|depth|block|expert|n_layer")

# a tensor-name segment that holds a stack's index, for models transformers does not know
_STACK_NAME = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|block|layer)$")

# the transformers task classes tried, in order, when config.json names none transformers has
_AUTO_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)


# the model types the test suite saves with transformers and merges with a gradient, stack by stack
CHECKED_TYPES = (
    "llama",
    "qwen2",
    "qwen3",
    "gemma3",
    "qwen2_vl",
    "qwen2_5_vl",
    "llava",
    "idefics3",
    "mllama",
    "t5",
    "bart",
    "whisper",
    "bert",
    "mixtral",
    "qwen3_moe",
    "deepseek_v3",
    "jamba",
    "falcon_h1",
    "lfm2",
)


@dataclass(frozen=True)
class Stack:
    """One stack of layers: the tensors named ``{prefix}.{index}.…``."""

    prefix: str
    count: int | None = None  # layers in the definition (None: known from the tensors only)
    count_key: str | None = None  # the dotted config.json path holding the count


@dataclass(frozen=True)
class Derived:
    """What the model's definition says about its tensors, in the checkpoint's own names."""

    source: str  # where it came from: "transformers LlavaForConditionalGeneration" or "tensor names"
    stacks: tuple[Stack, ...]
    vocab: tuple[str, ...] = ()  # tensors with one row (or column) per token
    pre: tuple[str, ...] = ()  # tensors before every stack (the input embeddings)
    tied: dict[str, str] = field(default_factory=dict)  # a tensor and the one it shares storage with


def derive(config: dict[str, Any], keys: Sequence[str]) -> Derived:
    """The stacks of the checkpoint with this config.json and these tensor names."""
    found = _from_transformers(config, keys)
    return found if found is not None else from_names(keys)


# -- from tensor names -------------------------------------------------------------------------------


def _first_index(name: str) -> tuple[str, str] | None:
    """The prefix before the first all-digit segment of a tensor name, and that segment."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[:i]), part
    return None


def from_names(keys: Sequence[str]) -> Derived:
    """The stacks the tensor names show, without any model definition."""
    prefixes: dict[str, None] = {}
    for name in keys:
        found = _first_index(name)
        if found is not None and _STACK_NAME.match(found[0]):
            prefixes.setdefault(found[0])
    return Derived(source="tensor names", stacks=tuple(Stack(p) for p in _outermost(prefixes)))


def _outermost(prefixes: Iterable[str]) -> list[str]:
    """The prefixes not inside another one's layers."""
    ordered = list(prefixes)
    return [p for p in ordered if not any(p != q and p.startswith(q + ".") for q in ordered)]


# -- from the transformers definition --------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _too_big(value: Any, key: str = "", depth: int = 0) -> bool:
    """Whether a config asks for more layers, blocks or experts than any model has."""
    if depth > 4:
        return False
    if isinstance(value, dict):
        return any(_too_big(v, str(k), depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return len(value) > MAX_COUNT or any(_too_big(v, key, depth + 1) for v in value)
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and bool(_COUNT_KEY.search(key))
        and value > MAX_COUNT
    )


def _model_class(transformers: Any, model_type: str, architectures: Any) -> Any:
    """The transformers class config.json names, else the first task class for its model type."""
    from transformers.models.auto import modeling_auto

    names: list[str] = []
    if isinstance(architectures, list):
        names += [a for a in architectures if isinstance(a, str)]
    for mapping in _AUTO_MAPPINGS:
        entry = getattr(modeling_auto, mapping, {}).get(model_type)
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, (list, tuple)):
            names += [e for e in entry if isinstance(e, str)]
    for name in names:
        cls = getattr(transformers, name, None) if name.isidentifier() else None
        config_class = getattr(cls, "config_class", None) if isinstance(cls, type) else None
        if getattr(config_class, "model_type", None) == model_type:
            return cls
    return None


def derivable_types() -> tuple[str, tuple[str, ...]] | None:
    """The installed transformers' version and the model types it defines a model class for (the
    types whose stacks are derived from their definition), or None without transformers."""
    try:
        import transformers
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    available = set(dir(transformers))
    types: set[str] = set()
    for mapping in _AUTO_MAPPINGS:
        for model_type, entry in getattr(modeling_auto, mapping, {}).items():
            names = [entry] if isinstance(entry, str) else list(entry)
            if any(isinstance(n, str) and n in available for n in names):
                types.add(model_type)
    return str(transformers.__version__), tuple(sorted(types))


def _build(config: dict[str, Any]) -> Any:
    """A meta-device instance of the model config.json describes, or None."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    cls = _model_class(transformers, model_type, config.get("architectures"))
    if cls is None:
        return None
    settings = _floats({k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")})
    hf_config = CONFIG_MAPPING[model_type].from_dict(settings)
    with torch.device("meta"):
        return cls._from_config(hf_config)


def _floats(value: Any) -> Any:
    """config.json as transformers reads it: ``{"__float__": "Infinity"}`` is the number it stands for."""
    if isinstance(value, dict):
        tag = value.get("__float__") if len(value) == 1 else None
        if tag in ("Infinity", "-Infinity", "NaN"):
            return float(tag.lower().replace("infinity", "inf"))
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


def _from_transformers(config: dict[str, Any], keys: Sequence[str]) -> Derived | None:
    if _too_big(config):
        return None
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return None
    with _quiet():
        try:
            model = _build(config)
        except Exception:  # a config transformers cannot build: the tensor names decide
            return None
        if model is None:
            return None
        return _read_definition(model, config, keys)


def _stack_paths(model: Any) -> dict[str, int]:
    """The module paths of the model's outermost ModuleLists of layers, with their lengths."""
    import torch

    stacks: dict[str, int] = {}
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0 or not path:
            continue
        if any(path.startswith(p + ".") for p in stacks):
            continue  # inside a layer of an outer stack: experts, sub-blocks
        if not any(True for _ in module.parameters()):
            continue
        stacks[path] = len(module)
    return stacks


def _renamer(model: Any) -> Callable[[str], str]:
    """A function from a checkpoint tensor name to the definition's name, as transformers loads it."""
    state = dict.fromkeys(model.state_dict(keep_vars=True), True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: one table of regular expressions on the model class
        table = getattr(model, "_checkpoint_conversion_mapping", None) or {}

        def rename_v4(name: str) -> str:
            for pattern, replacement in table.items():
                name, hits = re.subn(pattern, replacement, name)
                if hits:
                    break
            if name not in state and prefix and f"{prefix}.{name}" in state:
                return f"{prefix}.{name}"
            return name

        return rename_v4

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(name: str) -> str:
        try:
            return rename_source_key(name, renamings, converters, prefix or None, state)[0]
        except Exception:  # a name no transform expects keeps its own
            return name

    return rename


def _read_definition(model: Any, config: dict[str, Any], keys: Sequence[str]) -> Derived | None:
    paths = _stack_paths(model)
    rename = _renamer(model)
    found: dict[str, str] = {}  # checkpoint prefix -> definition path
    to_checkpoint: dict[str, str] = {}
    for name in keys:
        renamed = rename(name)
        to_checkpoint.setdefault(renamed, name)
        path = next((p for p in paths if renamed.startswith(p + ".")), None)
        if path is None:
            continue
        index = renamed[len(path) + 1 :].split(".", 1)[0]
        if not index.isdigit():
            continue
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part == index and i > 0), None)
        if at is None:
            return None  # a layout the renames do not explain: the tensor names decide
        prefix = ".".join(parts[:at])
        if found.setdefault(prefix, path) != path:
            return None
    if not found:
        return None

    embed_path = _param_path(model, "get_input_embeddings")
    stacks = [
        Stack(prefix, paths[path], _count_key(model, config, path, paths[path]))
        for prefix, path in sorted(
            found.items(), key=lambda item: (-_shared_depth(item[1], embed_path), list(paths).index(item[1]))
        )
    ]
    tied, vocab = _ties_and_vocab(model, to_checkpoint)
    embeds = [to_checkpoint.get(embed_path, embed_path)] if embed_path else []
    pre = tuple(dict.fromkeys(embeds + [a for a, b in tied.items() if b in embeds]))
    return Derived(
        source=f"transformers {type(model).__name__}",
        stacks=tuple(stacks),
        vocab=vocab,
        pre=pre,
        tied=tied,
    )


def _shared_depth(path: str, other: str | None) -> int:
    """How many leading name segments two module paths share."""
    if other is None:
        return 0
    depth = 0
    for a, b in zip(path.split("."), other.split(".")):
        if a != b:
            break
        depth += 1
    return depth


def _param_path(model: Any, getter: str, attr: str = "weight") -> str | None:
    """The name of a parameter (``weight``, ``bias``) of the module a getter returns (the embeddings)."""
    try:
        module = getattr(model, getter)()
    except Exception:
        return None
    param = getattr(module, attr, None)
    if param is None:
        return None
    return next((n for n, p in model.named_parameters(remove_duplicate=False) if p is param), None)


def _ties_and_vocab(model: Any, to_checkpoint: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Tensors sharing storage (after transformers ties them), and the vocabulary tensors."""
    with contextlib.suppress(Exception):
        model.tie_weights()
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)

    def shown(name: str) -> str:
        return to_checkpoint.get(name, name)

    tied: dict[str, str] = {}
    for names in groups.values():
        if len(names) > 1:
            kept = next((n for n in names if n in to_checkpoint), names[0])
            for n in names:
                if n != kept:
                    tied[shown(n)] = shown(kept)
    vocab: list[str] = []
    for getter, attr in (
        ("get_input_embeddings", "weight"),
        ("get_output_embeddings", "weight"),
        ("get_output_embeddings", "bias"),
    ):
        path = _param_path(model, getter, attr)
        if path is not None:
            same = next((g for g in groups.values() if path in g), [path])
            vocab += [shown(n) for n in same]
    return tied, tuple(dict.fromkeys(vocab))


def _count_key(model: Any, config: dict[str, Any], path: str, count: int) -> str | None:
    """The config.json path (``vision_config.depth``) that sets how many layers a stack has: the one
    key with that value, or where several have it, the one whose change changes the stack."""
    candidates = [key for key, value in _int_paths(config) if value == count and _COUNT_KEY.search(key)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    for key in candidates[:6]:
        changed = copy.deepcopy(config)
        _set(changed, key, count + 1, count)
        try:
            probe = _build(changed)
        except Exception:
            continue
        stack = dict(probe.named_modules()).get(path) if probe is not None else None
        if stack is not None and len(stack) == count + 1:
            return key
    return None


def _int_paths(config: dict[str, Any], prefix: str = "", depth: int = 0) -> Iterator[tuple[str, int]]:
    for key, value in config.items():
        if isinstance(value, dict) and depth < 2:
            yield from _int_paths(value, f"{prefix}{key}.", depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _set(config: dict[str, Any], path: str, value: int, count: int) -> None:
    """Set a layer count one higher, and lengthen the per-layer lists beside it to match."""
    *parents, last = path.split(".")
    for key in parents:
        config = config[key]
    config[last] = value
    for key, entry in config.items():
        if isinstance(entry, list) and len(entry) == count and entry:
            config[key] = [*entry, entry[-1]]
