"""From sweep results to the paper's Figure 1 workflow: optimum per width, its shift,
transfer regret, SAM's gain over SGD (``mupp transfer``) and heatmaps (``mupp plot``)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from . import confidence


def rows_from_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flatten sweep records (``params`` + ``result``) into one row per run.

    ``setting`` names what a transfer table compares: the parameterization, with the SAM
    variant appended when it is not plain SAM (``"mupp/sam-on"``).
    """
    from .sweep import expand_point

    rows = []
    for r in records:
        cfg = dict(r["result"]["config"])
        cfg.update(expand_point(r.get("params", {})))
        variant = cfg.get("variant", "sam")
        rows.append(
            {
                "setting": cfg["parameterization"] + ("" if variant == "sam" else f"/{variant}"),
                "parameterization": cfg["parameterization"],
                "variant": variant,
                "width": cfg["width"],
                "lr": cfg["lr"],
                "rho": cfg["rho"],
                "seed": cfg.get("seed", 0),
                "acc": r["result"]["best_test_acc"],
                "acc_exact": r["result"].get("test_acc_exact"),
                "diverged": bool(r["result"]["diverged"]),
            }
        )
    return rows


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, dict[tuple, dict[str, Any]]]:
    """``{(setting, width): {(lr, rho): cell}}``; a cell holds the mean ``acc`` over seeds, its
    standard deviation ``acc_std``, the half-width ``acc_ci`` of its 95% t-interval (``nan``
    with one seed), the accuracy ``by_seed``, the mean ``acc_exact`` (``None`` unless every run
    has it), the ``diverged`` fraction and the number of runs ``n``."""
    cells: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r.get("setting", r["parameterization"]), r["width"])][(r["lr"], r["rho"])].append(r)
    out: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    for key, grid in cells.items():
        out[key] = {}
        for lr_rho, runs in grid.items():
            accs = [x["acc"] for x in runs]
            mean = sum(accs) / len(accs)
            exact = [x.get("acc_exact") for x in runs]
            out[key][lr_rho] = {
                "acc": mean,
                "acc_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)),
                "acc_ci": confidence.interval(accs)["half_width"],
                "by_seed": {x.get("seed", 0): x["acc"] for x in runs},
                "acc_exact": None if None in exact else sum(exact) / len(exact),
                "diverged": sum(x["diverged"] for x in runs) / len(runs),
                "n": len(runs),
            }
    return out


def _optimum(
    cells: Mapping[tuple, Mapping[str, Any]], rho_filter=None
) -> tuple[tuple, float] | None:
    best = None
    for (lr, rho), v in cells.items():
        if rho_filter is not None and not rho_filter(rho):
            continue
        if best is None or v["acc"] > best[1]:
            best = ((lr, rho), v["acc"])
    return best


def tied_with_best(cells: Mapping[tuple, Mapping[str, Any]], best: tuple) -> list[tuple] | None:
    """The cells whose accuracy is statistically tied with cell ``best``: the 95% interval of
    the per-seed difference ``best - cell`` contains zero.  ``None`` when fewer than two seeds
    make the test impossible."""
    if cells[best]["n"] < 2:
        return None
    tied = []
    for lr_rho, v in cells.items():
        d = confidence.paired(cells[best]["by_seed"], v["by_seed"])
        if lr_rho == best or (d is not None and d["n"] >= 2 and not confidence.excludes_zero(d)):
            tied.append(lr_rho)
    return sorted(tied)


def _diff(d: Mapping[str, float] | None) -> dict[str, Any]:
    if d is None:
        return {"mean": None, "ci": None, "seeds": 0}
    ci = d["half_width"]
    return {"mean": d["mean"], "ci": None if math.isnan(ci) else ci, "seeds": d["n"]}


