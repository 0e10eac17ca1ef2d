"""mupp demo (mupp/lab/demo.py): the verdict's statistics on records with known answers, the
sentences significant or not, the figure, the mechanism's exponents, and bad input."""

import math

import pytest

from mupp.lab import demo
from mupp.lab.cli import main


def rows(head_by_seed, seeds=(0, 1, 2, 3)):
    """Records of the demo grid: SGD 40% at width 1024, μP² at ρ = 0.2 gains 2 points,
    μP-global 2 - head points at its better ρ (0.8; 0.2 is worse)."""
    out = []

    def add(par, width, rho, seed, acc):
        out.append(dict(parameterization=par, width=width, rho=rho, seed=seed, acc=acc / 100))

    for s in seeds:
        for par in ("mupp", "mup-global"):
            add(par, 64, 0.0, s, 30.0 + s)
            add(par, 64, 0.2, s, 31.0 + s)
            add(par, 64, 0.8, s, 29.0 + s)
            add(par, 1024, 0.0, s, 40.0 + s)
        add("mupp", 1024, 0.2, s, 42.0 + s)
        add("mupp", 1024, 0.8, s, 41.0 + s)
        add("mup-global", 1024, 0.2, s, 40.5 + s)
        add("mup-global", 1024, 0.8, s, 42.0 + s - head_by_seed[s])
    return out


def test_verdict_pairs_by_seed_and_picks_mup_globals_better_rho():
    v = demo.verdict(rows({0: 0.8, 1: 1.0, 2: 1.2, 3: 1.0}))
    assert v["width"] == 1024 and v["base_width"] == 64 and v["global_rho"] == 0.8
    assert v["seeds"] == [0, 1, 2, 3]
    assert v["mupp_vs_sgd"]["mean"] == pytest.approx(2.0) and v["mupp_vs_sgd"][
        "half_width"
    ] == pytest.approx(0.0, abs=1e-9)
    head = v["mupp_vs_global"]
    assert head["mean"] == pytest.approx(1.0)
    sd = math.sqrt((0.04 + 0 + 0.04 + 0) / 3)
    assert head["half_width"] == pytest.approx(3.182446 * sd / 2, rel=1e-4) and head["significant"]
    assert v["base_gain"]["mean"] == pytest.approx(1.0)


def test_sentences_say_when_the_head_to_head_is_not_significant():
    mech = {"slopes": {"mup-global": {"input": -0.5, "hidden": -0.49, "output": 0.01},
                       "mupp": {"input": 0.0, "hidden": 0.02, "output": -0.01}}}  # fmt: skip
    good = demo.sentences(demo.verdict(rows({0: 0.8, 1: 1.0, 2: 1.2, 3: 1.0})), mech)
    assert good[0].startswith(
        "At width 1024, μP² SAM (ρ = 0.2, the base width's optimum) beats SGD by +2.00"
    )
    assert "by +1.00 ± 0.26 points (95%, 4 seeds, paired by seed)" in good[0]
    assert good[1].startswith("The head-to-head is significant")
    assert "width^-0.50 and width^-0.49" in good[2] and "μP²'s are flat" in good[2]
    assert 3 <= len(good) <= 5
    bad = demo.sentences(demo.verdict(rows({0: 2.0, 1: -2.0, 2: 1.0, 3: -0.5})), mech)
    assert bad[1].startswith("The head-to-head is not significant at 95%")


def test_verdict_refuses_records_without_its_cells():
    with pytest.raises(ValueError, match="needs two widths"):
        demo.verdict([r for r in rows({s: 1.0 for s in range(4)}) if r["width"] == 64])
    with pytest.raises(ValueError, match="lack SGD or μP² at rho=0.3"):
        demo.verdict(rows({s: 1.0 for s in range(4)}), base_rho=0.3)


def test_mechanism_and_figure(tmp_path):
    mech = demo.mechanism((256, 512, 1024), dataset="synthetic", steps=5, seeds=1)
    g, p = mech["slopes"]["mup-global"], mech["slopes"]["mupp"]
    assert set(g) == {"input", "hidden", "output"}
    # Fig. 2: μP-global's input and hidden perturbations vanish with width, μP²'s stay flat
    assert g["input"] < -0.3 and g["hidden"] < -0.3 and g["output"] > -0.2
    assert all(abs(e) < 0.2 for e in p.values())
    from mupp.lab.plots import plot_demo

    path = plot_demo(mech, demo.verdict(rows({s: 1.0 for s in range(4)})), str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").stat().st_size < 300_000 and path.endswith("d.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workers", "0"], "--workers must be a whole number >= 1; got 0"),
        (["--seeds", "1"], "--seeds must be >= 2"),
        (["--out", "FILE/demo"], "is not a writable directory"),
        (["--data-dir", "/nonexistent-mupp"], "mupp demo needs CIFAR-10"),
    ],
)
def test_demo_bad_input_gets_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MUPP_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "FILE").write_text("a file, not a folder")
    argv = [str(tmp_path / a) if a.startswith("FILE") else a for a in argv]
    args = ["demo", *argv] if "--out" in argv else ["demo", "--out", str(tmp_path / "o"), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
