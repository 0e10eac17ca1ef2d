"""Seed statistics of sweeps (confidence intervals, paired SAM gain, ties, transfer regret),
checked on hand-made records whose answers are known."""

import math

import pytest

from mupp.lab import confidence
from mupp.lab.analysis import aggregate, format_transfer, rows_from_records, transfer_summary

T2 = 4.302652729911275  # t_{0.975, 2}


def test_t_interval_matches_the_textbook_formula():
    r = confidence.interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["n"] == 3
    assert r["half_width"] == pytest.approx(T2 * 1.0 / math.sqrt(3))
    assert confidence.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)
    assert math.isnan(confidence.interval([0.5])["half_width"])
    with pytest.raises(ValueError, match="empty"):
        confidence.interval([])


def test_pairing_removes_the_shared_seed_effect():
    a = {0: 0.50, 1: 0.60, 2: 0.70}
    b = {0: 0.40, 1: 0.50, 2: 0.60}
    d = confidence.paired(a, b)
    assert d["mean"] == pytest.approx(0.1) and d["half_width"] == pytest.approx(0.0, abs=1e-12)
    assert confidence.excludes_zero(d)
    # unpaired, the same numbers overlap completely
    assert confidence.interval(list(a.values()))["half_width"] > 0.1
    assert confidence.paired(a, {5: 0.1}) is None
    assert not confidence.excludes_zero(confidence.paired({0: 0.5}, {0: 0.4}))  # one seed


def rec(setting, width, lr, rho, acc, seed):
    par, _, variant = setting.partition("/")
    cfg = dict(
        parameterization=par, width=width, lr=lr, rho=rho, seed=seed, variant=variant or "sam"
    )
    return {"params": {}, "result": {"config": cfg, "best_test_acc": acc, "diverged": False}}


def study():
    """Two widths, 3 seeds, cells (lr, rho) with known per-seed accuracies."""
    table = {
        64: {
            (0.1, 0.0): (0.40, 0.41, 0.42),
            (0.1, 0.2): (0.50, 0.52, 0.54),  # best
            (0.2, 0.2): (0.49, 0.53, 0.52),  # tied with the best
            (0.2, 0.0): (0.30, 0.31, 0.32),
        },
        1024: {
            (0.1, 0.0): (0.45, 0.46, 0.47),
            (0.1, 0.2): (0.50, 0.51, 0.52),  # the small width's optimum
            (0.2, 0.2): (0.60, 0.62, 0.64),  # best, clearly
            (0.2, 0.0): (0.46, 0.46, 0.46),
        },
    }
    return [
        rec("mupp", w, lr, rho, a, s)
        for w, cells in table.items()
        for (lr, rho), accs in cells.items()
        for s, a in enumerate(accs)
    ]


def test_transfer_statistics_on_known_answers():
    s = transfer_summary(rows_from_records(study()))["parameterizations"]["mupp"]
    small, large = s["optimum"][64], s["optimum"][1024]
    assert (small["lr"], small["rho"], small["seeds"]) == (0.1, 0.2, 3)
    assert small["acc"] == pytest.approx(0.52)
    assert small["acc_ci"] == pytest.approx(T2 * 0.02 / math.sqrt(3))
    # tie: best - (0.2, 0.2) = (0.01, -0.01, 0.02): interval contains 0; SGD cells do not
    assert small["tied"] == [[0.1, 0.2], [0.2, 0.2]]
    assert large["tied"] == [[0.2, 0.2]]
    # SAM gain, paired: best SAM (0.1, 0.2) - best SGD (0.1, 0.0) = 0.10, 0.11, 0.12
    g = small["sam_gain_diff"]
    assert g["mean"] == pytest.approx(0.11) and g["seeds"] == 3
    assert g["ci"] == pytest.approx(T2 * 0.01 / math.sqrt(3))
    # at 1024: (0.60, 0.62, 0.64) - best SGD (0.2, 0.0) = (0.14, 0.16, 0.18)
    assert large["sgd_lr"] == 0.2
    assert large["sam_gain_diff"]["mean"] == pytest.approx(0.16)
    # regret of transferring (0.1, 0.2): (0.60-0.50, 0.62-0.51, 0.64-0.52) = 0.10, 0.11, 0.12
    r = s["transfer_regret_diff"]
    assert r["mean"] == pytest.approx(0.11) and r["ci"] == pytest.approx(T2 * 0.01 / math.sqrt(3))
    assert s["optimum_moved"] is True
    assert s["shift_lr_steps"] == 1 and s["shift_rho_steps"] == 0
    text = format_transfer(transfer_summary(rows_from_records(study())))
    assert "+0.1100±0.0248" in text and "moved beyond the tie: yes" in text


