"""Whether the input models fit together: their ``config.json`` settings, tokenizers, layer counts,
and each input tensor's name, shape and dtype against the reference model's.

Planning records every problem it finds in :class:`Problems` and reports them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergesmith import vocab
from mergesmith.architecture import Architecture, compatibility_keys, layer_count_keys
from mergesmith.config import MergeConfig, ModelRef
from mergesmith.sources import ModelSource, TensorInfo

__all__ = [
    "ALIGN_HINT",
    "EXTRA_LAYER_KEYS",
    "VOCAB_SIZE_KEYS",
    "Compatibility",
    "Problems",
    "get_path",
    "set_path",
]

ALIGN_HINT = (
    "Set tokenizer_source (base, union or one model's name) to match embedding rows by token, or "
    "merge models that share one tokenizer"
)

# where config.json holds the vocabulary size: the top level, or a vision-language model's text_config
VOCAB_SIZE_KEYS = ("vocab_size", "text_config.vocab_size")

# config.json keys that count layers a checkpoint stores after the ``num_hidden_layers`` decoder
# layers, under the next layer numbers: the multi-token-prediction layers of DeepSeek-V3, GLM-4.5
# and MiMo (``model.layers.61`` of DeepSeek-V3's 61 layers). transformers does not build them.
EXTRA_LAYER_KEYS = ("num_nextn_predict_layers",)


class Problems:
    """The problems found while planning, each recorded once: those of the models, and those the
    config, not the models, must fix."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.config: list[str] = []
        self._seen: set[str] = set()

    def __call__(self, text: str, key: str | None = None, *, config: bool = False) -> None:
        """Record a problem once (by ``key``, else its text); ``config`` marks one of the config."""
        key = key or text
        if key not in self._seen:
            self._seen.add(key)
            (self.config if config else self.models).append(text)


