"""From sweep results to the paper's Figure 1 workflow: optimum per width, its shift,
transfer regret and SAM's gain over SGD, with confidence intervals over seeds (``mupp
transfer``); :mod:`mupp.lab.plots` draws them (``mupp plot``)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..choices import METRICS, Metric, check_choice
from . import confidence
from .grid import expand_point, format_pass_plan, standard_model

# the record field each metric reads and its sign: every analysis maximizes ``acc``
_METRIC_FIELD = {"acc": ("best_test_acc", 1.0), "loss": ("best_test_loss", -1.0)}


def rows_from_records(
    records: Iterable[Mapping[str, Any]], metric: Metric = "acc"
) -> list[dict[str, Any]]:
    """Flatten sweep records (``params`` + ``result``) into one row per run.

    ``acc`` is what the analyses maximize: the best-epoch test accuracy, or with
    ``metric="loss"`` minus the best validation loss (nats per token; language models), so
    that a positive gain is a lower loss.

    ``setting`` names what a transfer table compares: the parameterization, with the SAM
    variant appended when it is not plain SAM (``"mupp/sam-on"``) and the rule after it when
    it is not LP (``"mupp/sam/DP"``); ``standard-`` in front when the model is the standard
    network (:func:`~mupp.lab.grid.standard_model`: ``"standard-sp"`` is SP proper, ``"sp"``
    the μP model with unscaled η and ρ).
    """
    check_choice("metric", metric, METRICS)
    field, sign = _METRIC_FIELD[metric]
    rows = []
    for r in records:
        if field not in r["result"]:
            raise ValueError(
                f"metric {metric!r}: a run has no {field} (the validation loss is recorded for "
                "text datasets; use metric 'acc' for the image sweeps)"
            )
        cfg = dict(r["result"]["config"])
        cfg.update(expand_point(r.get("params", {})))
        variant, rule = cfg.get("variant", "sam"), cfg.get("rule", "LP")
        setting = ("standard-" if standard_model(cfg) else "") + cfg["parameterization"]
        plan = format_pass_plan(cfg)
        if plan != "two-pass":  # the full form: parameterization/variant/rule/plan
            setting += f"/{variant}/{rule}/{plan}"
        else:
            if variant != "sam" or rule != "LP":
                setting += f"/{variant}"
            if rule != "LP":
                setting += f"/{rule}"
        rows.append(
            {
                "setting": setting,
                "parameterization": cfg["parameterization"],
                "variant": variant,
                "rule": rule,
                "width": cfg["width"],
                "lr": cfg["lr"],
                "rho": cfg["rho"],
                "seed": cfg.get("seed", 0),
                "acc": sign * r["result"][field],
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


def is_sam_cell(rho: float) -> bool:
    """Whether a grid cell is a SAM cell (``rho > 0``); the others are the base optimizer's
    (:attr:`mupp.lab.config.TrainConfig.uses_sam` for one run)."""
    return rho > 0


def optimum(
    cells: Mapping[tuple, Mapping[str, Any]], rho_filter: Callable[[float], bool] | None = None
) -> tuple[tuple, float] | None:
    """``((lr, rho), mean acc)`` of the best cell among those whose ``rho`` passes
    ``rho_filter`` (``rho == 0``: SGD; ``rho > 0``: SAM); ``None`` when there is none."""
    best = None
    for (lr, rho), v in cells.items():
        if rho_filter is not None and not rho_filter(rho):
            continue
        if best is None or v["acc"] > best[1]:
            best = ((lr, rho), v["acc"])
    return best


def best_cell(cells: Mapping[tuple, Mapping[str, Any]]) -> tuple[tuple, float]:
    """``((lr, rho), mean acc)`` of a width's optimum as mupp reports it: the best SAM cell
    (``rho > 0``), or the best cell of all when the grid has no SAM cell."""
    return optimum(cells, is_sam_cell) or optimum(cells)


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


def _sam_vs_sgd(cells: Mapping[tuple, Mapping[str, Any]]) -> tuple:
    """``(sam, sgd, gain)``: the best ``rho > 0`` and the best ``rho = 0`` cell of ``cells`` (as
    :func:`optimum` gives them, ``None`` when absent) and the first minus the second, paired by
    seed (``None`` unless both exist)."""
    sam = optimum(cells, is_sam_cell)
    sgd = optimum(cells, lambda rho: not is_sam_cell(rho))
    gain = (
        confidence.paired(cells[sam[0]]["by_seed"], cells[sgd[0]]["by_seed"])
        if (sam and sgd)
        else None
    )
    return sam, sgd, gain


def _ci(cell: Mapping[str, Any]) -> float | None:
    """A cell's interval half-width, ``None`` where one seed leaves it undefined."""
    return None if math.isnan(cell["acc_ci"]) else cell["acc_ci"]


