"""The bcd-parameterization calculus of the paper, as plain Python (no torch).

All exponents are powers of the width ``n``: a layerwise learning rate ``eta * n^-c_l``,
initialization variance ``n^-2b_l`` and perturbation scaling ``rho * n^-d`` (global) times
``n^-d_l`` (layerwise, before the joint normalization of Def. 4 (LP)).  Lists hold one entry per
weight layer, ``L + 1`` in total: index 0 is the input layer, index ``L`` the readout.

Everything here is exact arithmetic on :class:`fractions.Fraction`; results are returned as
floats.  The optimizer (:mod:`mupp.optim`) takes every perturbation exponent from
:func:`variant_exponents`, so this module is the single source of truth for the scaling.

References are to Haas et al., "μP²: Effective Sharpness Aware Minimization Requires Layerwise
Perturbation Scaling" (NeurIPS 2024).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from .choices import LAYER_ROLES, PARAMETERIZATIONS, THEORY_VARIANTS, check_choice

Number = float | int | Fraction


def _q(x: Number | None) -> Fraction | None:
    """Exact rational from a float exponent (exponents of the paper are multiples of 1/2)."""
    if x is None:
        return None
    return Fraction(x).limit_denominator(1000)


def _f(x: Fraction | None) -> float | None:
    return None if x is None else float(x)


def _check_lists(b: Sequence[Number], c: Sequence[Number]) -> tuple[list[Fraction], list[Fraction]]:
    if len(b) != len(c):
        raise ValueError(f"b and c must have the same length (L+1); got {len(b)} and {len(c)}")
    if len(b) < 2:
        raise ValueError(f"b must have at least 2 entries (input and readout layer); got {len(b)}")
    return [_q(x) for x in b], [_q(x) for x in c]


def layer_role(layer: int, num_layers: int) -> str:
    """Role of weight layer ``layer`` (0-based) in an MLP with ``num_layers = L + 1`` layers."""
    if layer == 0:
        return "input"
    if layer == num_layers - 1:
        return "output"
    return "hidden"


# ---------------------------------------------------------------------------------------------
# bc-parameterizations of MLPs (Sec. 3, Table D.1)
# ---------------------------------------------------------------------------------------------


def mup_bc(L: int) -> tuple[list[float], list[float]]:
    """μP for SGD (Sec. 3, Table D.1): ``b = (0, 1/2.., 1)``, ``c = (-1, 0.., 1)``."""
    _check_depth(L)
    return [0.0] + [0.5] * (L - 1) + [1.0], [-1.0] + [0.0] * (L - 1) + [1.0]


def sp_bc(L: int, stable: bool = False) -> tuple[list[float], list[float]]:
    """Standard parameterization (Table D.1): He/LeCun init ``b = (0, 1/2, ..)`` and a global
    learning rate ``c = 0``, or its maximal stable version ``c = 1`` with ``stable=True``."""
    _check_depth(L)
    return [0.0] + [0.5] * L, [1.0 if stable else 0.0] * (L + 1)


def ntp_bc(L: int) -> tuple[list[float], list[float]]:
    """Neural tangent parameterization in bc-form (Table D.1, 'NTP (stable)')."""
    _check_depth(L)
    return [0.0] + [0.5] * L, [0.0] + [1.0] * L


def _check_depth(L: int) -> None:
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L (number of hidden layers) must be an integer >= 1; got {L!r}")


def grad_scale(b: Sequence[Number], c: Sequence[Number]) -> float:
    """``c_∇ = min(b_{L+1}, c_{L+1})``: hidden gradients scale as ``n^-c_∇`` (Table D.2)."""
    bq, cq = _check_lists(b, c)
    return float(min(bq[-1], cq[-1]))


# ---------------------------------------------------------------------------------------------
# Gradient-norm constraints and canonical representatives (Def. 4, Eq. (D.1))
# ---------------------------------------------------------------------------------------------


def norm_lower_bounds(b: Sequence[Number], c: Sequence[Number]) -> list[float]:
    """Lower bounds of Eq. (D.1) on ``d_l`` that make ``||v_t|| = O(1)``."""
    bq, cq = _check_lists(b, c)
    return [_f(x) for x in _norm_bounds(bq, cq)]


def _norm_bounds(bq: list[Fraction], cq: list[Fraction]) -> list[Fraction]:
    cg = min(bq[-1], cq[-1])
    n = len(bq)
    return [Fraction(1, 2) - cg] + [1 - cg] * (n - 2) + [Fraction(1, 2)]


def canonicalize(
    b: Sequence[Number], c: Sequence[Number], d_layers: Sequence[Number | None]
) -> list[float | None]:
    """Canonical representative of ``{d_l}`` under ``d_l -> d_l + C`` (Def. 4).

    The perturbation ``v/||v||`` is invariant under the shift; the representative satisfies every
    constraint of Eq. (D.1) with at least one equality, so that ``||v_t|| = Θ(1)`` and the
    theorems of Sec. 4 apply.  ``None`` marks a layer that is not perturbed at all.
    """
    bq, cq = _check_lists(b, c)
    return [_f(x) for x in _canonical(bq, cq, _dl(d_layers, len(bq)))]


def _dl(d_layers: Sequence[Number | None], n: int) -> list[Fraction | None]:
    if len(d_layers) != n:
        raise ValueError(f"d_layers must have L+1 = {n} entries; got {len(d_layers)}")
    return [_q(x) for x in d_layers]


def _canonical(
    bq: list[Fraction], cq: list[Fraction], dq: list[Fraction | None]
) -> list[Fraction | None]:
    lb = _norm_bounds(bq, cq)
    shifts = [lo - d for lo, d in zip(lb, dq) if d is not None]
    if not shifts:
        return list(dq)
    shift = max(shifts)
    return [None if d is None else d + shift for d in dq]


# ---------------------------------------------------------------------------------------------
# Classification (Sec. 4.1, App. D)
# ---------------------------------------------------------------------------------------------


def classify(
    b: Sequence[Number],
    c: Sequence[Number],
    d_layers: Sequence[Number | None],
    d: Number,
) -> dict[str, Any]:
    """Classify a bcd-parameterization of an MLP (Thm D.2, D.3, D.4, Thm 6, Thm 9, Thm 10).

    ``d_layers`` may be any representative of its equivalence class; it is canonicalized with the
    gradient-norm constraints (D.1) first.  ``None`` in ``d_layers`` marks a layer that is not
    perturbed (zero perturbation by design, App. F.1).

    Returns a dict with ``stable`` (Thm D.2 (a)-(e)), ``stability`` (each condition),
    ``bc_stable`` ((a)-(c)), ``nontrivial`` (Thm D.3), ``feature_learning`` (``r = 0``, Thm D.4)
    and per-layer ``feature_learning_layers``, ``r``, ``r_tilde`` (D.3), ``perturbation_nontrivial``
    (Thm 6), ``vanishing`` (L bools, Thm 9), ``effective`` (L+1 bools, Thm 10) and
    ``d_layers`` (canonical).
    """
    bq, cq = _check_lists(b, c)
    dq = _canonical(bq, cq, _dl(d_layers, len(bq)))
    dg = _q(d)
    if dg is None:
        raise ValueError("d (global perturbation exponent) must be a number")
    n = len(bq)
    L = n - 1
    inf = Fraction(10**9)
    cg = min(bq[-1], cq[-1])
    d_out = inf if dq[-1] is None else dq[-1]
    ind = [0] + [1] * (L - 1)  # 1[l != 1] for l = 1..L

    def r_upto(l0: int) -> Fraction:
        return min(bq[-1], cq[-1], dg + d_out) + min(cq[m] - ind[m] for m in range(l0 + 1))

    def rt_upto(l0: int) -> Fraction:
        terms = [dq[m] - ind[m] for m in range(l0 + 1) if dq[m] is not None]
        return cg + dg + min(terms) if terms else inf

    r = r_upto(L - 1)
    rt = rt_upto(L - 1)
    stability = {
        "init": bq[0] == 0
        and all(x == Fraction(1, 2) for x in bq[1:L])
        and bq[-1] >= Fraction(1, 2),
        "features": r >= 0,
        "output": cq[-1] >= 1 and bq[-1] + r >= 1,
        "feature_perturbations": rt >= 0,
        "output_perturbations": dg + d_out >= 1 and bq[-1] + rt >= 1,
    }
    bc_stable = stability["init"] and stability["features"] and stability["output"]
    stable = all(stability.values())
    nontrivial = cq[-1] == 1 or cg + r == 1
    fl_layers = [r_upto(l0) == 0 for l0 in range(L)]
    effective = [dq[i] is not None and cg + dg + dq[i] - ind[i] == 0 for i in range(L)] + [
        dq[-1] is not None and dg + d_out == 1
    ]
    return {
        "stable": stable,
        "stability": stability,
        "bc_stable": bc_stable,
        "nontrivial": nontrivial,
        "feature_learning": r == 0,
        "feature_learning_layers": fl_layers,
        "r": float(r),
        "r_tilde": None if rt == inf else float(rt),
        "perturbation_nontrivial": dg + d_out == 1 or cg + rt == 1,
        "vanishing": [rt_upto(l0) > 0 for l0 in range(L)],
        "effective": effective,
        "d_layers": [_f(x) for x in dq],
        "d": float(dg),
    }


# ---------------------------------------------------------------------------------------------
# Choosing perturbation scalings (Thm 11, App. F.1, F.4, F.6)
# ---------------------------------------------------------------------------------------------

# Entrywise scaling exponents of perturbation numerators and Frobenius norms of the
# denominator terms, as functions of the entrywise weight scale ``w``, gradient scale ``g`` and
# the number of width dimensions ``k`` of a role (App. F.4 steps 1-3).  Frobenius norms of the
# low-rank gradients and of iid weights are ``entry * sqrt(#entries)``, i.e. exponent + k/2.
_NUMERATOR = {
    "sam": lambda w, g, k: g,  # (LP)
    "sam-on": lambda w, g, k: g,
    "asam-elem": lambda w, g, k: 2 * w + g,  # |W| ⊙ |W| ⊙ g   (F.4)
    "asam-layer": lambda w, g, k: 2 * (w + Fraction(k, 2)) + g,  # ||W||_F^2 g   (F.6)
}
_NORM = {
    "sam": lambda w, g, k: g + Fraction(k, 2),
    "sam-on": lambda w, g, k: g + Fraction(k, 2),
    "asam-elem": lambda w, g, k: w + g + Fraction(k, 2),  # || |W| ⊙ g ||_F
    "asam-layer": lambda w, g, k: (w + Fraction(k, 2)) + (g + Fraction(k, 2)),  # ||W||_F ||g||_F
}
_WIDTH_DIMS = {"input": 1, "hidden": 2, "output": 1}
# Maximal stable perturbation, entrywise (F.3): Θ(1) in the input layer, Θ(1/n) elsewhere.
_TARGET = {"input": Fraction(0), "hidden": Fraction(-1), "output": Fraction(-1)}


def _role_scales(bq: list[Fraction], cq: list[Fraction]) -> dict[str, tuple[Fraction, Fraction]]:
    """Entrywise (weight, gradient) exponents per role in a stable bc-parameterization (F.2)."""
    cg = min(bq[-1], cq[-1])
    return {
        "input": (-bq[0], -cg),
        "hidden": (-bq[1] if len(bq) > 2 else Fraction(-1, 2), -cg),
        "output": (-bq[-1], Fraction(0)),
    }


def _check_variant(variant: str) -> None:
    check_choice("variant", variant, THEORY_VARIANTS)


def _role_exponents(
    bq: list[Fraction],
    cq: list[Fraction],
    variant: str,
    a: Mapping[str, Number] | None = None,
) -> dict[str, tuple[Fraction, Fraction]]:
    """Per role: (exponent of the perturbation's effect, denominator-term exponent) before any
    ``n^-d_l``.  A weight multiplier ``n^-a`` in the μP class makes entries ``n^a`` larger and
    gradients ``n^-a`` smaller, and scales the effect of a perturbation by ``n^-a`` in the
    forward pass (App. F.6.1, proof of Lemma F.11)."""
    scales = _role_scales(bq, cq)
    out = {}
    for role in LAYER_ROLES:
        w, g = scales[role]
        k = _WIDTH_DIMS[role]
        ar = _q((a or {}).get(role, 0)) or Fraction(0)
        w, g = w + ar, g - ar
        out[role] = (_NUMERATOR[variant](w, g, k) - ar, _NORM[variant](w, g, k))
    return out


def _solve_effective(
    bq: list[Fraction],
    cq: list[Fraction],
    roles: set[str],
    variant: str,
    a: Mapping[str, Number] | None = None,
) -> tuple[Fraction, dict[str, Fraction]]:
    """The unique ``(d, {d_role})`` that perturbs exactly ``roles`` effectively (App. F.1, F.4).

    Effective perturbation of role r needs ``-d - d_r + num_r = target_r``; the denominator stays
    Θ(1) iff ``d_r >= norm_r`` for every perturbed role with one equality, hence
    ``d = min_r (num_r - target_r - norm_r)``.
    """
    ex = _role_exponents(bq, cq, variant, a)
    d = min(ex[r][0] - _TARGET[r] - ex[r][1] for r in roles)
    return d, {r: ex[r][0] - _TARGET[r] - d for r in roles}


def _solve_global(
    bq: list[Fraction],
    cq: list[Fraction],
    roles: set[str],
    variant: str,
    a: Mapping[str, Number] | None = None,
) -> tuple[Fraction, dict[str, Fraction]]:
    """Maximal stable global scaling ``rho n^-d`` with ``d_l = C`` for all perturbed layers."""
    ex = _role_exponents(bq, cq, variant, a)
    const = max(ex[r][1] for r in roles)  # norm constraint, equality at the dominating role
    d = max(ex[r][0] - _TARGET[r] - const for r in roles)  # no perturbation blows up
    return d, {r: const for r in roles}


def _layers_from_roles(n: int, by_role: Mapping[str, Fraction]) -> list[Fraction | None]:
    return [by_role.get(layer_role(i, n)) for i in range(n)]


def mpp(b: Sequence[Number], c: Sequence[Number]) -> tuple[float, list[float]]:
    """The Maximal Perturbation Parameterization (Thm 11, Eq. (1)) of a bc-parameterization.

    Returns ``(d, d_layers)`` in canonical form; raises ``ValueError`` when ``b_{L+1} < 1``, where
    no stable choice perturbs the layers before the readout effectively (SP, NTP).
    """
    bq, cq = _check_lists(b, c)
    if bq[-1] < 1:
        raise ValueError(
            f"no stable perturbation scaling perturbs all layers effectively when b_(L+1) < 1 "
            f"(Thm 11); got b_(L+1) = {float(bq[-1])}"
        )
    d, by_role = _solve_effective(bq, cq, set(LAYER_ROLES), "sam")
    return float(d), [_f(x) for x in _layers_from_roles(len(bq), by_role)]


def perturbation_scaling(
    b: Sequence[Number],
    c: Sequence[Number],
    effective: Sequence[bool],
    variant: str = "sam",
) -> tuple[float | None, list[float | None]]:
    """``(d, d_layers)`` that perturbs exactly the chosen layers effectively (App. F.1).

    Layers not in ``effective`` get ``None``: they are not perturbed at all, as App. F.1
    recommends ("simply set all perturbations that should vanish to 0 by design").  With no
    effective layer the result is ``(None, [None, ...])``: plain SGD (rule 4).
    """
    bq, cq = _check_lists(b, c)
    _check_variant(variant)
    if len(effective) != len(bq):
        raise ValueError(f"effective must have L+1 = {len(bq)} entries; got {len(effective)}")
    n = len(bq)
    roles = {layer_role(i, n) for i, e in enumerate(effective) if e}
    if not roles:
        return None, [None] * n
    d, by_role = _solve_effective(bq, cq, roles, variant)
    dl = [by_role[layer_role(i, n)] if e else None for i, e in enumerate(effective)]
    return float(d), [_f(x) for x in dl]


def example_f1(b: Sequence[Number], c: Sequence[Number]) -> tuple[float, list[float]]:
    """Example F.1: first-layer-only effective perturbation with vanishing (``Θ(1/n)``
    entrywise, one order below effective) perturbations elsewhere:
    ``d = -1/2``, ``d_1 = -(c_∇ + d)``, ``d_l = 2 - c_∇ - d``, ``d_{L+1} = 2 - d``."""
    bq, cq = _check_lists(b, c)
    cg = min(bq[-1], cq[-1])
    d = Fraction(-1, 2)
    n = len(bq)
    dl = [-(cg + d)] + [2 - cg - d] * (n - 2) + [2 - d]
    return float(d), [float(x) for x in dl]


def mpp_multipliers(a: Sequence[Number]) -> tuple[float, list[float]]:
    """μP² for an MLP with weight multipliers ``n^-a_l`` in the μP class (Lemma F.13).

    ``d = min_l(-a_l - 1/2·1[l=1] + 1/2·1[l=L+1])``, ``d_1 = -1 - d - 2a_1``,
    ``d_l = -d - 2a_l`` (hidden), ``d_{L+1} = 1 - d - 2a_{L+1}``.  With the mup package's readout
    multiplier (``a = (0, .., 0, 1)``) this is Lemma F.12 (b); with (a-μP²) it is naive scaling
    (Lemma F.11).
    """
    aq = [_q(x) for x in a]
    if len(aq) < 2 or any(x is None for x in aq):
        raise ValueError(
            f"a must list at least 2 numbers (L+1 weight multiplier exponents); got {a!r}"
        )
    n = len(aq)
    half = Fraction(1, 2)
    offs = [-half] + [Fraction(0)] * (n - 2) + [half]
    d = min(-x + o for x, o in zip(aq, offs))
    base = [Fraction(-1)] + [Fraction(0)] * (n - 2) + [Fraction(1)]
    return float(d), [float(k - d - 2 * x) for k, x in zip(base, aq)]


# ---------------------------------------------------------------------------------------------
# Presets used by the optimizer, and Table 1
# ---------------------------------------------------------------------------------------------

_VARIANT_ROLES = {
    "sam": set(LAYER_ROLES),
    "asam-elem": set(LAYER_ROLES),
    "asam-layer": set(LAYER_ROLES),
    "sam-on": {"input"},  # normalization gains and biases are input-like (App. F.5)
}


def variant_exponents(
    variant: str = "sam",
    parameterization: str = "mupp",
    roles: Sequence[str] | None = None,
    b: Sequence[Number] | None = None,
    c: Sequence[Number] | None = None,
    weight_multipliers: Mapping[str, Number] | None = None,
) -> tuple[float, dict[str, float]]:
    """Perturbation exponents ``(d, {role: d_role})`` the optimizer applies (powers of width).

    ``parameterization``: ``"sp"`` and ``"mup-naive"`` give naive scaling ``d = d_l = 0``;
    ``"mup-global"`` the maximal stable global scaling with ``d_l`` constant (Prop. 2, Thm D.9;
    ``d = 1/2`` for SAM); ``"mupp"`` the unique scaling with effective perturbations in all
    perturbed roles (Thm 11, Table 1, App. F.1, F.4).  ``roles`` restricts which roles are
    perturbed (default: the variant's, e.g. only input-like for SAM-ON).  ``b, c`` default to μP
    of a 3-layer MLP; only ``c_∇ = min(b_{L+1}, c_{L+1})`` and the hidden init matter.
    ``weight_multipliers``: ``{role: a}`` for weight multipliers ``n^-a`` in the μP class
    (App. F.6; the mup package's readout is ``{"output": 1}``, Lemma F.12).
    """
    _check_variant(variant)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if b is None or c is None:
        b, c = mup_bc(2)
    bq, cq = _check_lists(b, c)
    chosen = set(_VARIANT_ROLES[variant] if roles is None else roles)
    bad = chosen - set(LAYER_ROLES)
    if bad or not chosen:
        raise ValueError(f"roles must be a non-empty subset of {LAYER_ROLES}; got {roles!r}")
    if parameterization in ("sp", "mup-naive"):
        return 0.0, {r: 0.0 for r in sorted(chosen)}
    solve = _solve_global if parameterization == "mup-global" else _solve_effective
    if weight_multipliers and set(weight_multipliers) - set(LAYER_ROLES):
        raise ValueError(
            f"weight_multipliers keys must be among {LAYER_ROLES}; got {sorted(weight_multipliers)}"
        )
    d, by_role = solve(bq, cq, chosen, variant, weight_multipliers)
    return float(d), {r: float(by_role[r]) for r in sorted(chosen)}


def table1() -> dict[str, dict[str, Any]]:
    """Table 1, derived: for each variant in μP, the μP² scalings as exponents of ``n`` of the
    global factor ``n^-d`` and the layerwise factors ``n^-d_l`` (``None`` where the table has
    "–"), and which roles global scaling alone perturbs effectively (left half of the table).

    Layerwise exponents are shown in canonical form; when every perturbed role has the same
    exponent no layerwise rescaling is needed and they are shown as 0 (as the paper does for
    elementwise ASAM and SAM-ON)."""
    b, c = mup_bc(2)
    bq, cq = _check_lists(b, c)
    out: dict[str, dict[str, Any]] = {}
    for variant in THEORY_VARIANTS:
        roles = _VARIANT_ROLES[variant]
        d, by_role = _solve_effective(bq, cq, roles, variant)
        if len(set(by_role.values())) == 1:
            by_role = {r: Fraction(0) for r in by_role}
        gd, g_role = _solve_global(bq, cq, roles, variant)
        ex = _role_exponents(bq, cq, variant)
        row: dict[str, Any] = {"global": float(-d)}
        for r in LAYER_ROLES:
            row[r] = float(-by_role[r]) if r in by_role else None
        row["perturbed_by_global"] = {
            r: (r in roles and -gd - g_role[r] + ex[r][0] == _TARGET[r]) for r in LAYER_ROLES
        }
        out[variant] = row
    return out


def table_f1() -> list[dict[str, Any]]:
    """Table F.1: for ranges of the global exponent ``d`` (SAM, μP), which roles can be
    perturbed effectively and which may dominate the gradient norm, derived from (F.1) and
    (D.1).  Each row: ``{"d": str, "effective": {role: bool}, "dominate": {role: bool}}``."""
    b, c = mup_bc(2)
    bq, cq = _check_lists(b, c)
    ex = _role_exponents(bq, cq, "sam")
    # effective d_r (F.1 equality) and the norm bound of role r:
    # effective possible iff d_r(effective) >= norm bound, i.e. d <= num - target - norm;
    # dominating possible iff the norm bound is compatible with stability: d >= num - target - norm
    crit = {r: ex[r][0] - _TARGET[r] - ex[r][1] for r in LAYER_ROLES}
    probes = [
        ("d=-1/2", Fraction(-1, 2)),
        ("d in (-1/2,0)", Fraction(-1, 4)),
        ("d=0", Fraction(0)),
        ("d in (0,1/2)", Fraction(1, 4)),
        ("d=1/2", Fraction(1, 2)),
        ("d>1/2", Fraction(3, 4)),
    ]
    return [
        {
            "d": label,
            "effective": {r: d <= crit[r] and d >= min(crit.values()) for r in LAYER_ROLES},
            "dominate": {r: d >= crit[r] for r in LAYER_ROLES},
        }
        for label, d in probes
    ]


def explain(result: Mapping[str, Any]) -> str:
    """Human-readable summary of :func:`classify`'s result."""
    lines = []
    if not result["stable"]:
        failed = [k for k, v in result["stability"].items() if not v]
        lines.append("UNSTABLE: violated conditions of Thm D.2: " + ", ".join(failed))
    else:
        lines.append("stable (Thm D.2)")
    lines.append(
        f"r = {result['r']:g} (feature learning: {result['feature_learning']}), "
        f"r_tilde = {result['r_tilde']}, nontrivial: {result['nontrivial']}, "
        f"perturbation nontrivial: {result['perturbation_nontrivial']}"
    )
    n = len(result["effective"])
    for i, eff in enumerate(result["effective"]):
        role = layer_role(i, n)
        if result["d_layers"][i] is None:
            state = "not perturbed"
        elif eff:
            state = "effectively perturbed"
        elif i < n - 1 and result["vanishing"][i]:
            state = "vanishing perturbations"
        else:
            state = "non-vanishing, not effective"
        lines.append(f"  layer {i + 1} ({role}): {state}; d_l = {result['d_layers'][i]}")
    return "\n".join(lines)
