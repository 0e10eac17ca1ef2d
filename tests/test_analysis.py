"""Analysis: the share of two-pass μP² SAM's gain that a cheaper setting keeps."""

import pytest

from mupp.lab.analysis import efficiency_summary, format_efficiency
from mupp.lab.cli import main


def rec(setting, rho, acc, seed, width=1024):
    par, *rest = setting.split("/")
    cfg = dict(parameterization=par, width=width, lr=0.1, rho=rho, seed=seed)
    if rest:
        cfg.update(variant=rest[0], rule=rest[1])
        plan = rest[2]
        cfg.update({"momentum": {"ascent": "momentum"}, "every5": {"every": 5}}[plan])
    return {"params": {}, "result": {"config": cfg, "best_test_acc": acc, "diverged": False}}


SGD = {0: 0.50, 1: 0.52, 2: 0.51}


def records():
    out = []
    for seed, sgd in SGD.items():
        for setting in ("mupp", "mupp/sam/LP/momentum", "mupp/sam/LP/every5"):
            out.append(rec(setting, 0.0, sgd, seed))
        out.append(rec("mupp", 0.2, sgd + [0.020, 0.022, 0.018][seed], seed))  # gain 2.0
        out.append(rec("mupp", 0.4, sgd + 0.001, seed))
        out.append(rec("mupp/sam/LP/momentum", 0.2, sgd + [0.019, 0.021, 0.020][seed], seed))
        out.append(rec("mupp/sam/LP/every5", 0.2, sgd + [0.004, 0.006, 0.005][seed], seed))
    return out


def test_kept_share_and_the_goal_test_on_a_hand_made_table():
    from mupp.lab.analysis import rows_from_records

    summary = efficiency_summary(rows_from_records(records()), reference="mupp", goal=0.75)
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
