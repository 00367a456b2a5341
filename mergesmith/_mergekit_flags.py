"""mergekit-yaml's command-line options, as ``mergesmith merge`` understands them.

Every option of mergekit 0.1.5's ``mergekit-yaml`` is accepted: each one either does the same
here (``--cuda``, ``--out-shard-size``, ``--no-copy-tokenizer``, ...), is refused with the reason
(``--allow-crimes``, ``--trust-remote-code``, ``--unsafe-truncate-embeddings``), or prints a
one-line note saying what mergesmith does instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable

from mergesmith import defaults
from mergesmith.errors import ConfigError

__all__ = ["NOTES", "REFUSED", "add_mergekit_flags", "apply_mergekit_flags", "parse_kmb"]

# mergekit switches that change nothing here: what mergesmith does instead (printed when given).
NOTES: dict[str, str] = {
    "lazy_unpickle": "mergesmith always reads tensors lazily, one at a time",
    "low_cpu_memory": "mergesmith holds one output tensor at a time; --device cuda computes on the GPU",
    "clone_tensors": "mergesmith writes every output tensor on its own, so repeated layers need no cloning",
    "read_to_gpu": "mergesmith reads each tensor on the CPU and moves it to --device for the arithmetic",
    "multi_gpu": "mergesmith computes on one device; choose it with --device",
    "async_write": "mergesmith writes each shard as soon as its tensors are merged",
    "safe_serialization": "mergesmith always writes safetensors",
}
# Their negations that are not mergesmith's behaviour already.
NEGATED_NOTES: dict[str, str] = {
    "safe_serialization": "mergesmith writes safetensors only, never pickled .bin files; writing safetensors",
}
# mergekit switches refused here: why, and what to do instead.
REFUSED: dict[str, str] = {
    "allow_crimes": "mergesmith does not merge models of different architectures: it compares the "
    "models' config.json and tensor shapes and refuses a mismatch rather than write a broken model; "
    "merge fine-tunes of one base model (validate shows which model differs)",
    "trust_remote_code": "mergesmith never runs a model's code: it reads config.json and the weight "
    "files only, so models with custom code merge without it; drop the flag",
    "unsafe_truncate_embeddings": "mergesmith does not drop embedding rows; set tokenizer_source "
    "(base, union or one model's name) in the config to match the rows by token",
}
# mergekit options taking a value that change nothing here.
VALUE_NOTES: dict[str, str] = {
    "transformers_cache": "mergesmith downloads through huggingface_hub's own cache; "
    "set HF_HUB_CACHE=PATH to move it",
    "lora_merge_cache": "mergesmith applies a model+lora adapter in memory as each tensor is read; "
    "nothing is cached",
    "lora_merge_dtype": "mergesmith applies a model+lora adapter in memory at the merge's own precision",
    "write_threads": "mergesmith writes each shard as soon as its tensors are merged",
}

_KMB = re.compile(r"\s*(\d+)\s*([kmbKMB]?)\s*")


def parse_kmb(text: str) -> int:
    """mergekit's ``--out-shard-size`` value: a whole number with an optional K, M or B suffix
    (thousands, millions, billions), e.g. ``5B``; a ConfigError otherwise."""
    match = _KMB.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"--out-shard-size {text!r}: expected a whole number with an optional K, M or B "
            "(thousands, millions, billions) as mergekit writes it, e.g. 5B; "
            "for sizes such as 5GB or 2GiB use --max-shard-size"
        )
    return int(match[1]) * {"": 1, "k": 1000, "m": 1000**2, "b": 1000**3}[match[2].lower()]


def add_mergekit_flags(p: argparse.ArgumentParser) -> None:
    """Add mergekit-yaml's options to the ``merge`` parser, in a group of their own."""

    def spelled(dests: Iterable[str]) -> str:
        return ", ".join(f"--{d.replace('_', '-')}" for d in dests)

    g = p.add_argument_group(
        "mergekit-yaml options",
        "accepted as mergekit spells them (docs/cli.md, mergekit flags). Also accepted, with a note "
        f"that they change nothing here: {spelled([*NOTES, *VALUE_NOTES])}. Refused, with the "
        f"reason: {spelled(REFUSED)}.",
    )
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--cuda", action=on_off, help="same as --device cuda")
    g.add_argument("--gpu-rich", action="store_true", help="same as --device cuda")
    g.add_argument(
        "--out-shard-size",
        metavar="SIZE",
        help="largest output shard in bytes, written as mergekit does: 5B (5 billion bytes), 500M, "
        "20K or 1000; 0: one shard",
    )
    g.add_argument(
        "--copy-tokenizer", action=on_off, help="copy the tokenizer files into the output (default: yes)"
    )
    g.add_argument("--write-model-card", action=on_off, help="write README.md, the model card (default: yes)")
    g.add_argument("--random-seed", type=int, metavar="N", help="same as --seed N")
    g.add_argument("--num-threads", "-j", type=int, metavar="N", help="same as --threads N")
    g.add_argument("--quiet", action=on_off, help="same as --no-progress --no-diagnose")
    g.add_argument("--verbose", "-v", dest="verbosity", action="count", help="accepted; no effect")
    for dest in (*NOTES, *REFUSED):
        g.add_argument(f"--{dest.replace('_', '-')}", action=on_off, help=argparse.SUPPRESS)
    for dest in VALUE_NOTES:
        g.add_argument(f"--{dest.replace('_', '-')}", metavar="VALUE", help=argparse.SUPPRESS)


