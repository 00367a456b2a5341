"""Opening the models a config names: each resolved (a local directory or a Hub download) and
read as a :class:`~mergesmith.sources.ModelSource`, a LoRA adapter applied where one is given."""

from __future__ import annotations

from collections.abc import Sequence

from mergesmith import _hub
from mergesmith.config import ModelRef
from mergesmith.errors import CheckpointError
from mergesmith.sources import Checkpoint, ModelSource

__all__ = ["open_models"]


def open_models(refs: Sequence[ModelRef]) -> list[ModelSource]:
    """Resolve and open every referenced model, reporting every failure together."""
    models: list[ModelSource] = []
    problems: list[str] = []
    for ref in refs:
        try:
            directory = _hub.resolve(ref.path, ref.revision)
            model: ModelSource = Checkpoint(directory, name=str(ref))
            if ref.lora:
                from mergesmith.lora import AdaptedCheckpoint, read_adapter

                adapter = read_adapter(_hub.resolve(ref.lora))
                model = AdaptedCheckpoint(model, adapter, name=str(ref))
            models.append(model)
        except CheckpointError as exc:
            problems += exc.problems
    if problems:
        raise CheckpointError(problems)
    return models
