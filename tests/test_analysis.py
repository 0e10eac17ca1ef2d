"""Analysis of finished sweeps on hand-made records whose answers are known: the transfer
statistics (optimum, tie, shift, regret, SAM's paired gain), the rows' settings and metric,
and the share of two-pass μP² SAM's gain that a cheaper setting keeps."""

import math

import pytest

from mupp.lab.analysis import (
    efficiency_summary,
    format_efficiency,
    format_transfer,
    rows_from_records,
    transfer_summary,
)
from mupp.lab.cli import main

T2 = 4.302652729911275  # t_{0.975, 2}
SGD = {0: 0.50, 1: 0.52, 2: 0.51}


def test_transfer_summary_on_a_hand_made_table(sweep_record):
    recs = []
    accs_small = {(0.1, 0.0): 0.50, (0.1, 0.1): 0.55, (0.2, 0.0): 0.52, (0.2, 0.1): 0.53}
    accs_large = {(0.1, 0.0): 0.60, (0.1, 0.1): 0.62, (0.2, 0.0): 0.61, (0.2, 0.1): 0.66}
    for (lr, rho), a in accs_small.items():
        recs.append(sweep_record("mupp", 64, lr, rho, a, exact=a + 0.1))
    for (lr, rho), a in accs_large.items():
        recs.append(sweep_record("mupp", 1024, lr, rho, a))
    recs.append(sweep_record("mupp", 1024, 0.2, 0.1, 0.64, seed=1))  # averaged with 0.66 -> 0.65
    # another variant is another setting, never averaged into plain SAM's cells
    recs.append(sweep_record("mupp/sam-on", 64, 0.1, 0.1, 0.99))
    summary = transfer_summary(rows_from_records(recs))["parameterizations"]
    assert set(summary) == {"mupp", "mupp/sam-on"}
    s = summary["mupp"]
    by_lr = s["optimum"][64].pop("by_lr")
    assert by_lr[0.1]["rho"] == 0.1 and by_lr[0.1]["sgd_acc"] == 0.50
    assert by_lr[0.1]["sam_gain_diff"]["mean"] == pytest.approx(0.05)
    assert by_lr[0.2]["acc"] == 0.53 and by_lr[0.2]["sam_gain_diff"]["mean"] == pytest.approx(0.01)
    assert s["optimum"][64] == {
        "lr": 0.1,
        "rho": 0.1,
        "acc": 0.55,
        "acc_std": 0.0,
        "acc_ci": None,  # one seed: no interval
        "acc_exact": pytest.approx(0.65),
        "seeds": 1,
        "tied": None,
        "sgd_lr": 0.2,
        "sgd_acc": 0.52,
        "sam_gain": pytest.approx(0.03),
        "sam_gain_diff": {"mean": pytest.approx(0.03), "ci": None, "seeds": 1},
    }
    big = s["optimum"][1024]
    assert big["lr"] == 0.2 and big["acc"] == pytest.approx(0.65)
    assert big["acc_std"] == pytest.approx(0.01) and big["seeds"] == 2 and big["acc_exact"] is None
    assert s["shift_lr_steps"] == 1 and s["shift_rho_steps"] == 0
    assert s["transfer_acc"] == 0.62 and s["transfer_regret"] == pytest.approx(0.03)
    assert s["optimum"][1024]["sam_gain"] == pytest.approx(0.65 - 0.61)


def test_transfer_statistics_on_known_answers(known_study):
    s = transfer_summary(rows_from_records(known_study))["parameterizations"]["mupp"]
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
    text = format_transfer(transfer_summary(rows_from_records(known_study)))
    assert "+0.1100±0.0248" in text and "moved beyond the tie: yes" in text


def test_versus_pairs_each_settings_best_cell_against_the_reference(known_study, sweep_record):
    rows = known_study + [
        sweep_record("mup-global", 64, 0.1, 0.2, a, s) for s, a in enumerate((0.50, 0.52, 0.54))
    ]
    rows += [
        sweep_record("mup-global", 1024, 0.1, 0.2, a, s) for s, a in enumerate((0.55, 0.58, 0.58))
    ]
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


