"""Every named choice in mupp, defined once as a ``Literal`` type with its tuple of values.

Each entry point (``SAM``, ``mup_param_groups``, ``set_base_shapes``, the theory functions,
``TrainConfig``) checks its arguments with :func:`check_choice`, so a bad value fails at the
call that received it, with the argument's name and the allowed values.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal, get_args

# A parameter's role by which of its dimensions grow with width (paper Sec. 2: input-like,
# hidden-like, output-like); "fixed" tensors have no width-dependent dimension.
Role = Literal["input", "hidden", "output", "fixed"]
ROLES: tuple[str, ...] = get_args(Role)

# The roles the theory (Sec. 4, Def. 4) assigns exponents to: the three layer types of an MLP.
LayerRole = Literal["input", "hidden", "output"]
LAYER_ROLES: tuple[str, ...] = get_args(LayerRole)

# How the learning rate and the perturbation radius scale with width (Sec. 5, Table 1).
Parameterization = Literal["sp", "mup-naive", "mup-global", "mupp"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)

# The SAM variants of the paper's theory (Sec. 4 and App. E, Table 1) ...
TheoryVariant = Literal["sam", "asam-elem", "asam-layer", "sam-on"]
THEORY_VARIANTS: tuple[str, ...] = get_args(TheoryVariant)

# ... and those mupp.SAM implements: the theory's plus the ablations that perturb one layer
# (last-layer SAM: Prop. 2 and App. H.1; first-layer SAM).
Variant = Literal["sam", "asam-elem", "asam-layer", "sam-on", "last-layer", "first-layer"]
VARIANTS: tuple[str, ...] = get_args(Variant)

# How the ascent direction is normalized (Sec. 5, Eq. (LP); App. F.7 for DP and LN).
Rule = Literal["LP", "DP", "LN", "unnormalized"]
RULES: tuple[str, ...] = get_args(Rule)
# The rules that divide every layer's ε by one joint norm over all layers (Def. 4, Remark F.4).
JOINT_RULES: tuple[str, ...] = ("LP", "DP")

# Where SAM's perturbation points (the issue of cheap SAM): along a fresh gradient at W (the
# two-pass step of Foret et al.), or along the base optimizer's momentum (Momentum-SAM, Becker
# et al. 2024: one forward and one backward, at the perturbed point).
Ascent = Literal["gradient", "momentum"]
ASCENTS: tuple[str, ...] = get_args(Ascent)

# What the steps between two full SAM steps reuse (``SAM(every=k)``): LookSAM's change of the
# gradient (Liu et al. 2022, per layer), or nothing (a plain base step).
Reuse = Literal["looksam"]
REUSES: tuple[str, ...] = get_args(Reuse)

# The two families of base optimizers whose μP learning-rate exponents differ (Table 1).
OptimizerKind = Literal["sgd", "adam"]
OPTIMIZER_KINDS: tuple[str, ...] = get_args(OptimizerKind)

# What SAM does with a non-finite gradient.
NonFinite = Literal["skip", "raise", "ignore"]
NONFINITE: tuple[str, ...] = get_args(NonFinite)

# Whether data-parallel ranks share one perturbation (gradients all-reduced before the norm)
# or each perturbs with its own gradient (m-sharpness).
PerturbationSync = Literal["sync", "local"]
PERTURBATION_SYNCS: tuple[str, ...] = get_args(PerturbationSync)

# How a multi-process run shares the model.
Parallel = Literal["ddp", "fsdp"]
PARALLELS: tuple[str, ...] = get_args(Parallel)

# The built-in models (mupp.models.build) by the names every command and preset uses.
ModelName = Literal["mlp", "resnet8", "resnet10", "resnet18", "vit", "gpt"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)


# What a sweep analysis maximizes per run: best-epoch test accuracy, or (language models) minus
# the best validation loss in nats per token.
Metric = Literal["acc", "loss"]
METRICS: tuple[str, ...] = get_args(Metric)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the argument and the allowed values unless ``value`` is one."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def check_nonneg(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the argument unless ``value`` is a finite number ``>= 0``
    (a bool is refused: ``lr=True`` is a mistake, not ``1``)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
        raise ValueError(f"{name} must be a non-negative finite number; got {value!r}")
    v = float(value)
    if not (v >= 0.0 and v != float("inf")):
        raise ValueError(f"{name} must be a non-negative finite number; got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the argument unless ``value`` is an integer ``>= 1`` (a
    bool or a float such as ``2.5`` or ``2.0`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _is_scalar_tensor(value: Any) -> bool:
    # a 0-dim tensor (a tensor learning rate, as torch.optim allows), without importing torch
    return type(value).__name__ in ("Tensor", "Parameter") and getattr(value, "ndim", 1) == 0