def _lr_slice(cells: Mapping[tuple, Mapping[str, Any]], lr: float) -> dict[str, Any]:
    """One learning rate's row of a width's grid: its best ``rho > 0`` cell, the SGD cell
    ``(lr, 0)`` and SAM's gain between the two, paired by seed."""
    sam, sgd, gain = _sam_vs_sgd({k: v for k, v in cells.items() if k[0] == lr})
    return {
        "rho": sam[0][1] if sam else None,
        "acc": sam[1] if sam else None,
        "acc_ci": _ci(cells[sam[0]]) if sam else None,
        "seeds": cells[sam[0]]["n"] if sam else 0,
        "sgd_acc": sgd[1] if sgd else None,
        "sam_gain_diff": _diff(gain),
    }


def _width_optimum(cells: Mapping[tuple, Mapping[str, Any]]) -> dict[str, Any]:
    """One width's row of :func:`transfer_summary`: its optimum, the cells tied with it, SAM's
    gain over SGD (paired by seed) and the ``by_lr`` rows of :func:`_lr_slice`."""
    sam, sgd, gain = _sam_vs_sgd(cells)
    opt = best_cell(cells)
    best = cells[opt[0]]
    tied = tied_with_best(cells, opt[0])
    return {
        "lr": opt[0][0],
        "rho": opt[0][1],
        "acc": opt[1],
        "acc_std": best["acc_std"],
        "acc_ci": _ci(best),
        "acc_exact": best["acc_exact"],
        "seeds": best["n"],
        "tied": None if tied is None else [list(c) for c in tied],
        "sgd_lr": sgd[0][0] if sgd else None,
        "sgd_acc": sgd[1] if sgd else None,
        "sam_gain": (sam[1] - sgd[1]) if (sam and sgd) else None,
        "sam_gain_diff": _diff(gain),
        "by_lr": {lr: _lr_slice(cells, lr) for lr in sorted({lr for lr, _ in cells})},
    }


