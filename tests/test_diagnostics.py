"""Diagnostics: the qualitative width exponents of the paper (Sec. 3, Fig. 2, App. H.1) on a small synthetic setting, probes."""

import json

import pytest
import torch

from mupp.diagnostics import (
    feature_rank,
    format_tables,
    grad_norm,
    hessian_top_eigenvalue,
    hessian_trace,
    slope,
    spectral_norm,
)
from mupp.diagnostics.coordcheck import denominator_verdict
from mupp.lab.checks import coordcheck
from mupp.lab.cli import main

WIDTHS = [64, 128, 256, 512, 1024]


@pytest.fixture(scope="module")
def checks():
    return {
        p: coordcheck(
            "mlp", WIDTHS, parameterization=p, steps=8, seeds=1, dataset="synthetic", progress=False
        )
        for p in ("mupp", "mup-global", "mup-naive")
    }


def test_mupp_perturbation_effect_is_width_independent_in_every_layer(checks):
    s = checks["mupp"]["slopes"]["pert_rms"]
    assert all(abs(v) < 0.2 for v in s.values()), s


def test_global_scaling_perturbations_vanish_before_the_readout(checks):
    s = checks["mup-global"]["slopes"]["pert_rms"]
    assert s["layers.0"] < -1.0 and s["layers.1"] < -0.4, s
    assert s["layers.2"] > -0.2, s


CHEAP = {
    "momentum": {"ascent": "momentum", "momentum": 0.9},
    "looksam": {"every": 4, "reuse": "looksam", "momentum": 0.9},  # step 8: a full step
}


CHEAP_KW = dict(steps=8, seeds=2, dataset="synthetic", progress=False, lr=0.01, rho=0.2)


@pytest.mark.parametrize("plan", sorted(CHEAP))
def test_cheap_sam_perturbations_scale_like_two_pass_sam(plan):
    """Momentum-SAM's ε (along the momentum, a fixed linear combination of gradients) and
    LookSAM's full-step ε take Def. 4's layerwise factors unchanged: their effect on every
    layer is width-independent under μP² and vanishes before the readout under μP-global,
    as two-pass SAM's does (the tests above)."""
    mupp_ = coordcheck("mlp", WIDTHS, parameterization="mupp", sam_options=CHEAP[plan], **CHEAP_KW)
    glob = coordcheck(
        "mlp", WIDTHS, parameterization="mup-global", sam_options=CHEAP[plan], **CHEAP_KW
    )
    s = mupp_["slopes"]["pert_rms"]
    assert all(abs(v) < 0.3 for v in s.values()), s
    g = glob["slopes"]["pert_rms"]
    assert g["layers.0"] < -1.0 and g["layers.1"] < -0.4 and g["layers.2"] > -0.2, g
    assert mupp_["config"]["ascent" if plan == "momentum" else "reuse"] in ("momentum", "looksam")


def test_naive_scaling_readout_perturbation_grows(checks):
    s = checks["mup-naive"]["slopes"]["pert_rms"]
    assert s["layers.2"] > 0.5, s
    assert s["layers.2"] > checks["mup-global"]["slopes"]["pert_rms"]["layers.2"] + 0.3


def test_updates_are_width_independent_under_mup_for_every_perturbation_scaling(checks):
    for p, r in checks.items():
        assert all(abs(v) < 0.2 for v in r["slopes"]["update_rms"].values()), (
            p,
            r["slopes"]["update_rms"],
        )


@pytest.fixture(scope="module")
def at_init():
    return {
        p: coordcheck(
            "mlp", WIDTHS, parameterization=p, steps=0, seeds=1, dataset="synthetic", progress=False
        )["denominator"]
        for p in ("mupp", "mup-naive")
    }


def test_mupp_denominator_is_dominated_by_the_input_layer(at_init):
    # Def. 4 with Thm 11's d_l: the input term is Θ(1), the hidden term vanishes like n^-1/2
    # and the readout term like n^-1, so the joint norm is width-independent
    s, v = at_init["mupp"]["slopes"], at_init["mupp"]["values"]
    assert abs(s["input"]) < 0.1 and abs(s["total"]) < 0.1, s
    assert s["hidden"] == pytest.approx(-0.5, abs=0.1), s
    assert s["output"] == pytest.approx(-1.0, abs=0.15), s
    assert all(i**2 > 0.9 * t**2 for i, t in zip(v["input"], v["total"])), v


def test_naive_denominator_follows_the_raw_gradient_norms(at_init):
    # d = d_l = 0: the terms are ||g_l||, the μP readout gradient grows like n^1/2 and the
    # input layer's shrinks like n^-1/2 (Prop. 1's readout blow-up comes from the former)
    s = at_init["mup-naive"]["slopes"]
    assert s["output"] == pytest.approx(0.5, abs=0.15), s
    assert s["input"] == pytest.approx(-0.5, abs=0.1), s
    assert abs(s["hidden"]) < 0.1, s


