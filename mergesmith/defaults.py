"""The defaults of the API's options, in one module that imports nothing.

The API's functions take their defaults from here, and the command line reads the same values
for its options and their help, without loading torch.
"""

from __future__ import annotations

__all__ = [
    "BATCH_SIZE",
    "DENSITY",
    "DEVICE",
    "EXECUTOR",
    "GRID_STEPS",
    "LORA_LAMBDA",
    "LORA_METHOD",
    "ON_NONFINITE",
    "PENALTY",
    "SAMPLE",
    "SAMPLER",
    "SEED",
    "SHARD_SIZE",
    "TRIALS",
    "TUNE_BATCH_SIZE",
    "WORKERS",
    "size_text",
]

SHARD_SIZE = 5 * 1000**3  # bytes: the largest output shard
DEVICE = "cpu"  # where the arithmetic runs
SEED = 0  # seed of random methods, gates and samplers
ON_NONFINITE = "error"  # a merged tensor with NaN/Inf or float16 overflow stops the merge ("warn": written)
WORKERS = 1  # processes (or trials at once) that merge
EXECUTOR = "local"  # where they run: local processes, or "ray"
LORA_METHOD = "linear"  # how LoRA adapters are merged
LORA_LAMBDA = 1.0  # scale of the merged adapter's update
BATCH_SIZE = 32  # examples per forward pass when evaluating
TUNE_BATCH_SIZE = 64  # examples per forward pass when scoring a trial
TRIALS = 20  # trials in a tuning study
SAMPLER = "tpe"  # the tuning study's Optuna sampler
GRID_STEPS = 3  # grid sampler: values per searched parameter
PENALTY = 1.0  # weight of accuracy lost below the base in the tuning objective
DENSITY = 0.2  # diagnose: the density sign conflicts are trimmed to where the config sets none
SAMPLE = 1 << 16  # diagnose: entries per tensor the figures are computed on


def size_text(size: int) -> str:
    """A number of bytes as the size options write it: ``5GB``, ``500MB``, or bytes."""
    for unit, scale in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)
