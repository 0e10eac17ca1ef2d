"""The sweep grammar (mupp.lab.grid): settings, pass plans, queue order, canonical runs."""

import pytest

from mupp.lab.grid import canonical_config, expand_point, format_pass_plan, grid_points, run_key


def test_settings_axis_expands_and_equivalent_points_share_a_run():
    assert expand_point({"setting": "mup-global/last-layer", "lr": 0.1}) == {
        "lr": 0.1,
        "parameterization": "mup-global",
        "variant": "last-layer",
    }
    assert expand_point({"setting": "sp"})["variant"] == "sam"
    assert expand_point({"setting": "mupp/sam/DP"}) == {
        "parameterization": "mupp",
        "variant": "sam",
        "rule": "DP",
    }
    for bad in ("", "mupp//DP", "a/b/c/d/e", 3):
        with pytest.raises(ValueError, match="PARAMETERIZATION/VARIANT/RULE"):
            expand_point({"setting": bad})
    # the 4th part, a pass plan, round-trips through the names the analysis prints
    plans = {
        "two-pass": {},
        "momentum": {"ascent": "momentum"},
        "looksam5": {"every": 5, "reuse": "looksam"},
        "every3": {"every": 3},
    }
    for name, options in plans.items():
        point = expand_point({"setting": f"mupp/sam/LP/{name}"})
        assert point == {"parameterization": "mupp", "variant": "sam", "rule": "LP", **options}
        assert format_pass_plan(point) == name
    for bad in ("looksam0", "every", "lookahead5", "momentum2"):
        with pytest.raises(ValueError, match="pass plan must be 'two-pass', 'momentum'"):
            expand_point({"setting": f"mupp/sam/LP/{bad}"})
    # without perturbation there is no pass plan: every SGD point is the same run
    cheap = canonical_config(
        {"base_width": 64, "width": 256, "rule": "LP", "rho": 0.0, **plans["looksam5"]}
    )
    assert "every" not in cheap and "reuse" not in cheap
    base = {"base_width": 64, "width": 256, "rule": "LP"}
    sgd = [
        canonical_config({**base, **expand_point({"setting": s, "rho": 0.0})})
        for s in ("mup-global", "mupp", "mup-global/last-layer")
    ]
    assert sgd[0] == sgd[1] == sgd[2]  # every μP SGD run is the same run
    sp = canonical_config({**base, **expand_point({"setting": "sp", "rho": 0.0})})
    assert sp != sgd[0]
    at_base = [
        canonical_config({**base, "width": 64, **expand_point({"setting": s, "rho": 0.1})})
        for s in ("sp", "mup-global", "mupp")
    ]
    assert at_base[0] == at_base[1] == at_base[2]
    dp = {**base, "width": 64, "rule": "DP", **expand_point({"setting": "mupp", "rho": 0.1})}
    assert canonical_config(dp) == at_base[2]  # Remark F.4's factors are all 1 at base width
    assert canonical_config({**dp, "width": 256})["rule"] == "DP"
    ll = canonical_config({**base, "width": 64, **expand_point({"setting": "mupp/last-layer"})})
    assert ll["variant"] == "last-layer"


def test_queue_order_puts_the_named_axes_first():
    grid = {"lr": [0.05, 0.1], "seed": [0, 1], "rho": [0.0, 0.1]}
    pts = grid_points(grid, order=["lr", "seed", "rho"])
    assert pts[:2] == [{"lr": 0.05, "seed": 0, "rho": 0.0}, {"lr": 0.05, "seed": 0, "rho": 0.1}]
    assert pts[4]["lr"] == 0.1
    with pytest.raises(ValueError, match="every grid axis"):
        grid_points(grid, order=["lr", "rho"])


def test_run_directories_identify_configurations_by_value():
    base = {"model": "mlp", "base_width": 64, "width": 64, "rho": 0.1, "seed": 0}
    lp_implicit = canonical_config({**base, **expand_point({"setting": "mupp"})})
    dp = canonical_config({**base, **expand_point({"setting": "mupp/sam/DP"})})
    assert "rule" not in lp_implicit and dp["rule"] == "LP"  # spelled differently ...
    assert run_key(lp_implicit) == run_key(dp)  # ... one run directory
    assert run_key({**lp_implicit, "rho": 0.1, "width": 64.0}) == run_key(lp_implicit)
    assert run_key({**lp_implicit, "rho": 0}) == run_key({**lp_implicit, "rho": 0.0})
    assert run_key({**lp_implicit, "rule": "DP"}) != run_key(lp_implicit)
    assert run_key({**lp_implicit, "width": 256}) != run_key(lp_implicit)
