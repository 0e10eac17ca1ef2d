"""``mupp demo``: the paper's claim on any machine, in about 10 minutes on 2 CPU cores.

1. **The mechanism** (seconds, deterministic enough to hold on any machine): the perturbation
   coordinate check of the MLP under μP-global and μP² (Fig. 2).  μP-global's input and hidden
   perturbation effects vanish with width (only the readout is effectively perturbed,
   Prop. 2); μP²'s stay flat (Thm 11).
2. **The accuracy verdict**: the overfitting regime in miniature (preset ``mlp-cifar10-demo``),
   with the budget spent on one statistic: μP² SAM at the base width's ρ against μP-global SAM
   at its better ρ, at the widest width, paired by seed.  μP-global's ρ is chosen on the same
   seeds, which favours μP-global: the head-to-head is conservative for μP².
3. **A verdict a person reads**: a few sentences built from the numbers, significant or not,
   and one figure with the mechanism and the accuracy side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..choices import LAYER_ROLES
from ..diagnostics.layers import weight_layers
from ..models import build
from ..shapes import get_info
from .analysis import is_sam_cell
from .checks import coordcheck
from .confidence import excludes_zero, paired

SETTINGS = ("mup-global", "mupp")
# The base width's best ρ of μP² in the full overfitting study (every η and width, 3 seeds,
# docs/results.md); the demo preset's ρ grid is (0, BASE_RHO, 4 BASE_RHO).
BASE_RHO = 0.2
# How far the demo's headline numbers moved between two runs with different thread layouts on
# one machine (0.25-0.30 points; docs/results.md, "mupp demo"): the spread to expect elsewhere.
MACHINE_SPREAD_POINTS = 0.3


def mechanism(
    widths: Sequence[int] = (64, 256, 1024, 2048),
    *,
    base_width: int = 64,
    dataset: str = "cifar10",
    data_dir: str | None = None,
    rho: float = BASE_RHO,
    lr: float = 0.05,
    steps: int = 10,
    seeds: int = 2,
) -> dict[str, Any]:
    """The perturbation coordinate check of the MLP under μP-global and μP² (Fig. 2): per
    setting, each role's ``pert_rms`` (RMS of ``ε_l x^{l-1}``, Def. 8) per width and its width
    exponent, the hidden layers' geometric mean standing for ``hidden``."""
    with_roles = build("mlp", base_width, base_width)
    role = {name: get_info(mod.weight).role for name, mod in weight_layers(with_roles)}
    out: dict[str, Any] = {"widths": list(widths), "values": {}, "slopes": {}}
    for setting in SETTINGS:
        res = coordcheck(
            "mlp",
            widths,
            base_width=base_width,
            parameterization=setting,
            steps=steps,
            seeds=seeds,
            lr=lr,
            rho=rho,
            dataset=dataset,
            data_dir=data_dir,
            progress=False,
        )
        values: dict[str, list[float]] = {}
        slopes: dict[str, float] = {}
        for r in LAYER_ROLES:
            layers = [n for n in res["layers"] if role.get(n) == r]
            if not layers:
                continue
            per_width = [
                math.exp(
                    sum(math.log(res["metrics"]["pert_rms"][n][i]) for n in layers) / len(layers)
                )
                for i in range(len(widths))
            ]
            values[r] = per_width
            slopes[r] = sum(res["slopes"]["pert_rms"][n] for n in layers) / len(layers)
        out["values"][setting] = values
        out["slopes"][setting] = slopes
    return out


def _by_seed(rows: Sequence[Mapping[str, Any]], setting: str, width: float, rho: float) -> dict:
    return {
        r["seed"]: r["acc"] * 100
        for r in rows
        if r["parameterization"] == setting and r["width"] == width and r["rho"] == rho
    }


def _diff(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any] | None:
    d = paired(a, b)
    if d is None:
        return None
    return {**d, "significant": excludes_zero(d)}