def test_each_learning_rate_row_has_its_own_best_rho_and_paired_gain(known_study):
    s = transfer_summary(rows_from_records(known_study))["parameterizations"]["mupp"]
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
        for r in known_study
        if (r["result"]["config"]["lr"], r["result"]["config"]["rho"]) != (0.2, 0.0)
    ]
    rows = transfer_summary(rows_from_records(recs))["parameterizations"]["mupp"]["optimum"][64]
    assert rows["by_lr"][0.2]["sgd_acc"] is None
    assert rows["by_lr"][0.2]["sam_gain_diff"] == {"mean": None, "ci": None, "seeds": 0}
    text = format_transfer(transfer_summary(rows_from_records(known_study)), by_lr=True)
    assert "lr 0.2" in text and "+0.1600±0.0497" in text
    assert "lr 0.2" not in format_transfer(transfer_summary(rows_from_records(known_study)))


def test_one_width_has_no_shift_and_no_regret(known_study):
    recs = [r for r in known_study if r["result"]["config"]["width"] == 64]
    summary = transfer_summary(rows_from_records(recs))
    s = summary["parameterizations"]["mupp"]
    assert s["shift_lr_steps"] is None and s["shift_rho_steps"] is None
    assert s["transfer_regret"] is None and s["transfer_regret_diff"]["mean"] is None
    assert s["optimum_moved"] is None
    text = format_transfer(summary)
    assert "one width: no optimum shift or transfer regret" in text and "regret 0" not in text


def test_an_optimum_inside_the_tie_has_not_moved(known_study):
    recs = known_study
    # make the transferred cell at 1024 tied with the best there
    for r in recs:
        c = r["result"]["config"]
        if c["width"] == 1024 and (c["lr"], c["rho"]) == (0.1, 0.2):
            r["result"]["best_test_acc"] = (0.61, 0.60, 0.65)[c["seed"]]
    s = transfer_summary(rows_from_records(recs))["parameterizations"]["mupp"]
    assert s["optimum_moved"] is False
    assert s["optimum"][1024]["tied"] == [[0.1, 0.2], [0.2, 0.2]]


def test_rows_name_the_rule_when_it_is_not_lp(sweep_record):
    recs = [
        sweep_record("mupp", 16, 0.1, 0.1, 0.5, 0),
        sweep_record("mupp/last-layer", 16, 0.1, 0.1, 0.5, 0),
    ]
    recs.append(
        {**sweep_record("mupp", 16, 0.1, 0.1, 0.5, 0), "params": {"setting": "mupp/sam/DP"}}
    )
    dp_by_config = sweep_record("mupp", 16, 0.1, 0.1, 0.5, 0)
    dp_by_config["result"]["config"]["rule"] = "DP"  # `--set rule=DP`
    recs.append(dp_by_config)
    rows = rows_from_records(recs)
    assert [r["setting"] for r in rows] == ["mupp", "mupp/last-layer", "mupp/sam/DP", "mupp/sam/DP"]
    assert [r["rule"] for r in rows] == ["LP", "LP", "DP", "DP"]


def test_rows_name_the_standard_network_apart_from_the_mup_model_with_sp_rates(sweep_record):
    hybrid = sweep_record("sp/sam/DP", 256, 0.003, 0.1, 0.5)
    hybrid["result"]["config"].update(base_width=64, model_kwargs={"n_layer": 2})
    standard = sweep_record("sp", 256, 0.003, 0.1, 0.5)  # the GPT built with mup=False
    standard["result"]["config"].update(base_width=64, model_kwargs={"mup": False})
    no_shapes = sweep_record("sp", 256, 0.003, 0.1, 0.5)
    no_shapes["result"]["config"]["base_width"] = None  # `--set base_width=null`
    rows = rows_from_records([hybrid, standard, no_shapes])
    assert [r["setting"] for r in rows] == ["sp/sam/DP", "standard-sp", "standard-sp"]


