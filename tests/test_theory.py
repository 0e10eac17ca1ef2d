"""The bcd calculus against the paper's theorems, tables and lemmas."""

import pytest

from mupp import theory as T


@pytest.mark.parametrize("L", [1, 2, 4])
def test_mpp_equals_theorem_11_equation_1(L):
    b, c = T.mup_bc(L)
    d, dl = T.mpp(b, c)
    assert d == -0.5
    # Eq. (1) with min(b_{L+1}, c_{L+1}) = 1
    assert dl == [-0.5] + [0.5] * (L - 1) + [1.5]
    r = T.classify(b, c, dl, d)
    assert r["stable"] and r["feature_learning"] and r["perturbation_nontrivial"]
    assert r["effective"] == [True] * (L + 1)
    assert r["r_tilde"] == 0.0


@pytest.mark.parametrize("bc", [T.sp_bc(2), T.sp_bc(2, stable=True), T.ntp_bc(2)])
def test_no_effective_choice_when_readout_init_is_large(bc):
    with pytest.raises(ValueError, match="b_\\(L\\+1\\) < 1"):
        T.mpp(*bc)


def test_bc_stability_of_table_d1():
    assert not T.classify(*T.sp_bc(2), [0.5] * 3, 0.5)["bc_stable"]  # SP with c=0: r = -1
    assert T.classify(*T.sp_bc(2), [0.5] * 3, 0.5)["r"] == -1
    for bc, r in [(T.sp_bc(2, stable=True), 0.5), (T.ntp_bc(2), 0.5), (T.mup_bc(2), 0.0)]:
        res = T.classify(*bc, [0.5] * 3, 0.5)
        assert res["bc_stable"] and res["r"] == r
        assert res["feature_learning"] == (r == 0)


def test_naive_scaling_is_unstable_in_mup_proposition_1():
    res = T.classify(*T.mup_bc(2), [0, 0, 0], 0)
    assert not res["stable"]
    assert not res["stability"]["output_perturbations"]
    assert res["d_layers"] == [0.5, 0.5, 0.5]  # canonical representative, Table D.2


@pytest.mark.parametrize("bc", [T.mup_bc(3), T.sp_bc(3, stable=True), T.ntp_bc(3)])
def test_global_scaling_perturbs_only_readout_proposition_2(bc):
    cg = T.grad_scale(*bc)
    # d = 1/2 effective readout; hidden layers vanish (Thm 9, Thm D.9)
    res = T.classify(*bc, [0, 0, 0, 0], 0.5)
    assert res["stable"]
    assert res["effective"] == [False, False, False, True]
    assert all(res["vanishing"])
    assert res["r_tilde"] == cg
    # d < 1/2 blows up, d > 1/2 vanishes everywhere
    assert not T.classify(*bc, [0, 0, 0, 0], 0.25)["stable"]
    big = T.classify(*bc, [0, 0, 0, 0], 0.75)
    assert big["stable"] and not big["perturbation_nontrivial"] and not any(big["effective"])


def test_classify_is_invariant_under_shift_of_d_layers():
    b, c = T.mup_bc(2)
    d, dl = T.mpp(b, c)
    shifted = T.classify(b, c, [x + 3.0 for x in dl], d)
    assert shifted["d_layers"] == dl and shifted["effective"] == [True] * 3


def test_sp_cannot_perturb_hidden_layers_effectively_theorem_11():
    b, c = T.sp_bc(2, stable=True)
    cg = T.grad_scale(b, c)
    # the choice that makes every layer effective per Thm 10 is unstable when b_{L+1} < 1
    d = -0.5
    dl = [-(cg + d), 1 - cg - d, 1 - d]
    res = T.classify(b, c, dl, d)
    assert res["effective"] == [True, True, True]
    assert not res["stable"]


def test_example_f1_first_layer_only():
    b, c = T.mup_bc(2)
    d, dl = T.example_f1(b, c)
    assert (d, dl) == (-0.5, [-0.5, 1.5, 2.5])
    res = T.classify(b, c, dl, d)
    assert res["stable"] and res["r_tilde"] == 0.0 and res["perturbation_nontrivial"]
    assert res["effective"] == [True, False, False]
    assert res["vanishing"] == [False, False]  # perturbations propagate (Prop. D.13)
    # App. F.1 general rule with the other layers not perturbed at all
    assert T.perturbation_scaling(b, c, [True, False, False]) == (-0.5, [-0.5, None, None])


def test_perturbation_scaling_rules_of_appendix_f1():
    b, c = T.mup_bc(3)
    assert T.perturbation_scaling(b, c, [False, True, True, False]) == (0.0, [None, 0.0, 0.0, None])
    assert T.perturbation_scaling(b, c, [False, False, True, True]) == (0.0, [None, None, 0.0, 1.0])
    assert T.perturbation_scaling(b, c, [False, False, False, True]) == (
        0.5,
        [None, None, None, 0.5],
    )
    assert T.perturbation_scaling(b, c, [False] * 4) == (None, [None] * 4)
    for eff in ([True, False, True, False], [False, True, False, True], [True] * 4):
        d, dl = T.perturbation_scaling(b, c, eff)
        res = T.classify(b, c, dl, d)
        assert res["stable"] and res["effective"] == eff


