"""Figures of a sweep: the files written, and heatmaps that mark the optimum and outline its tie."""

import os

import pytest

from mupp.lab.analysis import aggregate, rows_from_records
from mupp.lab.plots import _heatmaps, _slices, plot_gain, plot_sweep


def test_plots_are_written(tmp_path, sweep_record):
    recs = [
        sweep_record(p, w, lr, rho, 0.3 + 0.1 * lr + rho, diverged=(lr == 0.4))
        for p in ("mupp", "mup-global")
        for w in (64, 256)
        for lr in (0.1, 0.2, 0.4)
        for rho in (0.0, 0.05, 0.1)
    ]
    recs += [
        sweep_record(p, w, lr, rho, 0.31 + 0.1 * lr + rho, seed=1)
        for p in ("mupp", "mup-global")
        for w in (64, 256)
        for lr in (0.1, 0.2)
        for rho in (0.0, 0.05, 0.1)
    ]
    paths = plot_sweep(rows_from_records(recs), str(tmp_path / "s"))
    assert [os.path.basename(p) for p in paths] == [
        f"s_{kind}.{ext}" for kind in ("heatmaps", "slices", "gain") for ext in ("png", "pdf")
    ]
    for p in paths:
        assert os.path.getsize(p) > 5_000


def _outline(ax):
    """The white cell edges a heatmap panel draws, as ((x0, x1), (y0, y1)) pairs."""
    return {
        (tuple(line.get_xdata()), tuple(line.get_ydata()))
        for line in ax.lines
        if line.get_color() == "white"
    }


def test_heatmaps_mark_the_reported_optimum_and_outline_exactly_its_tie(known_study):
    rows = rows_from_records(known_study)
    fig = _heatmaps(aggregate(rows), [0.1, 0.2], [0.0, 0.2], "acc")
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
    fig = _heatmaps(aggregate(one), [0.1, 0.2], [0.0, 0.2], "acc")
    # seed 0 at 64: best SAM (0.1, 0.2) = 0.50; (0.2, 0.2) = 0.49 is within a point
    assert len(_outline(fig.axes[0])) == 6


def test_loss_figures_draw_the_validation_loss_and_its_reduction(tmp_path, sweep_record):
    # a language model's sweep: lower loss is better; SAM (rho 0.2) lowers it by 0.10 / 0.08
    losses = {(0.0, 0): 2.60, (0.0, 1): 2.62, (0.2, 0): 2.50, (0.2, 1): 2.54, (0.4, 0): 2.7}
    recs = [
        sweep_record("mupp", 64, 0.003, rho, 0.3, seed, loss=loss)
        for (rho, seed), loss in losses.items()
    ]
    rows = rows_from_records(recs, metric="loss")
    fig = _slices(aggregate(rows), [0.0, 0.2, 0.4], "loss")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "best validation loss (nats/token)"
    curve = next(ln for ln in ax.lines if ln.get_marker() == "o")
    assert list(curve.get_xdata()) == [0.2, 0.4]
    assert list(curve.get_ydata()) == pytest.approx([2.52, 2.7])  # the losses, not minus them
    dashed = next(ln for ln in ax.lines if ln.get_linestyle() == "--")
    assert dashed.get_ydata()[0] == pytest.approx(2.61)  # rho = 0 at that lr
    heat = _heatmaps(aggregate(rows), [0.003], [0.0, 0.2, 0.4], "loss")
    assert heat.axes[0].images[0].get_array()[0, 1] == pytest.approx(2.52)
    assert "within 0.01 nats" in heat.get_suptitle()
    paths = plot_gain(rows, str(tmp_path / "g"), metric="loss")
    assert [os.path.basename(p) for p in paths] == ["g_gain.png", "g_gain.pdf"]
    with pytest.raises(ValueError, match="metric must be one of"):
        plot_sweep(rows, str(tmp_path / "s"), metric="bpc")


def test_plot_gain_draws_the_paired_loss_reduction(tmp_path, sweep_record, monkeypatch):
    recs = [
        sweep_record("mupp", w, 0.003, rho, 0.3, seed, loss=2.6 - (rho > 0) * (0.1 + seed / 50))
        for w in (64, 256)
        for rho in (0.0, 0.2)
        for seed in (0, 1)
    ]
    drawn = {}
    monkeypatch.setattr(
        "mupp.lab.plots._save", lambda fig, prefix, kind: drawn.setdefault(kind, fig)
    )
    plot_gain(rows_from_records(recs, metric="loss"), str(tmp_path / "g"), metric="loss")
    (ax,) = drawn["gain"].axes
    assert ax.get_ylabel() == "SAM's validation-loss reduction (nats)"
    curve = next(ln for ln in ax.lines if ln.get_marker() == "o")
    assert list(curve.get_xdata()) == [64, 256]
    assert list(curve.get_ydata()) == pytest.approx([0.11, 0.11])  # reductions, positive