class Compatibility:
    """The input models' tensors as planning sees them (names with tied weights resolved, the layers
    they hold) and the checks that the models fit together, each problem recorded in ``problem``."""

    def __init__(self, refs: Sequence[ModelRef], models: Sequence[ModelSource], problem: Problems) -> None:
        self.refs = refs
        self.models = models
        self.problem = problem
        self.misfits: set[int] = set()  # models whose config.json already disagrees
        self._key_cache: dict[int, set[str]] = {}
        self._layer_cache: dict[tuple[str, int], list[int]] = {}

    # -- config.json and tokenizers -------------------------------------------------------------

    def check_configs(self, config: MergeConfig, reference: int) -> None:
        """The models' config.json settings that decide tensor sizes must agree with the reference
        model's; without tokenizer_source, so must their vocabularies."""
        ref_model = self.models[reference]
        ref_cfg = ref_model.config
        keys = list(compatibility_keys())
        if config.slices is None:
            keys += layer_count_keys()
        for i, model in enumerate(self.models):
            if i == reference or not model.config or not ref_cfg:
                continue
            for key in keys:
                a, b = ref_cfg.get(key), model.config.get(key)
                if a is not None and b is not None and a != b:
                    what = "architectures" if key == "model_type" else "sizes"
                    self.misfits.add(i)
                    self.problem(
                        f"{key}: {self.refs[i]} ({model.dir / 'config.json'}) has {b!r}, but "
                        f"{self.refs[reference]} has {a!r}: these models have different {what} and "
                        "cannot be merged tensor by tensor; merge only fine-tunes of one base model"
                    )
            for key in VOCAB_SIZE_KEYS:  # a vision-language model keeps it in its text_config
                a, b = (
                    get_path(ref_cfg, key.rpartition(".")[0]).get("vocab_size"),
                    get_path(model.config, key.rpartition(".")[0]).get("vocab_size"),
                )
                if a is not None and b is not None and a != b and config.tokenizer_source is None:
                    self.problem(
                        f"{key}: {self.refs[i]} has {b}, but {self.refs[reference]} has {a}: the "
                        "vocabularies differ (added tokens?); merging embeddings row by row would mix "
                        f"unrelated tokens. {ALIGN_HINT}",
                        key="vocab-size",
                    )
        if config.tokenizer_source is None:
            self.check_same_tokens()

    def check_same_tokens(self) -> None:
        """Without tokenizer_source, the models' tokenizers must give every token the same id."""
        vocabs = [(i, vocab.read_vocab(m.dir)) for i, m in enumerate(self.models)]
        known = [(i, v) for i, v in vocabs if v is not None]
        for i, v in known[1:]:
            j, first = known[0]
            moved = [t for t, k in first.ids.items() if v.ids.get(t, k) != k]
            if moved:
                t = moved[0]
                self.problem(
                    f"tokenizers differ: {t!r} is token {first.ids[t]} in {self.refs[j]} ({first.file}) but "
                    f"{v.ids[t]} in {self.refs[i]} ({v.file}), and {len(moved) - 1} more; merging embeddings "
                    f"row by row would mix unrelated tokens. {ALIGN_HINT}",
                    key="vocab-size",
                )
                return

    # -- tensors and layers ---------------------------------------------------------------------

    def lookup(self, arch: Architecture, model: int, name: str) -> str | None:
        """The name under which ``model`` stores tensor ``name`` (tied weights resolved), or None."""
        keys = self._keys(model)
        if name in keys:
            return name
        alias = arch.tied.get(name)
        if alias is not None and alias in keys:
            return alias
        return None

    def _keys(self, model: int) -> set[str]:
        if model not in self._key_cache:
            self._key_cache[model] = set(self.models[model].keys())
        return self._key_cache[model]

    def tensor_layers(self, arch: Architecture, model: int) -> list[int]:
        """The layer indices ``model``'s tensors hold, sorted."""
        key = (arch.name, model)  # a module's layer stack is its own
        if key not in self._layer_cache:
            found = {arch.layer_of(n) for n in self._keys(model)}
            self._layer_cache[key] = sorted(n for n in found if n is not None)
        return self._layer_cache[key]

    def layer_count(self, arch: Architecture, model: int) -> int:
        """How many layers ``model``'s tensors hold (one past the highest layer index)."""
        layers = self.tensor_layers(arch, model)
        return layers[-1] + 1 if layers else 0

    def first_missing_layer(self, arch: Architecture, model: int, start: int, end: int) -> int | None:
        """The first layer in ``[start, end)`` that ``model`` has no tensor of, or None."""
        expected = start
        for layer in self.tensor_layers(arch, model):
            if layer < start:
                continue
            if layer >= end or layer != expected:
                break
            expected += 1
        return expected if expected < end else None

    def declared_layers(self, arch: Architecture, model: int) -> int | None:
        """config.json's count of ``model``'s layers in ``arch``'s stack, the extra layers after
        them (:data:`EXTRA_LAYER_KEYS`) left out."""
        return arch.num_layers(self.models[model].config)

    def extra_layers(self, arch: Architecture, model: int) -> int:
        """Layers ``model`` stores after its decoder layers (:data:`EXTRA_LAYER_KEYS`), in the main
        stack only."""
        if arch.num_layers_key not in ("num_hidden_layers", "text_config.num_hidden_layers"):
            return 0
        config = self.models[model].config
        section = get_path(config, arch.num_layers_key.rpartition(".")[0])
        counts = [section.get(k) for k in EXTRA_LAYER_KEYS]
        return sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0)

    def check_layer_count(self, arch: Architecture, model: int, why: str) -> None:
        """Where layer positions matter, config.json's layer count (extra layers after them
        included) must match the tensors'."""
        declared = self.declared_layers(arch, model)
        have = self.layer_count(arch, model)
        if declared is None or have in (declared, declared + self.extra_layers(arch, model)):
            return
        self.problem(
            f"{self.models[model].dir / 'config.json'}: {arch.num_layers_key} is {declared}, but the "
            f"tensors of {self.refs[model]} hold {have} layers; {why} are placed by layer, so they would be "
            f"wrong: set {arch.num_layers_key} to {have} in config.json, or use the checkpoint that "
            "goes with this config.json",
            key=f"layer-count:{arch.name}:{model}",
        )

    def check_input(
        self,
        arch: Architecture,
        reference: int,
        model: int,
        name: str,
        ref_info: TensorInfo,
        out_name: str,
        rows_align: bool = False,
    ) -> str | None:
        """The name under which ``model`` stores input ``name`` of ``out_name``, if it is there with
        the reference tensor's shape (its rows aside, with ``rows_align``) and a floating dtype."""
        found = self.lookup(arch, model, name)
        if found is None:
            self.problem(
                f"{name}: missing from {self.refs[model]} ({self.models[model].dir}), which has the other models' "
                f"layout otherwise; the models are not the same architecture, or {self.refs[model]} is "
                "incomplete",
                key=f"missing:{model}:{name}",
            )
            return None
        info = self.models[model].info(found)
        if info.shape != ref_info.shape and model in self.misfits:
            return None  # already reported once, from config.json
        if rows_align and info.shape[1:] == ref_info.shape[1:]:
            pass  # rows are matched by token
        elif info.shape != ref_info.shape:
            is_vocab = name in arch.vocab_weights and info.shape[1:] == ref_info.shape[1:]
            hint = (
                "the vocabularies differ in size; merge models with the same tokenizer"
                if is_vocab
                else "these models have different sizes and cannot be merged tensor by tensor"
            )
            self.problem(
                f"{out_name}: shape {info.shape} in {self.refs[model]} ({info.file}), but "
                f"{ref_info.shape} in {self.refs[reference]} ({ref_info.file}): {hint}"
            )
            return None
        if not info.dtype.is_floating_point and ref_info.dtype.is_floating_point:
            self.problem(
                f"{name}: {self.refs[model]} stores it as {info.dtype} ({info.file}); expected a floating "
                "point tensor. Quantized checkpoints cannot be merged: use the full-precision weights"
            )
            return None
        return found


def get_path(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The nested section at a dotted path (``text_config``); "" is the config itself; {} if absent."""
    for key in path.split(".") if path else ():
        inner = config.get(key)
        if not isinstance(inner, dict):
            return {}
        config = inner
    return config


def set_path(config: dict[str, Any], path: str, value: int) -> None:
    """Set a dotted key path (``vision_config.num_hidden_layers``) where the config has it."""
    *parents, last = path.split(".")
    for key in parents:
        inner = config.get(key)
        if not isinstance(inner, dict):
            return
        config = inner
    if last in config:
        config[last] = value
