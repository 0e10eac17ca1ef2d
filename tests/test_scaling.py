"""mupp.scaling, the one place that turns a parameter's width record into its factors: the
width exponents of μP learning rates (Table 1, App. F.5), weight decay, initialization
(App. F.7) and the perturbation numerators/denominators of every rule (Def. 4, Remark F.2,
Remark F.4, App. F.3), measured as log-ratios between two widths."""

import math

import pytest

from mupp import scaling
from mupp.shapes import WidthInfo

BASE, D_IN, D_OUT = 64, 3072, 10


def info(role: str, m: float) -> WidthInfo:
    """The width record of an MLP layer of ``role`` at ``m`` times the base width 64."""
    n, b = int(BASE * m), BASE
    fans = {
        "input": ((D_IN, n), (D_IN, b), (False, True)),
        "hidden": ((n, n), (b, b), (True, True)),
        "output": ((n, D_OUT), (b, D_OUT), (True, False)),
        "fixed": ((D_IN, D_OUT), (D_IN, D_OUT), (False, False)),
    }
    (fan_in, fan_out), (bfan_in, bfan_out), dims = fans[role]
    return WidthInfo(
        name=role,
        shape=(fan_out, fan_in),
        base_shape=(bfan_out, bfan_in),
        width_dims=dims[::-1],
        fan_in=fan_in,
        fan_out=fan_out,
        base_fan_in=bfan_in,
        base_fan_out=bfan_out,
        role=role,
    )


def exponent(f, role: str, m: float = 16.0) -> float:
    """The width exponent of ``f(info)``: ``log(f at m) / log m`` (``f = 1`` at base)."""
    assert f(info(role, 1.0)) == pytest.approx(1.0)
    return math.log(f(info(role, m))) / math.log(m)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("sgd", {"input": 1.0, "hidden": 0.0, "output": -1.0}),  # η n^{-c}: c = -1, 0, 1
        ("adam", {"input": 0.0, "hidden": -1.0, "output": -1.0}),  # 1/fan_in
    ],
)
def test_mup_learning_rate_exponents(kind, expected):
    got = {r: exponent(lambda i: scaling.lr_factor(i, kind), r) for r in expected}
    assert got == pytest.approx(expected)
    assert scaling.lr_factor(info("fixed", 16), kind) == 1.0


@pytest.mark.parametrize("kind,shift", [("sgd", 2.0), ("adam", 1.0)])
def test_a_weight_multiplier_shifts_the_learning_rate_exponent(kind, shift):
    # a readout multiplier m^-1 (microsoft/mup's MuReadout): SGD m^{2a}, Adam m^a (App. F.6.1)
    plain = exponent(lambda i: scaling.lr_factor(i, kind), "output")
    with_mult = exponent(lambda i: scaling.lr_factor(i, kind, {"output": 1.0}), "output")
    assert with_mult - plain == pytest.approx(shift)


@pytest.mark.parametrize("role", ["input", "hidden", "output"])
def test_weight_decay_keeps_lr_times_wd_width_independent(role):
    for m in (1.0, 4.0, 16.0):
        for kind in ("sgd", "adam"):
            i = info(role, m)
            assert scaling.lr_factor(i, kind) * scaling.weight_decay_factor(i, kind) == (
                pytest.approx(1.0)
            )


def test_init_std_exponents():
    # b_1 = 0 (input fixed), hidden fan_in^{-1/2}, output variance ∝ 1/n² (App. F.7)
    got = {r: exponent(scaling.init_std_factor, r) for r in ("input", "hidden", "output")}
    assert got == pytest.approx({"input": 0.0, "hidden": -0.5, "output": -1.0})


def factors(role, m, rule, parameterization, variant="sam"):
    exps = scaling.perturbation_exponents(variant, parameterization)
    return scaling.perturbation_factors(
        info(role, m),
        rule=rule,
        parameterization=parameterization,
        exponents=exps,
        global_mult=m,
    )


def test_table1_mupp_sam_layerwise_exponents():
    # μP² SAM: global n^{1/2}, layerwise input n^{1/2}, hidden n^{-1/2}, output n^{-3/2}
    d, by_role = scaling.perturbation_exponents("sam", "mupp")
    assert (d, by_role) == (-0.5, {"input": -0.5, "hidden": 0.5, "output": 1.5})


