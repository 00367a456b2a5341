"""Mixtures of experts built from dense fine-tunes of one base (mergekit-moe's configs)."""

from __future__ import annotations

from mergesmith.moe.build import MoEPlan, moe, plan_moe
from mergesmith.moe.config import Expert, MoEConfig, load_moe_config

__all__ = ["Expert", "MoEConfig", "MoEPlan", "load_moe_config", "moe", "plan_moe"]