def test_metric_loss_maximizes_minus_the_validation_loss(known_study, sweep_record):
    losses = {(0.0, 0): 2.60, (0.0, 1): 2.62, (0.2, 0): 2.50, (0.2, 1): 2.53}
    recs = [
        sweep_record("mupp", 64, 0.003, rho, 0.3, seed, loss=loss)
        for (rho, seed), loss in losses.items()
    ]
    rows = rows_from_records(recs, metric="loss")
    assert sorted({r["acc"] for r in rows}) == [-2.62, -2.60, -2.53, -2.50]
    o = transfer_summary(rows)["parameterizations"]["mupp"]["optimum"][64]
    assert o["rho"] == 0.2 and o["sam_gain_diff"]["mean"] == pytest.approx(0.095)  # a reduction
    text = format_transfer(transfer_summary(rows), metric="loss")
    assert text.startswith("values: minus the best validation loss") and "-val loss" in text
    with pytest.raises(ValueError, match="a run has no best_test_loss"):
        rows_from_records(known_study, metric="loss")
    with pytest.raises(ValueError, match="metric must be one of"):
        rows_from_records(recs, metric="bpc")


@pytest.fixture
def efficiency_records(sweep_record):
    """Two-pass μP², Momentum-SAM and every-5 at width 1024, 3 seeds, known gains."""
    out = []
    for seed, sgd in SGD.items():
        for setting in ("mupp", "mupp/sam/LP/momentum", "mupp/sam/LP/every5"):
            out.append(sweep_record(setting, 1024, 0.1, 0.0, sgd, seed))
        out.append(sweep_record("mupp", 1024, 0.1, 0.2, sgd + [0.020, 0.022, 0.018][seed], seed))
        out.append(sweep_record("mupp", 1024, 0.1, 0.4, sgd + 0.001, seed))
        gain = [0.019, 0.021, 0.020][seed]
        out.append(sweep_record("mupp/sam/LP/momentum", 1024, 0.1, 0.2, sgd + gain, seed))
        gain = [0.004, 0.006, 0.005][seed]
        out.append(sweep_record("mupp/sam/LP/every5", 1024, 0.1, 0.2, sgd + gain, seed))
    return out


def test_kept_share_and_the_goal_test_on_a_hand_made_table(efficiency_records):
    summary = efficiency_summary(rows_from_records(efficiency_records), reference="mupp", goal=0.75)
    rows = {r["setting"]: r for r in summary["rows"]}
    assert set(rows) == {"mupp", "mupp/sam/LP/momentum", "mupp/sam/LP/every5"}
    assert rows["mupp"]["best_rho"] == 0.2
    assert rows["mupp"]["gain"]["mean"] == pytest.approx(0.020)
    # momentum keeps 0.020 / 0.020 = 100%; per seed 0.019-0.015, 0.021-0.0165, 0.020-0.0135 > 0
    assert rows["mupp/sam/LP/momentum"]["kept"] == pytest.approx(1.0)
    assert rows["mupp/sam/LP/momentum"]["verdict"] == "met"
    # every-5 keeps 25%: gain - 0.75 ref = 0.005 - 0.015 < 0 on every seed
    assert rows["mupp/sam/LP/every5"]["kept"] == pytest.approx(0.25)
    assert rows["mupp/sam/LP/every5"]["verdict"] == "missed"
    assert rows["mupp/sam/LP/every5"]["goal_test"]["mean"] == pytest.approx(-0.010)
    text = format_efficiency(summary)
    assert "25%" in text and "missed" in text and "met" in text


def test_efficiency_command_refuses_a_reference_without_cells(tmp_path, capsys):
    assert main(["efficiency", "--out", str(tmp_path), "--goal", "1.5"]) == 2
    assert "--goal must be a share in (0, 1]" in capsys.readouterr().err