def transfer_summary(rows: list[Mapping[str, Any]], versus: str | None = None) -> dict[str, Any]:
    """Per setting (parameterization, and SAM variant when not plain SAM), per width:

    - the optimum ``(lr, rho)`` by seed-mean accuracy, its 95% interval ``acc_ci`` and the grid
      cells statistically ``tied`` with it (paired over seeds, :func:`tied_with_best`);
    - SAM's gain over SGD: the best ``rho > 0`` cell minus the best ``rho = 0`` cell (each over
      learning rates), ``sam_gain`` as a mean and ``sam_gain_diff`` paired per seed with its
      interval (same seed: same initialization and data order);
    - ``by_lr``: per learning rate, the best ``rho > 0``, its accuracy and interval, the SGD
      cell at that learning rate and the paired gain over it, which shows whether the best
      ``rho`` depends on ``lr`` (the joint (η, ρ) transfer of the paper's Fig. 1);

    and across widths: the optimum's shift in grid steps from the smallest to the largest width,
    whether it moved beyond the tie (``optimum_moved``: the small width's optimum is not tied
    with the best at the largest width) and the transfer regret, the accuracy lost at the
    largest width by using the smallest width's optimum, paired per seed with its interval.
    With ``versus`` naming a setting, ``versus`` holds, per other setting and width, its best
    cell minus that setting's best cell, paired by seed: whether one parameterization beats
    another at a width, not only each one SGD.
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
        per_width = {w: _width_optimum(agg[(par, w)]) for w in widths}
        small, large = per_width[widths[0]], per_width[widths[-1]]
        large_cells = agg[(par, widths[-1])]
        small_opt = (small["lr"], small["rho"])
        # one width: nothing is transferred, so no shift and no regret (None, not 0)
        several = len(widths) > 1
        transferred = large_cells.get(small_opt) if several else None
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
            "shift_lr_steps": lrs.index(large["lr"]) - lrs.index(small["lr"]) if several else None,
            "shift_rho_steps": rhos.index(large["rho"]) - rhos.index(small["rho"])
            if several
            else None,
            "optimum_moved": None
            if tied_large is None or not several
            else list(small_opt) not in tied_large,
            "transfer_acc": transferred["acc"] if transferred else None,
            "transfer_regret": (large["acc"] - transferred["acc"]) if transferred else None,
            "transfer_regret_diff": _diff(regret),
        }
    if versus is not None:
        out["versus"] = _versus(agg, out["parameterizations"], versus)
    return out


def _versus(
    agg: Mapping[tuple, Mapping[tuple, Mapping[str, Any]]],
    settings: Mapping[str, Mapping[str, Any]],
    reference: str,
) -> dict:
    """``{"reference": reference, "diff": {setting: {width: paired difference}}}``: each other
    setting's optimum, as ``settings`` (the summary's per-setting entries) reports it, minus the
    reference's at the same width."""
    if reference not in settings:
        raise ValueError(
            f"versus={reference!r}: no such setting among the runs; expected one of "
            f"{sorted(settings)}"
        )

    def by_seed(par: str, w: float) -> dict:
        o = settings[par]["optimum"][w]
        return agg[(par, w)][(o["lr"], o["rho"])]["by_seed"]

    ref = settings[reference]["optimum"]
    diff: dict[str, dict] = {}
    for par, s in settings.items():
        for w in s["widths"]:
            if par != reference and w in ref:
                paired = confidence.paired(by_seed(par, w), by_seed(reference, w))
                diff.setdefault(par, {})[w] = _diff(paired)
    return {"reference": reference, "diff": diff}