def transfer_summary(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per setting (parameterization, and SAM variant when not plain SAM), per width:

    - the optimum ``(lr, rho)`` by seed-mean accuracy, its 95% interval ``acc_ci`` and the grid
      cells statistically ``tied`` with it (paired over seeds, :func:`tied_with_best`);
    - SAM's gain over SGD: the best ``rho > 0`` cell minus the best ``rho = 0`` cell (each over
      learning rates), ``sam_gain`` as a mean and ``sam_gain_diff`` paired per seed with its
      interval (same seed: same initialization and data order);

    and across widths: the optimum's shift in grid steps from the smallest to the largest width,
    whether it moved beyond the tie (``optimum_moved``: the small width's optimum is not tied
    with the best at the largest width) and the transfer regret, the accuracy lost at the
    largest width by using the smallest width's optimum, paired per seed with its interval.
    Picking the best of many cells favours lucky cells, so gains at the optimum lean high.
    """
    agg = aggregate(rows)
    lrs = sorted({r["lr"] for r in rows})
    rhos = sorted({r["rho"] for r in rows})
    out: dict[str, Any] = {
        "lr_grid": lrs,
        "rho_grid": rhos,
        "confidence_level": confidence.LEVEL,
        "parameterizations": {},
    }
    for par in sorted({p for p, _ in agg}):
        widths = sorted(w for p, w in agg if p == par)
        per_width = {}
        for w in widths:
            cells = agg[(par, w)]
            opt = _optimum(cells, lambda rho: rho > 0) or _optimum(cells)
            sgd = _optimum(cells, lambda rho: rho == 0)
            sam = _optimum(cells, lambda rho: rho > 0)
            gain = (
                confidence.paired(cells[sam[0]]["by_seed"], cells[sgd[0]]["by_seed"])
                if (sam and sgd)
                else None
            )
            ci = cells[opt[0]]["acc_ci"]
            tied = tied_with_best(cells, opt[0])
            per_width[w] = {
                "lr": opt[0][0],
                "rho": opt[0][1],
                "acc": opt[1],
                "acc_std": cells[opt[0]]["acc_std"],
                "acc_ci": None if math.isnan(ci) else ci,
                "acc_exact": cells[opt[0]]["acc_exact"],
                "seeds": cells[opt[0]]["n"],
                "tied": None if tied is None else [list(c) for c in tied],
                "sgd_lr": sgd[0][0] if sgd else None,
                "sgd_acc": sgd[1] if sgd else None,
                "sam_gain": (sam[1] - sgd[1]) if (sam and sgd) else None,
                "sam_gain_diff": _diff(gain),
            }
        small, large = per_width[widths[0]], per_width[widths[-1]]
        large_cells = agg[(par, widths[-1])]
        small_opt = (small["lr"], small["rho"])
        transferred = large_cells.get(small_opt)
        regret = (
            confidence.paired(
                large_cells[(large["lr"], large["rho"])]["by_seed"], transferred["by_seed"]
            )
            if transferred
            else None
        )
        tied_large = large["tied"]
        out["parameterizations"][par] = {
            "widths": widths,
            "optimum": per_width,
            "shift_lr_steps": lrs.index(large["lr"]) - lrs.index(small["lr"]),
            "shift_rho_steps": rhos.index(large["rho"]) - rhos.index(small["rho"]),
            "optimum_moved": None
            if tied_large is None or len(widths) < 2
            else list(small_opt) not in tied_large,
            "transfer_acc": transferred["acc"] if transferred else None,
            "transfer_regret": (large["acc"] - transferred["acc"]) if transferred else None,
            "transfer_regret_diff": _diff(regret),
        }
    return out


def _pm(mean: float | None, ci: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text if ci is None else f"{text}±{ci:.4f}"


def format_transfer(summary: Mapping[str, Any]) -> str:
    """The transfer table as text: ``±`` is the half-width of the 95% interval over seeds
    (paired by seed for the gain and the regret)."""
    lines = []
    for par, s in summary["parameterizations"].items():
        lines.append(f"{par}")
        lines.append(
            f"  {'width':>8} {'best lr':>9} {'best rho':>9} {'test acc':>16} {'exact 1k':>9}"
            f" {'tied':>5} {'SGD acc':>9} {'SAM gain (paired)':>18}"
        )
        for w in s["widths"]:
            o = s["optimum"][w]
            sgd = "-" if o["sgd_acc"] is None else f"{o['sgd_acc']:.4f}"
            gain = o["sam_gain_diff"]
            exact = "-" if o["acc_exact"] is None else f"{o['acc_exact']:.4f}"
            tied = "-" if o["tied"] is None else str(len(o["tied"]))
            lines.append(
                f"  {w:>8g} {o['lr']:>9.4g} {o['rho']:>9.4g} {_pm(o['acc'], o['acc_ci']):>16}"
                f" {exact:>9} {tied:>5} {sgd:>9} {_pm(gain['mean'], gain['ci'], True):>18}"
            )
        r = s["transfer_regret_diff"]
        moved = {None: "untested (one seed)", True: "yes", False: "no, within the tie"}[
            s["optimum_moved"]
        ]
        lines.append(
            f"  optimum shift {s['widths'][0]:g} -> {s['widths'][-1]:g}: lr {s['shift_lr_steps']:+d} "
            f"steps, rho {s['shift_rho_steps']:+d} steps; moved beyond the tie: {moved}; "
            f"transfer regret {_pm(r['mean'], r['ci'])}"
        )
        lines.append("")
    seeds = {
        o["seeds"] for s in summary["parameterizations"].values() for o in s["optimum"].values()
    }
    lines.append(
        f"± : {summary.get('confidence_level', confidence.LEVEL):.0%} t-interval over seeds "
        f"(seeds per cell: {', '.join(str(n) for n in sorted(seeds))}); tied: grid cells not "
        "significantly worse than the optimum (paired by seed)"
    )
    return "\n".join(lines)


def plot_sweep(rows: list[Mapping[str, Any]], prefix: str) -> list[str]:
    """Fig. 1-style heatmaps (seed-mean test accuracy over lr × rho per setting and width, ×
    at the optimum, the region within 1% of it outlined, diverged cells grey), slices
    (accuracy against rho at each width's best lr with 95% intervals over seeds, SGD dashed)
    and SAM's gain against width (:func:`plot_gain`).  Writes PNG and PDF; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    agg = aggregate(rows)
    lrs = sorted({r["lr"] for r in rows})
    rhos = sorted({r["rho"] for r in rows})
    pars = sorted({p for p, _ in agg})
    widths = sorted({w for _, w in agg})
    fig, axes = plt.subplots(
        len(pars), len(widths), figsize=(3.2 * len(widths) + 1, 3.0 * len(pars)), squeeze=False
    )
    for i, par in enumerate(pars):
        for j, w in enumerate(widths):
            ax = axes[i][j]
            cells = agg.get((par, w), {})
            acc = np.full((len(lrs), len(rhos)), np.nan)
            div = np.zeros_like(acc, dtype=bool)
            for (lr, rho), v in cells.items():
                acc[lrs.index(lr), rhos.index(rho)] = v["acc"] * 100
                div[lrs.index(lr), rhos.index(rho)] = v["diverged"] >= 0.5
            shown = np.where(div, np.nan, acc)
            im = ax.imshow(shown, origin="lower", aspect="auto", cmap="viridis")
            ax.imshow(
                np.where(div, 1.0, np.nan),
                origin="lower",
                aspect="auto",
                cmap="Greys",
                vmin=0,
                vmax=2,
            )
            if np.isfinite(shown).any():
                best = np.nanmax(shown)
                bi = np.unravel_index(np.nanargmax(shown), shown.shape)
                ax.plot(bi[1], bi[0], "x", color="red", markersize=12, mew=3)
                near = np.where(np.isfinite(shown), shown >= best - 1.0, False).astype(float)
                if near.sum() > 0 and len(lrs) > 1 and len(rhos) > 1:
                    ax.contour(near, levels=[0.5], colors="white", linewidths=1.5)
            fig.colorbar(im, ax=ax, label="test acc (%)")
            ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos], rotation=45)
            ax.set_yticks(range(len(lrs)), [f"{x:g}" for x in lrs])
            ax.set_xlabel("perturbation radius ρ")
            ax.set_ylabel("learning rate η")
            ax.set_title(f"{par}, width {w:g}")
    paths = _save(fig, prefix, "heatmaps")

    fig, axes = plt.subplots(1, len(pars), figsize=(5 * len(pars), 3.8), squeeze=False)
    pos_rhos = [r for r in rhos if r > 0]
    for i, par in enumerate(pars):
        ax = axes[0][i]
        for w in widths:
            cells = agg.get((par, w), {})
            opt = _optimum(cells, lambda rho: rho > 0)
            if not opt or not pos_rhos:
                continue
            lr = opt[0][0]
            got = [(r, cells[(lr, r)]) for r in pos_rhos if (lr, r) in cells]
            ys = [c["acc"] * 100 for _, c in got]
            err = [0.0 if math.isnan(c["acc_ci"]) else c["acc_ci"] * 100 for _, c in got]
            line = ax.errorbar(
                [r for r, _ in got],
                ys,
                yerr=err,
                fmt="o-",
                capsize=3,
                label=f"width {w:g} (η={lr:g})",
            )[0]
            sgd = cells.get((lr, 0.0))
            if sgd:
                ax.axhline(sgd["acc"] * 100, ls="--", color=line.get_color(), lw=1)
        if pos_rhos:
            ax.set_xscale("log")
            ax.set_xticks(pos_rhos, [f"{r:g}" for r in pos_rhos])
            ax.minorticks_off()
        ax.set_xlabel("perturbation radius ρ")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{par}: at each width's best η\n(dashed: SGD at that η; bars: 95% CI)")
        ax.legend(fontsize=8)
    paths += _save(fig, prefix, "slices")
    paths += plot_gain(rows, prefix)
    return paths


