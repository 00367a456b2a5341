"""mergesmith: merge fine-tuned checkpoints into one model, tensor by tensor.

The names below are imported on first use, so ``mergesmith --help`` starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mergesmith._version import __version__

_EXPORTS = {
    "merge": "mergesmith.api",
    "validate": "mergesmith.api",
    "MergeConfig": "mergesmith.config",
    "load_config": "mergesmith.config",
    "Plan": "mergesmith.plan",
    "CheckpointError": "mergesmith.errors",
    "CompatibilityError": "mergesmith.errors",
    "ConfigError": "mergesmith.errors",
    "MergesmithError": "mergesmith.errors",
    "MethodError": "mergesmith.errors",
    "OutputError": "mergesmith.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from mergesmith.api import merge as merge
    from mergesmith.api import validate as validate
    from mergesmith.config import MergeConfig as MergeConfig
    from mergesmith.config import load_config as load_config
    from mergesmith.errors import CheckpointError as CheckpointError
    from mergesmith.errors import CompatibilityError as CompatibilityError
    from mergesmith.errors import ConfigError as ConfigError
    from mergesmith.errors import MergesmithError as MergesmithError
    from mergesmith.errors import MethodError as MethodError
    from mergesmith.errors import OutputError as OutputError
    from mergesmith.plan import Plan as Plan


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")