@pytest.mark.parametrize("role", ["input", "hidden", "output"])
def test_lp_factors_are_global_times_layerwise(role):
    m = 16.0
    d, by_role = scaling.perturbation_exponents("sam", "mupp")
    num, den = factors(role, m, "LP", "mupp")
    assert num == pytest.approx(m ** (-d) * m ** (-by_role[role]))
    assert den == pytest.approx(m ** (-by_role[role]))


@pytest.mark.parametrize(
    "rule,expected",
    [
        # DP: numerator like the SGD lr, denominator its square root (Remark F.4)
        ("DP", {"input": (1.0, 0.5), "hidden": (0.0, 0.0), "output": (-1.0, -0.5)}),
        # LN: sqrt(fan_out/fan_in), no shared denominator (Remark F.2)
        ("LN", {"input": (0.5, 0.0), "hidden": (0.0, 0.0), "output": (-0.5, 0.0)}),
        # unnormalized: the SGD lr factor (App. F.3)
        ("unnormalized", {"input": (1.0, 0.0), "hidden": (0.0, 0.0), "output": (-1.0, 0.0)}),
    ],
)
def test_mupp_numerator_and_denominator_exponents(rule, expected):
    for role, (num_exp, den_exp) in expected.items():
        num = exponent(lambda i, r=role: factors(r, i.width_mult, rule, "mupp")[0], role)
        den = exponent(lambda i, r=role: factors(r, i.width_mult, rule, "mupp")[1], role)
        assert (num, den) == pytest.approx((num_exp, den_exp)), (rule, role)


@pytest.mark.parametrize("rule", ["LP", "DP", "LN", "unnormalized"])
def test_sp_and_mup_naive_do_not_scale_the_perturbation(rule):
    for role in ("input", "hidden", "output"):
        assert factors(role, 16.0, rule, "sp") == (1.0, 1.0)
        if rule != "LP":  # LP under μP-naive: all exponents 0, hence also (1, 1)
            assert factors(role, 16.0, rule, "mup-naive") == (1.0, 1.0)
    assert factors("hidden", 16.0, "LP", "mup-naive") == (1.0, 1.0)


def test_mup_global_scales_every_layer_by_the_same_global_factor():
    # ρ M^{-1/2} for LP, DP and LN (Prop. 2); M^{-1} for the unnormalized rule (App. F.3)
    m = 16.0
    for role in ("input", "hidden", "output"):
        num, den = factors(role, m, "LP", "mup-global")
        assert num / den == pytest.approx(m**-0.5)
        assert factors(role, m, "DP", "mup-global") == pytest.approx((m**-0.5, 1.0))
        assert factors(role, m, "LN", "mup-global") == pytest.approx((m**-0.5, 1.0))
        assert factors(role, m, "unnormalized", "mup-global") == pytest.approx((1 / m, 1.0))


def test_fixed_tensors_get_only_the_global_factor():
    num, den = scaling.perturbation_factors(
        info("fixed", 1.0),
        rule="LP",
        parameterization="mupp",
        exponents=scaling.perturbation_exponents("sam", "mupp"),
        global_mult=16.0,
    )
    assert (num, den) == pytest.approx((16.0**0.5, 1.0))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="rule must be one of"):
        factors("hidden", 4.0, "lp", "mupp")
    with pytest.raises(ValueError, match="kind must be one of"):
        scaling.lr_factor(info("hidden", 4.0), "lion")


def test_a_recorded_multiplier_drives_lr_init_and_model_exponents():

    info = WidthInfo("w", (5, 64), (5, 16), (False, True), 64, 5, 16, 5, "output", multiplier=1.0)
    m = 4.0
    assert scaling.lr_factor(info, "adam") == pytest.approx(1.0)  # (1/m) m^a
    assert scaling.lr_factor(info, "sgd") == pytest.approx(m)  # (1/m) m^{2a}
    assert scaling.init_std_factor(info) == pytest.approx(m**-0.5 * m**-0.5 * m)  # base init
    assert scaling.model_multipliers([info, None], None) == {"output": 1.0}
    assert scaling.model_multipliers([info], {"output": 0.5}) == {"output": 0.5}  # given wins
    other = WidthInfo("v", (5, 64), (5, 16), (False, True), 64, 5, 16, 5, "output", multiplier=0.5)
    with pytest.raises(ValueError, match="record different weight multipliers"):
        scaling.model_multipliers([info, other], None)