def test_versus_pairs_each_settings_best_cell_against_the_reference():
    rows = study() + [
        rec("mup-global", 64, 0.1, 0.2, a, s) for s, a in enumerate((0.50, 0.52, 0.54))
    ]
    rows += [rec("mup-global", 1024, 0.1, 0.2, a, s) for s, a in enumerate((0.55, 0.58, 0.58))]
    s = transfer_summary(rows_from_records(rows), versus="mupp")
    assert s["versus"]["reference"] == "mupp" and list(s["versus"]["diff"]) == ["mup-global"]
    d = s["versus"]["diff"]["mup-global"]
    # 64: the same accuracies as mupp's best cell; 1024: (0.55, 0.58, 0.58) - (0.60, 0.62, 0.64)
    assert d[64]["mean"] == pytest.approx(0.0) and d[64]["ci"] == pytest.approx(0.0)
    assert d[1024]["mean"] == pytest.approx(-0.05) and d[1024]["seeds"] == 3
    assert d[1024]["ci"] == pytest.approx(T2 * 0.01 / math.sqrt(3))
    assert "best cell minus mupp's best cell" in format_transfer(s)
    assert "versus" not in transfer_summary(rows_from_records(rows))
    with pytest.raises(ValueError, match=r"versus='sam'.*one of \['mup-global', 'mupp'\]"):
        transfer_summary(rows_from_records(rows), versus="sam")


def _outline(ax):
    """The white cell edges a heatmap panel draws, as ((x0, x1), (y0, y1)) pairs."""
    return {
        (tuple(line.get_xdata()), tuple(line.get_ydata()))
        for line in ax.lines
        if line.get_color() == "white"
    }


def test_heatmaps_mark_the_reported_optimum_and_outline_exactly_its_tie():
    from mupp.lab.plots import _heatmaps

    rows = rows_from_records(study())
    fig = _heatmaps(aggregate(rows), [0.1, 0.2], [0.0, 0.2])
    small, large = [ax for ax in fig.axes if ax.get_title()]  # the panels, not the colorbars
    # width 64: optimum (lr 0.1, rho 0.2) = row 0, column 1; tied: both rows of column 1
    marks = [ln for ln in small.lines if ln.get_marker() == "x"]
    assert [(m.get_xdata()[0], m.get_ydata()[0]) for m in marks] == [(1, 0)]
    assert _outline(small) == {
        ((0.5, 1.5), (-0.5, -0.5)),
        ((0.5, 1.5), (1.5, 1.5)),
        ((0.5, 0.5), (-0.5, 0.5)),
        ((0.5, 0.5), (0.5, 1.5)),
        ((1.5, 1.5), (-0.5, 0.5)),
        ((1.5, 1.5), (0.5, 1.5)),
    }
    # width 1024: one tied cell, (lr 0.2, rho 0.2) = row 1, column 1: its four edges
    assert _outline(large) == {
        ((0.5, 1.5), (0.5, 0.5)),
        ((0.5, 1.5), (1.5, 1.5)),
        ((0.5, 0.5), (0.5, 1.5)),
        ((1.5, 1.5), (0.5, 1.5)),
    }
    # one seed: no test is possible, the outline is the cells within 1 point of the best
    one = [r for r in rows if r["seed"] == 0]
    fig = _heatmaps(aggregate(one), [0.1, 0.2], [0.0, 0.2])
    # seed 0 at 64: best SAM (0.1, 0.2) = 0.50; (0.2, 0.2) = 0.49 is within a point
    assert len(_outline(fig.axes[0])) == 6