def test_lemma_f11_a_mupp_needs_no_layerwise_scaling():
    assert T.mpp_multipliers([-0.5, 0, 0, 0.5]) == (0.0, [0.0, 0.0, 0.0, 0.0])
    # Lemma F.11 for any d: a_1 = -d - 1/2, a_l = -d, a_{L+1} = -d + 1/2 gives d_l = const
    d0 = 0.25
    d, dl = T.mpp_multipliers([-d0 - 0.5, -d0, -d0 + 0.5])
    assert d == d0 and len(set(dl)) == 1


def test_lemma_f12_mup_package():
    # (b): μP² with the mup readout multiplier
    assert T.mpp_multipliers([0, 0, 1]) == (-0.5, [-0.5, 0.5, -0.5])
    # (a): global scaling with the multiplier: d = 0 perturbs only hidden layers
    d, by_role = T.variant_exponents("sam", "mup-global", weight_multipliers={"output": 1})
    assert d == 0.0


@pytest.mark.parametrize(
    "a", [[0, 0, 0], [0, 0, 1], [-0.5, 0, 0.5], [0.5, 0.25, 1.5], [-1, 0.5, 0]]
)
def test_lemma_f13_matches_the_general_solver(a):
    d, dl = T.mpp_multipliers(a)
    d2, by_role = T.variant_exponents(
        "sam", "mupp", weight_multipliers={"input": a[0], "hidden": a[1], "output": a[2]}
    )
    assert d == d2
    assert dl == [by_role["input"], by_role["hidden"], by_role["output"]]


def test_table_1():
    t = T.table1()
    assert {k: (v["global"], v["input"], v["hidden"], v["output"]) for k, v in t.items()} == {
        "sam": (0.5, 0.5, -0.5, -1.5),
        "asam-layer": (0.0, 0.0, -1.0, 0.0),
        "asam-elem": (0.5, 0.0, 0.0, 0.0),
        "sam-on": (0.5, 0.0, None, None),
    }
    # left half: perturbed under global scaling
    pg = {k: tuple(v["perturbed_by_global"].values()) for k, v in t.items()}
    assert pg == {
        "sam": (False, False, True),
        "asam-layer": (False, True, False),
        "asam-elem": (True, True, True),
        "sam-on": (True, False, False),
    }


def test_table_f1():
    rows = {r["d"]: r for r in T.table_f1()}
    eff = {k: tuple(r["effective"].values()) for k, r in rows.items()}
    dom = {k: tuple(r["dominate"].values()) for k, r in rows.items()}
    assert eff["d=-1/2"] == (True, True, True)
    assert eff["d in (-1/2,0)"] == (False, True, True)
    assert eff["d=0"] == (False, True, True)
    assert eff["d in (0,1/2)"] == (False, False, True)
    assert eff["d=1/2"] == (False, False, True)
    assert eff["d>1/2"] == (False, False, False)
    assert dom["d=-1/2"] == (True, False, False)
    assert dom["d=0"] == (True, True, False)
    assert dom["d=1/2"] == (True, True, True)


def test_variant_exponents_presets():
    assert T.variant_exponents("sam", "mup-naive") == (
        0.0,
        {"hidden": 0.0, "input": 0.0, "output": 0.0},
    )
    assert T.variant_exponents("sam", "mup-global")[0] == 0.5
    assert T.variant_exponents("sam", "mupp") == (
        -0.5,
        {"hidden": 0.5, "input": -0.5, "output": 1.5},
    )
    assert T.variant_exponents("asam-layer", "mupp") == (
        0.0,
        {"hidden": 1.0, "input": 0.0, "output": 0.0},
    )
    assert T.variant_exponents("sam", "mupp", roles=["output"]) == (0.5, {"output": 0.5})


def test_bad_input_messages():
    with pytest.raises(ValueError, match="variant must be one of"):
        T.variant_exponents("nope")
    with pytest.raises(ValueError, match="parameterization must be one of"):
        T.variant_exponents("sam", "xx")
    with pytest.raises(ValueError, match="same length"):
        T.classify([0, 1], [0], [0, 0], 0)
    with pytest.raises(ValueError, match="d_layers must have"):
        T.classify([0, 1], [0, 1], [0], 0)
    with pytest.raises(ValueError, match="L \\(number of hidden layers\\)"):
        T.mup_bc(0)


def test_theory_imports_no_torch():
    import subprocess
    import sys

    # the theory (and the choices it checks against) without the package's __init__, which
    # loads torch for the optimizers
    code = (
        "import sys, types, os; pkg = types.ModuleType('mupp'); "
        "pkg.__path__ = [os.path.dirname(sys.argv[1])]; sys.modules['mupp'] = pkg; "
        "import mupp.theory; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, T.__file__], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