def plot_gain(rows: list[Mapping[str, Any]], prefix: str) -> list[str]:
    """SAM's gain over SGD against width, one line per setting, with the 95% interval of the
    per-seed paired gain (:func:`transfer_summary`): the paper's claim in one picture (μP²'s
    gain persists with width, μP-global's decays toward last-layer SAM's; Fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = transfer_summary(rows)["parameterizations"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for par, s in summary.items():
        ws, gains, errs = [], [], []
        for w in s["widths"]:
            d = s["optimum"][w]["sam_gain_diff"]
            if d["mean"] is None:
                continue
            ws.append(w)
            gains.append(d["mean"] * 100)
            errs.append(0.0 if d["ci"] is None else d["ci"] * 100)
        if ws:
            ax.errorbar(ws, gains, yerr=errs, fmt="o-", capsize=3, label=par)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("SAM gain over SGD (points)")
    ax.set_title("best SAM minus best SGD, paired by seed (95% CI)")
    ax.legend(fontsize=8)
    return _save(fig, prefix, "gain")


def _save(fig, prefix: str, kind: str) -> list[str]:
    """Write ``{prefix}_{kind}.png`` and ``.pdf``, close the figure, return the paths."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        path = f"{prefix}_{kind}.{ext}"
        fig.savefig(path, dpi=120)
        paths.append(path)
    plt.close(fig)
    return paths