def test_each_learning_rate_row_has_its_own_best_rho_and_paired_gain():
    s = transfer_summary(rows_from_records(study()))["parameterizations"]["mupp"]
    rows = s["optimum"][1024]["by_lr"]
    assert list(rows) == [0.1, 0.2]
    # lr 0.1 at 1024: (0.50, 0.51, 0.52) - SGD (0.45, 0.46, 0.47) = 0.05 in every seed
    assert rows[0.1]["rho"] == 0.2 and rows[0.1]["acc"] == pytest.approx(0.51)
    assert rows[0.1]["sgd_acc"] == pytest.approx(0.46)
    g = rows[0.1]["sam_gain_diff"]
    assert g["mean"] == pytest.approx(0.05) and g["ci"] == pytest.approx(0.0, abs=1e-12)
    # lr 0.2: (0.60, 0.62, 0.64) - (0.46, 0.46, 0.46) = (0.14, 0.16, 0.18)
    g = rows[0.2]["sam_gain_diff"]
    assert g["mean"] == pytest.approx(0.16) and g["ci"] == pytest.approx(T2 * 0.02 / math.sqrt(3))
    assert rows[0.2]["acc_ci"] == pytest.approx(T2 * 0.02 / math.sqrt(3))
    # a learning rate with SAM cells only: no SGD cell, no gain
    recs = [
        r
        for r in study()
        if (r["result"]["config"]["lr"], r["result"]["config"]["rho"]) != (0.2, 0.0)
    ]
    rows = transfer_summary(rows_from_records(recs))["parameterizations"]["mupp"]["optimum"][64]
    assert rows["by_lr"][0.2]["sgd_acc"] is None
    assert rows["by_lr"][0.2]["sam_gain_diff"] == {"mean": None, "ci": None, "seeds": 0}
    text = format_transfer(transfer_summary(rows_from_records(study())), by_lr=True)
    assert "lr 0.2" in text and "+0.1600±0.0497" in text
    assert "lr 0.2" not in format_transfer(transfer_summary(rows_from_records(study())))


def test_one_width_has_no_shift_and_no_regret():
    recs = [r for r in study() if r["result"]["config"]["width"] == 64]
    summary = transfer_summary(rows_from_records(recs))
    s = summary["parameterizations"]["mupp"]
    assert s["shift_lr_steps"] is None and s["shift_rho_steps"] is None
    assert s["transfer_regret"] is None and s["transfer_regret_diff"]["mean"] is None
    assert s["optimum_moved"] is None
    text = format_transfer(summary)
    assert "one width: no optimum shift or transfer regret" in text and "regret 0" not in text


def test_an_optimum_inside_the_tie_has_not_moved():
    recs = study()
    # make the transferred cell at 1024 tied with the best there
    for r in recs:
        c = r["result"]["config"]
        if c["width"] == 1024 and (c["lr"], c["rho"]) == (0.1, 0.2):
            r["result"]["best_test_acc"] = (0.61, 0.60, 0.65)[c["seed"]]
    s = transfer_summary(rows_from_records(recs))["parameterizations"]["mupp"]
    assert s["optimum_moved"] is False
    assert s["optimum"][1024]["tied"] == [[0.1, 0.2], [0.2, 0.2]]


def test_rows_name_the_rule_when_it_is_not_lp():
    recs = [rec("mupp", 16, 0.1, 0.1, 0.5, 0), rec("mupp/last-layer", 16, 0.1, 0.1, 0.5, 0)]
    recs.append({**rec("mupp", 16, 0.1, 0.1, 0.5, 0), "params": {"setting": "mupp/sam/DP"}})
    dp_by_config = rec("mupp", 16, 0.1, 0.1, 0.5, 0)
    dp_by_config["result"]["config"]["rule"] = "DP"  # `--set rule=DP`
    recs.append(dp_by_config)
    rows = rows_from_records(recs)
    assert [r["setting"] for r in rows] == ["mupp", "mupp/last-layer", "mupp/sam/DP", "mupp/sam/DP"]
    assert [r["rule"] for r in rows] == ["LP", "LP", "DP", "DP"]


def test_metric_loss_maximizes_minus_the_validation_loss():
    recs = [rec("mupp", 64, 0.003, rho, 0.3, seed) for rho in (0.0, 0.2) for seed in (0, 1)]
    for r, loss in zip(recs, (2.60, 2.62, 2.50, 2.53)):
        r["result"]["best_test_loss"] = loss
    rows = rows_from_records(recs, metric="loss")
    assert sorted({r["acc"] for r in rows}) == [-2.62, -2.60, -2.53, -2.50]
    o = transfer_summary(rows)["parameterizations"]["mupp"]["optimum"][64]
    assert o["rho"] == 0.2 and o["sam_gain_diff"]["mean"] == pytest.approx(0.095)  # a reduction
    text = format_transfer(transfer_summary(rows), metric="loss")
    assert text.startswith("values: minus the best validation loss") and "-val loss" in text
    with pytest.raises(ValueError, match="a run has no best_test_loss"):
        rows_from_records(study(), metric="loss")
    with pytest.raises(ValueError, match="metric must be one of"):
        rows_from_records(recs, metric="bpc")