def verdict(rows: Sequence[Mapping[str, Any]], base_rho: float = BASE_RHO) -> dict[str, Any]:
    """The demo's statistics in points (95% t-intervals over seeds, paired by seed): at the
    widest width, μP² at ``base_rho`` minus SGD, μP-global at its better ρ minus SGD, and
    μP² minus μP-global (the head-to-head); at the base width, SAM at ``base_rho`` minus SGD.
    Raises ``ValueError`` when the rows lack a cell the verdict needs."""
    widths = sorted({r["width"] for r in rows})
    if len(widths) < 2:
        raise ValueError(f"the demo's verdict needs two widths; the records have {widths}")
    base, widest = widths[0], widths[-1]
    rhos = sorted({r["rho"] for r in rows if is_sam_cell(r["rho"])})
    sgd = _by_seed(rows, "mupp", widest, 0.0)
    mupp = _by_seed(rows, "mupp", widest, base_rho)
    if not sgd or not mupp:
        raise ValueError(f"the records lack SGD or μP² at rho={base_rho} at width {widest:g}")
    global_cells = {rho: _by_seed(rows, "mup-global", widest, rho) for rho in rhos}
    global_cells = {rho: c for rho, c in global_cells.items() if c}
    if not global_cells:
        raise ValueError(f"the records lack μP-global SAM at width {widest:g}")
    global_rho = max(
        global_cells, key=lambda rho: sum(global_cells[rho].values()) / len(global_cells[rho])
    )
    glob = global_cells[global_rho]
    return {
        "base_width": base,
        "width": widest,
        "base_rho": base_rho,
        "global_rho": global_rho,
        "global_rhos": sorted(global_cells),
        "seeds": sorted(set(sgd) & set(mupp) & set(glob)),
        "mupp_vs_sgd": _diff(mupp, sgd),
        "global_vs_sgd": _diff(glob, sgd),
        "mupp_vs_global": _diff(mupp, glob),
        "base_gain": _diff(
            _by_seed(rows, "mupp", base, base_rho), _by_seed(rows, "mupp", base, 0.0)
        ),
        "accuracy": {
            "sgd": sum(sgd.values()) / len(sgd),
            "mupp": sum(mupp.values()) / len(mupp),
            "mup-global": sum(glob.values()) / len(glob),
        },
    }


def _pm(d: Mapping[str, Any] | None) -> str:
    if d is None:
        return "n/a"
    hw = d["half_width"]
    return f"{d['mean']:+.2f} ± {hw:.2f}" if math.isfinite(hw) else f"{d['mean']:+.2f} (one seed)"


def sentences(v: Mapping[str, Any], mech: Mapping[str, Any] | None) -> list[str]:
    """3-5 plain sentences built from :func:`verdict` and :func:`mechanism`, which say so when
    a difference is not significant."""
    n, w = len(v["seeds"]), v["width"]
    head, gain = v["mupp_vs_global"], v["mupp_vs_sgd"]
    which = (
        "at the same ρ"
        if v["global_rhos"] == [v["base_rho"]]
        else f"at its better ρ, {v['global_rho']:g}"
    )
    out = [
        f"At width {w:g}, μP² SAM (ρ = {v['base_rho']:g}, the base width's optimum) beats SGD by "
        f"{_pm(gain)} points and μP-global SAM ({which}) by {_pm(head)} points (95%, {n} "
        "seeds, paired by seed)."
    ]
    if head is not None and head["significant"] and head["mean"] > 0:
        out.append(
            "The head-to-head is significant: the ρ tuned at the base width keeps paying off at "
            "width under μP², not under μP-global (whose re-tuned optimum stays below μP²'s in the "
            "full study, docs/results.md)."
        )
    else:
        out.append(
            "The head-to-head is not significant at 95% with these seeds (its interval crosses "
            "zero): this run does not separate μP² from μP-global; more seeds (--seeds) or the "
            "full study (docs/results.md, 3 η × 7 ρ × 3 seeds) do."
        )
    if mech is not None:
        g, p = mech["slopes"]["mup-global"], mech["slopes"]["mupp"]
        out.append(
            "μP-global's input and hidden layers are effectively unperturbed at width (their "
            f"perturbation effect scales like width^{g['input']:+.2f} and width^{g['hidden']:+.2f}, "
            f"the readout's like width^{g['output']:+.2f}); μP²'s are flat (width^{p['input']:+.2f}, "
            f"width^{p['hidden']:+.2f}, width^{p['output']:+.2f})."
        )
    base = v["base_gain"]
    out.append(
        f"At the base width {v['base_width']:g} both settings are the same runs; SAM gains "
        f"{_pm(base)} points there."
    )
    out.append(
        f"Your numbers may differ from ours by about {MACHINE_SPREAD_POINTS:g} points between "
        "machines (floating-point results differ between machines and thread layouts)."
    )
    return out