def test_denominator_table_is_printed_and_absent_for_per_layer_rules(at_init):
    r = coordcheck(
        "mlp", [64, 128], rule="LN", steps=0, seeds=1, dataset="synthetic", progress=False
    )
    assert r["denominator"] == {"values": {}, "slopes": {}}
    assert "denominator" not in format_tables(r)
    lp = coordcheck("mlp", [64, 128], steps=0, seeds=1, dataset="synthetic", progress=False)
    table = format_tables(lp).split("denominator")[1].splitlines()
    assert [line.split()[0] for line in table[2:6]] == ["hidden", "input", "output", "total"]
    assert "flat within 25% from width 64 to 128" in format_tables(lp)


def test_denominator_verdict_names_the_drift():
    assert "flat within 25%" in denominator_verdict([8, 64], [1.0, 0.9])[0]
    line = denominator_verdict([8, 64], [0.727, 0.294])[0]
    assert "changes 0.40x from width 8 to 64" in line and "perturbs 2.47x" in line
    assert "rule='DP'" in line


def test_result_schema(checks):
    r = checks["mupp"]
    assert r["widths"] == WIDTHS and r["layers"] == ["layers.0", "layers.1", "layers.2"]
    assert set(r["metrics"]) == {
        "pert_rms",
        "pert_rel_spec",
        "update_rms",
        "update_spec",
        "act_rms",
    }
    assert all(len(v) == len(WIDTHS) for v in r["metrics"]["act_rms"].values())


def test_slope_fit():
    assert slope([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert slope([1, 2, 4], [1, 0.5, 0.25]) == pytest.approx(-1.0)
    assert slope([1, 2], [1, 0]) != slope([1, 2], [1, 0])  # nan for non-positive values


def test_spectral_norm_power_iteration():
    w = torch.randn(30, 20)
    assert spectral_norm(w, iters=100) == pytest.approx(
        torch.linalg.matrix_norm(w, 2).item(), rel=1e-3
    )


def test_probes_on_a_quadratic():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))  # loss = mean((Wx)^2) -> H = 2/3 diag(1, 4, 9)

    def loss():
        return model(x).pow(2).mean()

    assert hessian_top_eigenvalue(model, loss, iters=50) == pytest.approx(6.0, rel=1e-3)
    assert hessian_trace(model, loss, samples=30) == pytest.approx(2 / 3 * 14, rel=1e-4)
    g = torch.autograd.grad(loss(), model.weight)[0].norm().item()
    assert grad_norm(model, loss) == pytest.approx(g)
    feats = torch.randn(200, 3) @ torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1e-4]])
    assert feature_rank(feats) == 2


