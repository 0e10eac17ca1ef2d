"""Figures: sweep heatmaps, ρ-slices and SAM's gain against width (``mupp plot``, paper
Fig. 1), and coordinate checks (``mupp coordcheck --plot``, Fig. 2).

Figures are drawn on :class:`matplotlib.figure.Figure` objects, without pyplot: nothing here
changes the user's matplotlib backend or leaves figures open.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..choices import METRICS, Metric, check_choice
from ..diagnostics.coordcheck import METRICS as COORD_METRICS
from .analysis import (
    aggregate,
    best_cell,
    is_sam_cell,
    optimum,
    tied_with_best,
    transfer_summary,
)


@dataclass(frozen=True)
class _Scale:
    """How a metric is drawn: a shown value is ``factor`` × a row's ``acc`` (which the analyses
    maximize: accuracy, or minus the validation loss), a gain ``abs(factor)`` × its difference."""

    factor: float
    label: str  # the value's axis label
    gain_label: str  # the gain's axis label
    cmap: str  # brighter is better either way
    one_seed_tie: str  # the outline with one seed: cells within 0.01 (in ``acc``) of the best


_SCALES = {
    "acc": _Scale(
        100.0, "test accuracy (%)", "SAM's accuracy gain (points)", "viridis", "within 1 point"
    ),
    "loss": _Scale(
        -1.0,
        "best validation loss (nats/token)",
        "SAM's validation-loss reduction (nats)",
        "viridis_r",
        "within 0.01 nats",
    ),
}


def plot_sweep(rows: list[Mapping[str, Any]], prefix: str, metric: Metric = "acc") -> list[str]:
    """Fig. 1-style heatmaps (the seed mean of ``metric`` over lr × rho per setting and width, ×
    at the optimum, the cells statistically tied with it outlined, diverged cells grey), slices
    (the metric against rho at each width's best lr with 95% intervals over seeds, ρ = 0
    dashed) and SAM's gain against width (:func:`plot_gain`).  ``rows`` come from
    :func:`~mupp.lab.analysis.rows_from_records` with the same ``metric`` (``"loss"``: the
    best validation loss of a language model).  Writes PNG and PDF; returns the paths."""
    check_choice("metric", metric, METRICS)
    agg = aggregate(rows)
    lrs = sorted({r["lr"] for r in rows})
    rhos = sorted({r["rho"] for r in rows})
    paths = _save(_heatmaps(agg, lrs, rhos, metric), prefix, "heatmaps")
    paths += _save(_slices(agg, rhos, metric), prefix, "slices")
    paths += plot_gain(rows, prefix, metric)
    return paths


def _heatmaps(
    agg: Mapping[tuple, Mapping], lrs: list[float], rhos: list[float], metric: Metric
) -> Figure:
    """One panel per setting (rows) and width (columns): the seed mean over lr × rho."""
    scale = _SCALES[metric]
    pars = sorted({p for p, _ in agg})
    widths = sorted({w for _, w in agg})
    fig = Figure(figsize=(3.2 * len(widths) + 1, 3.0 * len(pars)))
    axes = fig.subplots(len(pars), len(widths), squeeze=False)
    for i, par in enumerate(pars):
        for j, w in enumerate(widths):
            ax = axes[i][j]
            cells = agg.get((par, w), {})
            val = np.full((len(lrs), len(rhos)), np.nan)
            div = np.zeros_like(val, dtype=bool)
            for (lr, rho), v in cells.items():
                val[lrs.index(lr), rhos.index(rho)] = v["acc"] * scale.factor
                div[lrs.index(lr), rhos.index(rho)] = v["diverged"] >= 0.5
            shown = np.where(div, np.nan, val)
            im = ax.imshow(shown, origin="lower", aspect="auto", cmap=scale.cmap)
            ax.imshow(
                np.where(div, 1.0, np.nan),
                origin="lower",
                aspect="auto",
                cmap="Greys",
                vmin=0,
                vmax=2,
            )
            if cells and np.isfinite(shown).any():
                _mark_optimum(ax, cells, lrs, rhos)
            fig.colorbar(im, ax=ax, label=scale.label)
            ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos], rotation=45)
            ax.set_yticks(range(len(lrs)), [f"{x:g}" for x in lrs])
            ax.set_xlabel("perturbation radius ρ")
            ax.set_ylabel("learning rate η")
            ax.set_title(f"{par}, width {w:g}")
    fig.suptitle(
        "×: best SAM cell (as mupp transfer reports it); outlined: the cells tied with it "
        f"(95%, paired by seed; with one seed, {scale.one_seed_tie})",
        fontsize=9,
    )
    return fig


def _mark_optimum(ax: Any, cells: Mapping[tuple, Mapping], lrs: list, rhos: list) -> None:
    """× on the optimum of :func:`best_cell`; the cells of :func:`tied_with_best` outlined
    along their edges (with one seed, where no test is possible: those within 0.01 of the
    best in ``acc``, i.e. 1 point of accuracy or 0.01 nats of loss)."""
    (lr, rho), acc = best_cell(cells)
    ax.plot(rhos.index(rho), lrs.index(lr), "x", color="red", markersize=12, mew=3)
    tied = tied_with_best(cells, (lr, rho))
    if tied is None:
        tied = [k for k, v in cells.items() if v["acc"] >= acc - 0.01 and not v["diverged"]]
    inside = {(lrs.index(a), rhos.index(b)) for a, b in tied}
    for i, j in inside:
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if (i + di, j + dj) not in inside:  # an edge of the tied region
                if di:
                    xs, ys = [j - 0.5, j + 0.5], [i + di / 2] * 2
                else:
                    xs, ys = [j + dj / 2] * 2, [i - 0.5, i + 0.5]
                ax.plot(xs, ys, color="white", lw=1.5, solid_capstyle="projecting")


def _slices(agg: Mapping[tuple, Mapping], rhos: list[float], metric: Metric) -> Figure:
    """One panel per setting: the metric against rho at each width's best SAM lr (95% CI
    bars), with ρ = 0 (the base optimizer alone) at that lr dashed."""
    scale = _SCALES[metric]
    pars = sorted({p for p, _ in agg})
    widths = sorted({w for _, w in agg})
    fig = Figure(figsize=(5 * len(pars), 3.8))
    axes = fig.subplots(1, len(pars), squeeze=False)
    pos_rhos = [r for r in rhos if is_sam_cell(r)]
    for i, par in enumerate(pars):
        ax = axes[0][i]
        for w in widths:
            cells = agg.get((par, w), {})
            opt = optimum(cells, is_sam_cell)
            if not opt or not pos_rhos:
                continue
            lr = opt[0][0]
            got = [(r, cells[(lr, r)]) for r in pos_rhos if (lr, r) in cells]
            ys = [c["acc"] * scale.factor for _, c in got]
            err = [
                0.0 if math.isnan(c["acc_ci"]) else c["acc_ci"] * abs(scale.factor) for _, c in got
            ]
            line = ax.errorbar(
                [r for r, _ in got],
                ys,
                yerr=err,
                fmt="o-",
                capsize=3,
                label=f"width {w:g} (η={lr:g})",
            )[0]
            base = cells.get((lr, 0.0))
            if base:
                ax.axhline(base["acc"] * scale.factor, ls="--", color=line.get_color(), lw=1)
        if pos_rhos:
            ax.set_xscale("log")
            ax.set_xticks(pos_rhos, [f"{r:g}" for r in pos_rhos])
            ax.minorticks_off()
        ax.set_xlabel("perturbation radius ρ")
        ax.set_ylabel(scale.label)
        ax.set_title(f"{par}: at each width's best η\n(dashed: ρ = 0 at that η; bars: 95% CI)")
        ax.legend(fontsize=8)
    return fig


def plot_gain(rows: list[Mapping[str, Any]], prefix: str, metric: Metric = "acc") -> list[str]:
    """SAM's gain over the base optimizer (ρ = 0) against width, one line per setting, with the
    95% interval of the per-seed paired gain (:func:`transfer_summary`): the paper's claim in
    one picture (μP²'s gain persists with width, μP-global's decays toward last-layer SAM's;
    Fig. 1).  ``metric="loss"``: the gain is the reduction of the best validation loss."""
    check_choice("metric", metric, METRICS)
    unit = abs(_SCALES[metric].factor)
    summary = transfer_summary(rows)["parameterizations"]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for par, s in summary.items():
        ws, gains, errs = [], [], []
        for w in s["widths"]:
            d = s["optimum"][w]["sam_gain_diff"]
            if d["mean"] is None:
                continue
            ws.append(w)
            gains.append(d["mean"] * unit)
            errs.append(0.0 if d["ci"] is None else d["ci"] * unit)
        if ws:
            ax.errorbar(ws, gains, yerr=errs, fmt="o-", capsize=3, label=par)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel(_SCALES[metric].gain_label)
    ax.set_title("best SAM minus best ρ = 0, paired by seed (95% CI)")
    ax.legend(fontsize=8)
    return _save(fig, prefix, "gain")


def _save(fig, prefix: str, kind: str) -> list[str]:
    """Write ``{prefix}_{kind}.png`` and ``.pdf``; returns the paths."""
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        path = f"{prefix}_{kind}.{ext}"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def plot_coordcheck(result: Mapping[str, Any], path: str) -> None:
    """A coordinate check (:func:`mupp.diagnostics.coord_data`) as one log-log panel per
    metric, one line per layer with its fitted width exponent (paper Fig. 2), and for LP/DP a
    last panel with the ascent step's denominator per role (Def. 4)."""
    denominator = (result.get("denominator") or {}).get("values") or {}
    panels = [(m, result["metrics"][m], result["slopes"][m]) for m in COORD_METRICS]
    if denominator:
        panels.append(("denominator", denominator, result["denominator"]["slopes"]))
    fig = Figure(figsize=(4 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels))
    for ax, (title, lines, slopes) in zip(axes, panels):
        for name, vals in lines.items():
            if all(v > 0 for v in vals):
                ax.loglog(result["widths"], vals, "o-", label=f"{name} ({slopes[name]:+.2f})")
        ax.set_title(title)
        ax.set_xlabel("width")
        ax.legend(fontsize=7)
    cfg = result["config"]
    keys = ("model", "parameterization", "variant", "rule")
    title = " ".join(str(cfg[k]) for k in keys if k in cfg)
    fig.suptitle(f"{title}: {cfg['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_demo(mechanism: Mapping[str, Any], verdict: Mapping[str, Any], path: str) -> str:
    """``mupp demo``'s figure (PNG): left, the perturbation effect per role against width under
    μP-global and μP² (Fig. 2's mechanism); right, the paired differences at the widest width
    (μP² − SGD, μP-global − SGD, μP² − μP-global) with their 95% intervals."""
    fig = Figure(figsize=(9.0, 3.6))
    left, right = fig.subplots(1, 2)
    widths = mechanism["widths"]
    colors = {"input": "tab:blue", "hidden": "tab:orange", "output": "tab:green"}
    for setting, style in (("mup-global", "--"), ("mupp", "-")):
        for role, values in mechanism["values"][setting].items():
            s = mechanism["slopes"][setting][role]
            left.plot(widths, values, style, marker="o", color=colors.get(role, "grey"),
                      label=f"{'μP²' if setting == 'mupp' else 'μP-global'} {role} ({s:+.2f})")  # fmt: skip
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("width")
    left.set_ylabel("RMS of ε_l x (Def. 8)")
    left.set_title("perturbation effect per layer (exponent)")
    left.legend(fontsize=7)
    labels, means, errs = [], [], []
    for key, label in (
        ("mupp_vs_sgd", f"μP² (ρ={verdict['base_rho']:g}) − SGD"),
        ("global_vs_sgd", f"μP-global (ρ={verdict['global_rho']:g}) − SGD"),
        ("mupp_vs_global", "μP² − μP-global"),
    ):
        d = verdict[key]
        if d is None:
            continue
        labels.append(label)
        means.append(d["mean"])
        errs.append(d["half_width"] if math.isfinite(d["half_width"]) else 0.0)
    ys = np.arange(len(labels))[::-1]
    right.errorbar(means, ys, xerr=errs, fmt="o", capsize=4, color="black")
    right.axvline(0.0, color="grey", lw=1)
    right.set_yticks(ys, labels, fontsize=8)
    right.set_xlabel("test accuracy difference (points)")
    right.set_title(
        f"width {verdict['width']:g}: paired by seed, 95% ({len(verdict['seeds'])} seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
