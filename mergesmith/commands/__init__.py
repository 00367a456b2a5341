"""The command line's subcommands, one module each, in the table ``mergesmith.cli`` dispatches on.

Each module has ``add_parser(sub)``, which adds the command's parser, and ``run(args) -> int``,
which runs it, bound in its ``COMMAND``. The modules import the API inside ``run``, so building
the parser (``mergesmith --help``) loads no torch.
"""

from __future__ import annotations

from mergesmith.commands import compare, diagnose, evaluate, lora, merge, methods, moe, multi, tune, validate
from mergesmith.commands._common import Command

__all__ = ["COMMANDS", "Command"]

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        merge.COMMAND,
        validate.COMMAND,
        methods.COMMAND,
        evaluate.COMMAND,
        compare.COMMAND,
        diagnose.COMMAND,
        tune.COMMAND,
        multi.COMMAND,
        moe.COMMAND,
        lora.COMMAND,
    )
}