def _note(flag: str, text: str) -> None:
    print(f"note: {flag}: {text}", file=sys.stderr)


def apply_mergekit_flags(args: argparse.Namespace) -> None:
    """Turn the mergekit options of a parsed ``merge`` command into mergesmith's own; print a note
    for each one that changes nothing here, raise a ConfigError for each refused one."""
    for dest, why in REFUSED.items():
        if getattr(args, dest):
            raise ConfigError(f"--{dest.replace('_', '-')}: {why}")
    for dest, text in NOTES.items():
        value = getattr(args, dest)
        if value:
            _note(f"--{dest.replace('_', '-')} has no effect", text)
        elif value is not None and dest in NEGATED_NOTES:
            _note(f"--no-{dest.replace('_', '-')}", NEGATED_NOTES[dest])
    for dest, text in VALUE_NOTES.items():
        if getattr(args, dest) is not None:
            _note(f"--{dest.replace('_', '-')} is ignored", text)
    if args.verbosity:
        _note("-v has no effect", "mergesmith has no log levels")

    if args.cuda or args.gpu_rich:
        if args.device not in (None, "cuda") and not str(args.device).startswith("cuda:"):
            flag = "--cuda" if args.cuda else "--gpu-rich"
            raise ConfigError(f"{flag} asks for the GPU, --device {args.device} for another device; give one")
        args.device = args.device or "cuda"
    if args.device == "auto":  # mergekit's spelling: the GPU when there is one
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = args.device or "cpu"

    if args.out_shard_size is not None:
        if args.max_shard_size is not None:
            raise ConfigError("--out-shard-size and --max-shard-size both set the shard size; give one")
        size = parse_kmb(args.out_shard_size)
        # mergekit compares the value with each shard's bytes; 0 turns sharding off
        args.max_shard_size = str(size) if size > 0 else str(1 << 62)
    args.max_shard_size = args.max_shard_size or defaults.SHARD_SIZE

    if args.random_seed is not None:
        if args.seed is not None and args.seed != args.random_seed:
            raise ConfigError(f"--seed {args.seed} and --random-seed {args.random_seed} disagree; give one")
        args.seed = args.random_seed
    if args.num_threads is not None:
        if args.threads is not None and args.threads != args.num_threads:
            raise ConfigError(
                f"--threads {args.threads} and --num-threads {args.num_threads} disagree; give one"
            )
        if args.num_threads < 1:
            raise ConfigError(f"--num-threads must be at least 1, got {args.num_threads}")
        args.threads = args.num_threads
    if args.quiet:
        args.no_progress = True
        args.no_diagnose = True
