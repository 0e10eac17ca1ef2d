"""The command-line tool: help, version, theory tables, errors."""

import json
import subprocess
import sys

import pytest

import mupp
from mupp.lab.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("data", "theory", "models"):
        assert cmd in out


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "mupp", "--version"], capture_output=True, text=True
    )
    assert out.stdout.strip() == f"mupp {mupp.__version__}"


def test_theory_table_and_classify(capsys):
    assert main(["theory"]) == 0
    out = capsys.readouterr().out
    assert "sam" in out and "n^-1.5" in out and "Table F.1" in out
    assert (
        main(["theory", "classify", "--b=0,0.5,1", "--c=-1,0,1", "--dl=0,0,0", "--d=1/2", "--json"])
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["stable"] and res["effective"] == [False, False, True]
    assert main(["theory", "classify", "--b=0,0.5,1", "--c=-1,0,1", "--dl=0,0,0", "--d=0"]) == 0
    assert "UNSTABLE" in capsys.readouterr().out


def test_import_is_light():
    # (tqdm is left out: torch itself imports it)
    code = "import sys, mupp; print(sorted(m for m in ('matplotlib', 'optuna', 'yaml', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_negative_values_need_no_equals_sign(capsys):
    assert (
        main(
            [
                "theory",
                "classify",
                "--b",
                "0,0.5,1",
                "--c",
                "-1,0,1",
                "--dl",
                "-0.5,0.5,1.5",
                "--d",
                "-0.5",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["effective"] == [True, True, True] and res["stable"]


def test_readme_api_example_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## API in 15 lines", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 15
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["loss"].ndim == 0


def test_models_widths_that_are_not_numbers_get_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["models", "--widths", "abc"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "expected comma-separated numbers, got 'abc'" in err and "lambda" not in err


def test_coordcheck_knobs_left_unset_take_the_running_checks_own_defaults(monkeypatch, capsys):
    """One default per parameter: `--compare-last-layer` without knobs runs App. H.1's check
    with last_layer_equivalence's defaults, not coordcheck's; given knobs pass through."""
    import functools
    import inspect

    from mupp.lab import commands

    seen = {}
    real = commands.last_layer_equivalence

    @functools.wraps(real)  # its signature: the defaults' home
    def fake(model, widths, **kw):
        call = inspect.signature(real).bind(model, widths, **kw)
        call.apply_defaults()  # what the real check would run with
        seen.update(call.arguments)
        return {"widths": list(widths), "gap": [0.5] * len(widths), "slope": -0.5}

    monkeypatch.setattr(commands, "last_layer_equivalence", fake)
    assert main(["coordcheck", "--compare-last-layer"]) == 0
    assert seen["widths"] == (64, 256, 1024) and seen["steps"] == 50 and seen["lr"] == 0.05
    seen.clear()
    assert main(["coordcheck", "--compare-last-layer", "--steps", "7", "--widths", "32,64"]) == 0
    assert seen["widths"] == [32, 64] and seen["steps"] == 7 and seen["lr"] == 0.05
    capsys.readouterr()
    assert main(["coordcheck", "--help-defaults"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("coordcheck: widths=(64, 128, 256, 512), steps=10")
    assert out[1].startswith("last_layer_equivalence: widths=(64, 256, 1024), steps=50")


def test_every_trainconfig_option_is_a_train_flag_declared_once(monkeypatch):
    """The flags of `mupp train` come from TrainConfig's fields: every scalar, switch and
    choice field has one, with its help and its choices, and a given flag reaches the run."""
    import dataclasses

    from mupp.lab import commands
    from mupp.lab.cli import build_parser
    from mupp.lab.config import TrainConfig, train_options

    options = {o.name: o for o in train_options()}
    assert set(options) == {f.name for f in dataclasses.fields(TrainConfig)} - {"model_kwargs"}
    assert options["rule"].choices == ("LP", "DP", "LN", "unnormalized")
    assert all(o.help for o in options.values())
    seen = {}
    record = dict(best_test_acc=0.5, best_epoch=1, final_test_acc=0.5, diverged=False, wall_time=0)

    def fake_train(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return record

    monkeypatch.setattr(commands, "train", fake_train)
    args = build_parser().parse_args(
        ["train", "--dataset", "synthetic", "--rule", "DP", "--no-last-layer-fast", "--nesterov"]
    )
    assert commands.cmd_train(args) == 0
    cfg = seen["cfg"]
    assert (cfg.rule, cfg.last_layer_fast, cfg.nesterov) == ("DP", False, True)