def test_coordcheck_cli_writes_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    argv = [
        "coordcheck",
        "--widths",
        "32,64",
        "--steps",
        "1",
        "--seeds",
        "1",
        "--json",
        str(js),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pert_rms" in out and "slope" in out and "denominator" in out
    data = json.loads(js.read_text())
    assert data["widths"] == [32, 64] and "slopes" in data
    assert set(data["denominator"]["values"]) == {"hidden", "input", "output", "total"}
    assert png.stat().st_size > 10_000


def test_coordcheck_bad_input():
    with pytest.raises(ValueError, match="at least 2 entries"):
        coordcheck("mlp", [64], progress=False)
    with pytest.raises(ValueError, match="model must be one of"):
        coordcheck("cnn", [64, 128], progress=False)


FACTORIES = """
import torch
import mupp
from mupp.lab.config import TrainConfig


def raises(w):
    raise RuntimeError("boom")


def none(w):
    return None


def adict(w):
    return {"a": 1}


def nowidth():
    return torch.nn.Linear(3, 3)


def vectors(w):
    def net(n):
        return torch.nn.Sequential(torch.nn.Linear(3072, n), torch.nn.ReLU(), torch.nn.Linear(n, 10))

    return mupp.set_base_shapes(net(int(w)), net(8))
"""


@pytest.mark.parametrize(
    "factory,message",
    [
        ("factories:raises", "the factory raised RuntimeError: boom"),
        ("factories:none", "the factory returned NoneType for width 16, not an nn.Module"),
        ("factories:adict", "the factory returned dict for width 16"),
        ("factories:nowidth", "must take the width as its one argument"),
        ("factories:vectors", "pass --flatten to feed the images flattened"),
        ("broken:make", "'broken' has a syntax error (expected ':'"),
    ],
)
def test_coordcheck_of_a_bad_factory_is_one_line(tmp_path, monkeypatch, capsys, factory, message):
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "broken.py").write_text("def make(w) return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status = main(
        ["coordcheck", "--model", factory, "--widths", "16,32", "--steps", "1", "--seeds", "1"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and message in err, err


def test_resnet_and_vit_coordcheck_run():
    for model, widths in (("resnet8", [8, 16]), ("vit", [32, 64])):
        r = coordcheck(model, widths, steps=1, seeds=1, batch_size=8, progress=False)
        assert all(v > 0 for vals in r["metrics"]["act_rms"].values() for v in vals)


def test_global_sam_approaches_last_layer_sam_with_width(capsys):
    from mupp.lab.checks import last_layer_equivalence

    res = last_layer_equivalence("mlp", [64, 256, 1024], steps=20, seeds=1)
    assert res["gap"][-1] < res["gap"][0] and res["slope"] < -0.1, res
    assert (
        main(
            [
                "coordcheck",
                "--compare-last-layer",
                "--widths",
                "64,128",
                "--steps",
                "2",
                "--seeds",
                "1",
            ]
        )
        == 0
    )
    assert "gap" in capsys.readouterr().out


def test_run_statistics_of_trained_runs(tmp_path, capsys):
    from mupp.lab import data
    from mupp.lab.config import TrainConfig
    from mupp.lab.statistics import run_statistics
    from mupp.lab.train import train

    ds = data.synthetic(256, 64, seed=1)
    base = dict(dataset="synthetic", width=32, base_width=16, epochs=1, batch_size=64, lr=0.05)

    # SP has no perturbation scaling (num = den = 1): with only the readout perturbed, Def. 4's
    # joint normalization makes ||ε_out||_F exactly rho
    def fit(out, **options):
        train(
            TrainConfig.from_dict(dict(base, **options)), out, progress=False, dataset=ds, log=None
        )

    fit(tmp_path / "ll", parameterization="sp", variant="last-layer", rho=0.3)
    fit(tmp_path / "sgd", rho=0.0)
    ll = run_statistics(tmp_path / "ll", dataset=ds, probe_size=128)
    assert ll["layers"]["pert_norm"]["layers.2"] == pytest.approx(0.3, rel=1e-5)
    assert ll["layers"]["pert_norm"]["layers.0"] == ll["layers"]["pert_norm"]["layers.1"] == 0.0
    ranks = ll["layers"]["feature_rank"]
    assert 1 <= ranks["layers.1"] <= 32 and 1 <= ranks["layers.2"] <= 10
    assert all(v > 0 for v in ll["layers"]["update_spec"].values())
    assert ll["model"]["hessian_top"] > 0 and ll["model"]["grad_norm"] > 0
    sgd = run_statistics(tmp_path / "sgd", dataset=ds, probe_size=128)
    assert set(sgd["layers"]["pert_norm"].values()) == {0.0}
    # the initial weights are rebuilt from the run's seed: a run that barely moved shows ~0
    fit(tmp_path / "still", lr=1e-9, rho=0.0)
    still = run_statistics(tmp_path / "still", dataset=ds, probe_size=128)
    assert max(still["layers"]["update_spec"].values()) < 1e-6
    with pytest.raises(FileNotFoundError, match="run_dir .* has no checkpoint.pt"):
        run_statistics(tmp_path, dataset=ds)
    with pytest.raises(ValueError, match="probe_size must be >= 2"):
        run_statistics(tmp_path / "ll", dataset=ds, probe_size=1)
    assert main(["stats", str(tmp_path / "ll"), "--probe-size", "64", "--json", str(tmp_path / "s.json")]) == 0  # fmt: skip
    assert "pert_norm" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())[0]["config"]["variant"] == "last-layer"


def test_coord_data_takes_any_model_factory():
    """microsoft/mup's get_coord_data shape: width -> model, model -> optimizer, batches."""
    import torch
    from torch import nn

    import mupp
    from mupp.diagnostics import coord_data

    def net(w):
        return nn.Sequential(
            nn.Linear(20, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 3)
        )

    def make(w):
        with torch.device("meta"):
            base = net(16)
        return mupp.mup_init_(mupp.set_base_shapes(net(int(w)), base))

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 20, generator=g), torch.randint(0, 3, (32,), generator=g))]
    res = coord_data(
        make,
        [64, 256],
        lambda m: mupp.SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1),
        batches,
        steps=2,
        seeds=1,
    )
    assert res["layers"] == ["0", "2", "4"] and res["widths"] == [64, 256]
    assert all(v > 0 for v in res["metrics"]["pert_rms"]["2"])
    # μP²: the perturbation's effect on every layer's output does not decay with width;
    # μP-global: the input layer's decays like n^-2, the hidden layer's like n^-1
    assert all(abs(res["slopes"]["pert_rms"][layer]) < 0.3 for layer in res["layers"])
    glob = coord_data(
        make,
        [64, 256],
        lambda m: mupp.SAM(
            m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, parameterization="mup-global"
        ),
        batches,
        steps=2,
        seeds=1,
    )
    assert glob["slopes"]["pert_rms"]["0"] < -1.5 and glob["slopes"]["pert_rms"]["2"] < -0.7
    plain = coord_data(
        make,
        [64, 128],
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        batches,
        steps=1,
        seeds=1,
    )
    assert plain["metrics"]["pert_rms"]["0"] == [0.0, 0.0]  # not SAM: nothing perturbed
    with pytest.raises(ValueError, match="no weight with width metadata"):
        coord_data(net, [8, 16], lambda m: torch.optim.SGD(m.parameters(), lr=0.1), batches)
