"""From sweep results to the paper's Figure 1 workflow: optimum per width, its shift,
transfer regret, SAM's gain over SGD (``mupp transfer``) and heatmaps (``mupp plot``)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


def rows_from_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flatten sweep records (``params`` + ``result``) into one row per run.

    ``setting`` names what a transfer table compares: the parameterization, with the SAM
    variant appended when it is not plain SAM (``"mupp/sam-on"``).
    """
    rows = []
    for r in records:
        cfg = dict(r["result"]["config"])
        cfg.update(r.get("params", {}))
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


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, dict[tuple, dict[str, float]]]:
    """``{(setting, width): {(lr, rho): cell}}``; a cell holds the mean ``acc`` over seeds, its
    standard deviation ``acc_std``, the mean ``acc_exact`` (``None`` unless every run has it),
    the ``diverged`` fraction and the number of runs ``n``."""
    cells: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r.get("setting", r["parameterization"]), r["width"])][(r["lr"], r["rho"])].append(r)
    out: dict[tuple, dict[tuple, dict[str, float]]] = {}
    for key, grid in cells.items():
        out[key] = {}
        for lr_rho, runs in grid.items():
            accs = [x["acc"] for x in runs]
            mean = sum(accs) / len(accs)
            exact = [x.get("acc_exact") for x in runs]
            out[key][lr_rho] = {
                "acc": mean,
                "acc_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)),
                "acc_exact": None if None in exact else sum(exact) / len(exact),
                "diverged": sum(x["diverged"] for x in runs) / len(runs),
                "n": len(runs),
            }
    return out


def _optimum(
    cells: Mapping[tuple, Mapping[str, float]], rho_filter=None
) -> tuple[tuple, float] | None:
    best = None
    for (lr, rho), v in cells.items():
        if rho_filter is not None and not rho_filter(rho):
            continue
        if best is None or v["acc"] > best[1]:
            best = ((lr, rho), v["acc"])
    return best


def transfer_summary(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per parameterization: optimum ``(lr, rho)`` per width, its shift in grid steps from the
    smallest to the largest width, transfer regret (accuracy lost at the largest width by using
    the smallest width's optimum) and SAM's gain over SGD (best ``rho > 0`` minus best
    ``rho = 0``, each over learning rates) per width."""
    agg = aggregate(rows)
    lrs = sorted({r["lr"] for r in rows})
    rhos = sorted({r["rho"] for r in rows})
    out: dict[str, Any] = {"lr_grid": lrs, "rho_grid": rhos, "parameterizations": {}}
    for par in sorted({p for p, _ in agg}):
        widths = sorted(w for p, w in agg if p == par)
        per_width = {}
        for w in widths:
            cells = agg[(par, w)]
            opt = _optimum(cells, lambda rho: rho > 0) or _optimum(cells)
            sgd = _optimum(cells, lambda rho: rho == 0)
            sam = _optimum(cells, lambda rho: rho > 0)
            per_width[w] = {
                "lr": opt[0][0],
                "rho": opt[0][1],
                "acc": opt[1],
                "acc_std": cells[opt[0]]["acc_std"],
                "acc_exact": cells[opt[0]]["acc_exact"],
                "seeds": cells[opt[0]]["n"],
                "sgd_acc": sgd[1] if sgd else None,
                "sam_gain": (sam[1] - sgd[1]) if (sam and sgd) else None,
            }
        small, large = per_width[widths[0]], per_width[widths[-1]]
        transferred = agg[(par, widths[-1])].get((small["lr"], small["rho"]))
        out["parameterizations"][par] = {
            "widths": widths,
            "optimum": per_width,
            "shift_lr_steps": lrs.index(large["lr"]) - lrs.index(small["lr"]),
            "shift_rho_steps": rhos.index(large["rho"]) - rhos.index(small["rho"]),
            "transfer_acc": transferred["acc"] if transferred else None,
            "transfer_regret": (large["acc"] - transferred["acc"]) if transferred else None,
        }
    return out


def format_transfer(summary: Mapping[str, Any]) -> str:
    lines = []
    for par, s in summary["parameterizations"].items():
        lines.append(f"{par}")
        lines.append(
            f"  {'width':>8} {'best lr':>9} {'best rho':>9} {'test acc':>16} {'exact 1k':>9}"
            f" {'SGD acc':>9} {'SAM gain':>9}"
        )
        for w in s["widths"]:
            o = s["optimum"][w]
            sgd = "-" if o["sgd_acc"] is None else f"{o['sgd_acc']:.4f}"
            gain = "-" if o["sam_gain"] is None else f"{o['sam_gain']:+.4f}"
            acc = f"{o['acc']:.4f}±{o['acc_std']:.4f}" if o["seeds"] > 1 else f"{o['acc']:.4f}"
            exact = "-" if o["acc_exact"] is None else f"{o['acc_exact']:.4f}"
            lines.append(
                f"  {w:>8g} {o['lr']:>9.4g} {o['rho']:>9.4g} {acc:>16} {exact:>9} {sgd:>9} {gain:>9}"
            )
        regret = "-" if s["transfer_regret"] is None else f"{s['transfer_regret']:.4f}"
        lines.append(
            f"  optimum shift {s['widths'][0]:g} -> {s['widths'][-1]:g}: lr {s['shift_lr_steps']:+d} steps, "
            f"rho {s['shift_rho_steps']:+d} steps; transfer regret {regret}"
        )
        lines.append("")
    return "\n".join(lines)


def plot_sweep(rows: list[Mapping[str, Any]], prefix: str) -> list[str]:
    """Fig. 1-style heatmaps (test accuracy over lr × rho per parameterization and width, ×
    at the optimum, the region within 1% of it outlined, diverged cells grey) and slices
    (accuracy against rho at each width's best lr, SGD baseline dashed).  Writes PNG and PDF;
    returns the paths."""
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
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        p = f"{prefix}_heatmaps.{ext}"
        fig.savefig(p, dpi=120)
        paths.append(p)
    plt.close(fig)

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
            ys = [cells.get((lr, r), {}).get("acc", math.nan) * 100 for r in pos_rhos]
            line = ax.semilogx(pos_rhos, ys, "o-", label=f"width {w:g} (η={lr:g})")[0]
            sgd = _optimum(cells, lambda rho: rho == 0)
            if sgd:
                ax.axhline(sgd[1] * 100, ls="--", color=line.get_color(), lw=1)
        if pos_rhos:
            ax.set_xticks(pos_rhos, [f"{r:g}" for r in pos_rhos])
            ax.minorticks_off()
        ax.set_xlabel("perturbation radius ρ")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{par}: slice at each width's best η (dashed: SGD, ρ=0)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        p = f"{prefix}_slices.{ext}"
        fig.savefig(p, dpi=120)
        paths.append(p)
    plt.close(fig)
    return paths