def _pm(mean: float | None, ci: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text if ci is None else f"{text}±{ci:.4f}"


def format_transfer(summary: Mapping[str, Any], by_lr: bool = False, metric: Metric = "acc") -> str:
    """The transfer table as text: ``±`` is the half-width of the 95% interval over seeds
    (paired by seed for the gain and the regret); ``by_lr`` adds, under each width, one line
    per learning rate with its best ``rho`` and SAM's gain over the base optimizer alone
    (``rho = 0``: SGD or AdamW) at that learning rate.
    ``metric="loss"``: the values are minus the best validation loss (a gain is a reduction)."""
    name, base = ("test acc", "ρ=0 acc") if metric == "acc" else ("-val loss", "-ρ=0 loss")
    lines = []
    if metric == "loss":
        lines.append(
            "values: minus the best validation loss (nats per token); gain = loss reduction"
        )
    for par, s in summary["parameterizations"].items():
        lines.append(f"{par}")
        lines.append(
            f"  {'width':>8} {'best lr':>9} {'best rho':>9} {name:>16} {'exact 1k':>9}"
            f" {'tied':>5} {base:>9} {'SAM gain (paired)':>18}"
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
            for lr, c in o["by_lr"].items() if by_lr else ():
                rho = "-" if c["rho"] is None else f"{c['rho']:.4g}"
                sgd = "-" if c["sgd_acc"] is None else f"{c['sgd_acc']:.4f}"
                g = c["sam_gain_diff"]
                lines.append(
                    f"  {'lr ' + format(lr, 'g'):>18} {rho:>9} {_pm(c['acc'], c['acc_ci']):>16}"
                    f" {'':>9} {'':>5} {sgd:>9} {_pm(g['mean'], g['ci'], True):>18}"
                )
        if len(s["widths"]) < 2:
            lines.append("  one width: no optimum shift or transfer regret to show")
        else:
            r = s["transfer_regret_diff"]
            moved = {None: "untested (one seed)", True: "yes", False: "no, within the tie"}[
                s["optimum_moved"]
            ]
            lines.append(
                f"  optimum shift {s['widths'][0]:g} -> {s['widths'][-1]:g}: lr "
                f"{s['shift_lr_steps']:+d} steps, rho {s['shift_rho_steps']:+d} steps; moved "
                f"beyond the tie: {moved}; transfer regret {_pm(r['mean'], r['ci'])}"
            )
        lines.append("")
    vs = summary.get("versus")
    if vs and vs["diff"]:
        widths = sorted({w for d in vs["diff"].values() for w in d})
        lines.append(f"best cell minus {vs['reference']}'s best cell, paired by seed")
        lines.append(f"  {'setting':<24}" + "".join(f" {f'width {w:g}':>16}" for w in widths))
        for par, d in vs["diff"].items():
            cells = (_pm(d[w]["mean"], d[w]["ci"], True) if w in d else "-" for w in widths)
            lines.append(f"  {par:<24}" + "".join(f" {c:>16}" for c in cells))
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


def efficiency_summary(
    rows: list[Mapping[str, Any]], reference: str = "mupp", goal: float = 0.75
) -> dict[str, Any]:
    """How much of ``reference``'s gain (two-pass μP² SAM) each setting keeps, per width.

    For every setting and width: its best ``rho > 0`` cell's gain over its own SGD cell
    (``rho = 0``), paired by seed, with its 95% interval; ``kept``, that mean gain over the
    reference's mean gain at the same width; and the goal test, the interval of the per-seed
    ``gain - goal · reference gain``: ``"met"`` when it lies above zero, ``"missed"`` below,
    ``"open"`` when it contains zero or fewer than two seeds are shared.
    Returns ``{"reference", "goal", "rows": [...]}``, one row per (setting, width)."""
    cells = aggregate(rows)
    gains: dict[tuple, tuple] = {}
    for (setting, width), grid in cells.items():
        sam, _, gain = _sam_vs_sgd(grid)
        if sam is not None and gain is not None:
            sgd = optimum(grid, lambda rho: rho == 0)
            per_seed = {
                s: grid[sam[0]]["by_seed"][s] - grid[sgd[0]]["by_seed"][s]
                for s in set(grid[sam[0]]["by_seed"]) & set(grid[sgd[0]]["by_seed"])
            }
            gains[(setting, width)] = (sam[0][1], gain, per_seed)
    out = []
    for (setting, width), (rho, gain, per_seed) in sorted(
        gains.items(), key=lambda kv: (kv[0][1], kv[0][0])
    ):
        ref = gains.get((reference, width))
        row = {"setting": setting, "width": width, "best_rho": rho, "gain": _diff(gain)}
        row.update(kept=None, goal_test=_diff(None), verdict="open")
        if setting == reference:
            row.update(kept=1.0, verdict="reference")
        elif ref is not None and ref[1]["mean"] > 0:
            row["kept"] = gain["mean"] / ref[1]["mean"]
            test = confidence.paired(per_seed, {s: goal * g for s, g in ref[2].items()})
            row["goal_test"] = _diff(test)
            if test is not None and confidence.excludes_zero(test):
                row["verdict"] = "met" if test["mean"] > 0 else "missed"
        out.append(row)
    return {"reference": reference, "goal": goal, "rows": out}


def format_efficiency(summary: Mapping[str, Any]) -> str:
    """The table of :func:`efficiency_summary`, one line per setting and width."""
    goal = summary["goal"]
    lines = [
        f"{'setting':<28}{'width':>7}{'best rho':>10}{'gain over SGD':>22}{'kept':>8}"
        f"{'gain - ' + format(goal, 'g') + ' x ref':>24}  goal"
    ]
    for r in summary["rows"]:
        kept = "" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
        lines.append(
            f"{r['setting']:<28}{r['width']:>7g}{r['best_rho']:>10g}"
            f"{_pm(r['gain']['mean'], r['gain']['ci'], signed=True):>22}{kept:>8}"
            f"{_pm(r['goal_test']['mean'], r['goal_test']['ci'], signed=True):>24}  {r['verdict']}"
        )
    lines.append(
        f"gain: best rho > 0 cell minus the setting's SGD cell, paired by seed, ± 95% t-interval; "
        f"kept: share of {summary['reference']}'s mean gain at the same width; goal {goal:g}: met "
        "when the interval of gain - goal x reference gain lies above zero"
    )
    return "\n".join(lines)
