"""The one place that decides every per-parameter width scale.

Every factor is relative to base width (all factors are exactly 1 at width multiplier 1, so
settings transfer from standard practice; paper Sec. 5, App. G).  Callers (base-optimizer μP, SAM,
initialization, diagnostics) ask these functions and never recompute a scale.

- :func:`lr_factor`: μP learning-rate factor for SGD (``fan_out/fan_in``) or Adam
  (``1/fan_in``), spectral form of App. F.7; weight multipliers ``n^-a`` shift it (App. F.6.1).
- :func:`weight_decay_factor`: keeps ``lr * weight_decay`` width-independent (as mup does).
- :func:`init_std_factor`: spectral init ``1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))``.
- :func:`perturbation_factors`: numerator and denominator factors of a perturbation rule
  (Def. 4 (LP), Remark F.4 (DP) / Algorithm 1, Remark F.2 (LN), App. F.3), with exponents from
  :mod:`mupp.theory`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from . import theory
from .choices import OPTIMIZER_KINDS, RULES, check_choice
from .shapes import WidthInfo


def theory_role(info: WidthInfo) -> str | None:
    """The MLP role of a tensor for the exponents of :mod:`mupp.theory` (``None``: fixed)."""
    return None if info.role == "fixed" else info.role


def multiplier_exponent(info: WidthInfo, weight_multipliers: Mapping[str, float] | None) -> float:
    """Exponent ``a`` of the weight multiplier ``m^-a`` in front of this tensor (App. F.6):
    ``weight_multipliers[role]`` where given, else the one recorded with its base shapes
    (``WidthInfo.multiplier``, e.g. by :func:`mupp.integrations.huggingface.prepare`)."""
    if info.role == "fixed":
        return 0.0
    if weight_multipliers and info.role in weight_multipliers:
        return float(weight_multipliers[info.role])
    return info.multiplier


def model_multipliers(
    infos: Iterable[WidthInfo | None], weight_multipliers: Mapping[str, float] | None
) -> dict[str, float]:
    """``{role: a}`` of a whole model for the exponents of :mod:`mupp.theory` (App. F.6):
    the recorded multipliers of its tensors, with ``weight_multipliers`` taking precedence.
    Raises ``ValueError`` when two tensors of one role record different multipliers."""
    out: dict[str, float] = {}
    for info in infos:
        if info is None or info.role == "fixed" or not info.multiplier:
            continue
        if out.setdefault(info.role, info.multiplier) != info.multiplier:
            raise ValueError(
                f"the {info.role}-like tensors record different weight multipliers "
                f"({out[info.role]:g} and {info.multiplier:g} at {info.name}); the theory's "
                "exponents are per role: pass weight_multipliers={role: a} to choose"
            )
    out.update(weight_multipliers or {})
    return out


def _ratio(info: WidthInfo) -> float:
    """``(fan_out/fan_in) / (base_fan_out/base_fan_in)``."""
    return info.fan_out_mult / info.fan_in_mult


def lr_factor(
    info: WidthInfo, kind: str = "sgd", weight_multipliers: Mapping[str, float] | None = None
) -> float:
    """μP learning-rate factor (paper App. F.5, F.7): SGD ``fan_out/fan_in``, Adam ``1/fan_in``,
    relative to base.  A weight multiplier ``m^-a`` multiplies it by ``m^{2a}`` (SGD) or
    ``m^a`` (Adam), App. F.6.1; the mup readout (``a = 1``) then trains like an input layer."""
    check_choice("kind", kind, OPTIMIZER_KINDS)
    a = multiplier_exponent(info, weight_multipliers)
    m = info.width_mult
    if kind == "sgd":
        return _ratio(info) * m ** (2 * a)
    return (1.0 / info.fan_in_mult) * m**a


def weight_decay_factor(
    info: WidthInfo, kind: str = "sgd", weight_multipliers: Mapping[str, float] | None = None
) -> float:
    """``1 / lr_factor``: the per-step shrinkage ``lr * wd`` stays width-independent, and at
    multiplier 1 weight decay is exactly the user's (mup's convention)."""
    return 1.0 / lr_factor(info, kind, weight_multipliers)


def init_std_factor(
    info: WidthInfo, weight_multipliers: Mapping[str, float] | None = None
) -> float:
    """Spectral init std relative to base: ``σ ∝ fan_in^{-1/2} min(1, sqrt(fan_out/fan_in))``
    (App. F.7), with the ``min`` taken as width grows: 1 for input-like tensors (``fan_in``
    fixed, so the first layer keeps a width-independent init, ``b_1 = 0``), ``sqrt(fan_out/
    fan_in)`` for output-like ones (variance ``∝ 1/n²``), the exact ratio for hidden ones.
    A weight multiplier ``m^-a`` multiplies it by ``m^a`` (``(a, b) ~ (a + θ, b - θ)``,
    App. F.6.1): a readout with output multiplier ``1/m`` keeps its base init."""

    def clipped(fi: float, fo: float) -> float:
        return min(1.0, math.sqrt(fo / fi))

    if info.role == "output":
        shape = math.sqrt(info.fan_out_mult / info.fan_in_mult)
    elif info.role == "hidden":
        shape = clipped(info.fan_in, info.fan_out) / clipped(info.base_fan_in, info.base_fan_out)
    else:
        shape = 1.0
    a = multiplier_exponent(info, weight_multipliers)
    return info.fan_in_mult**-0.5 * shape * info.width_mult**a


def perturbation_exponents(
    variant: str,
    parameterization: str,
    roles: set[str] | None = None,
    weight_multipliers: Mapping[str, float] | None = None,
) -> tuple[float, dict[str, float]]:
    """``(d, {role: d_role})`` from :func:`mupp.theory.variant_exponents` (one source of truth)."""
    return theory.variant_exponents(
        variant, parameterization, roles=roles, weight_multipliers=weight_multipliers
    )


def perturbation_factors(
    info: WidthInfo,
    *,
    rule: str,
    parameterization: str,
    exponents: tuple[float, Mapping[str, float]],
    global_mult: float,
    weight_multipliers: Mapping[str, float] | None = None,
) -> tuple[float, float]:
    """``(numerator, denominator)`` factors of one tensor's perturbation.

    With ``u_l`` the variant's direction (``g_l`` for SAM) and ``t_l`` its norm term:

    - LP (Def. 4): ``ε_l = ρ num_l u_l / sqrt(Σ_k den_k² t_k²)``, ``num_l = M^{-d} m_l^{-d_l}``,
      ``den_l = m_l^{-d_l}``, ``M`` the model's width multiplier;
    - DP (Remark F.4, Algorithm 1): ``num_l = fan_out/fan_in`` (like the SGD lr),
      ``den_l = sqrt(fan_out/fan_in)``: every denominator term is width-independent (the readout
      weight gets ``(n_L n_{L+1})^{-1/2}`` and its bias 1, App. F.7);
    - LN (Remark F.2): ``ε_l = ρ num_l u_l / t_l`` with ``num_l = sqrt(fan_out/fan_in)``;
    - unnormalized (App. F.3): ``ε_l = ρ num_l u_l`` with ``num_l = m_l^{-c_l}`` (SGD lr factor).

    All relative to base width; weight multipliers ``m^-a`` rescale DP/LN numerators by
    ``m^{2a}``/``m^a`` and denominators by ``m^a`` (App. F.6, F.7 'Using the mup-package').
    """
    check_choice("rule", rule, RULES)
    if parameterization == "sp":
        return 1.0, 1.0
    d, by_role = exponents
    m = info.width_mult
    a = multiplier_exponent(info, weight_multipliers)
    role = theory_role(info)
    if rule == "LP":
        d_l = by_role.get(role, 0.0) if role is not None else 0.0
        return global_mult ** (-d) * m ** (-d_l), m ** (-d_l)
    if parameterization == "mup-naive":
        return 1.0, 1.0
    if rule == "DP":
        if parameterization == "mup-global":
            return global_mult ** (-d), 1.0
        return _ratio(info) * m ** (2 * a), math.sqrt(_ratio(info)) * m**a
    if rule == "LN":
        if parameterization == "mup-global":
            return global_mult ** (-0.5), 1.0
        return math.sqrt(_ratio(info)) * m**a, 1.0
    # unnormalized: the maximal stable global scaling divides by M (d_{L+1} = 1, App. F.3)
    if parameterization == "mup-global":
        return 1.0 / global_mult, 1.0
    return lr_factor(info, "sgd", weight_multipliers), 1.0
