"""Optimizers: μP base optimizers and the SAM family."""

from ..choices import RULES, VARIANTS
from .groups import MuAdamW, MuSGD, mup_param_groups, optimizer_kind
from .perturbation import is_perturbed
from .sam import SAM, frozen_bn_stats

__all__ = [
    "SAM",
    "MuSGD",
    "MuAdamW",
    "mup_param_groups",
    "optimizer_kind",
    "is_perturbed",
    "RULES",
    "VARIANTS",
    "frozen_bn_stats",
]
