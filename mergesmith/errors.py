"""The exceptions mergesmith raises, rooted at :class:`MergesmithError`.

::

    MergesmithError
    ├── ConfigError         the YAML config is malformed or asks for something impossible
    ├── CheckpointError     an input model cannot be found or read
    ├── CompatibilityError  the input models cannot be merged tensor by tensor
    ├── MethodError         a merge method failed on a tensor (bad numbers, bad parameters)
    └── OutputError         the output directory cannot be written safely

Every message names where the problem is (file, key, tensor), what was expected and what was found,
and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CompatibilityError",
    "ConfigError",
    "ConfigWarning",
    "MergesmithError",
    "MethodError",
    "OutputError",
]


class MergesmithError(Exception):
    """Base class of every error mergesmith raises on purpose."""


class _ProblemList(MergesmithError):
    """An error that gathers several problems, reported together."""

    headline = "problems found"

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        if len(self.problems) == 1:
            return f"{self.problems[0]}" if not where else f"{self.source}: {self.problems[0]}"
        lines = [f"{len(self.problems)} {self.headline}{where}:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(_ProblemList):
    """The config is malformed: unknown keys or methods, bad parameter values, missing models."""

    headline = "problems in the config"


class CheckpointError(_ProblemList):
    """An input model cannot be found, resolved or read."""

    headline = "problems reading the input models"


class CompatibilityError(_ProblemList):
    """The input models do not fit together (architecture, sizes, missing tensors, shapes)."""

    headline = "problems with the input models"


class MethodError(MergesmithError):
    """A merge method failed on a tensor."""


class OutputError(MergesmithError):
    """The output directory is refused or could not be written."""


class ConfigWarning(UserWarning):
    """A config setting that is accepted, as mergekit accepts it, but has no effect (printed as
    ``warning: ...`` by the command line; an error under ``python -W error``)."""
