"""Training runs: determinism, exact resume, divergence flag, configs, CLI."""

import errno
import json
import math
import os
import signal

import pytest

from mupp.lab import data
from mupp.lab.checkpoint import load_checkpoint, save_checkpoint
from mupp.lab.cli import main
from mupp.lab.config import TrainConfig, load_config_file
from mupp.lab.train import train

DS = data.synthetic(512, 256)
BASE = dict(
    dataset="synthetic",
    width=64,
    base_width=32,
    epochs=3,
    batch_size=64,
    lr=0.05,
    rho=0.1,
    momentum=0.9,
)


def run(out=None, *, resume=False, log=None, stop_after_epochs=None, **options):
    """Train BASE with ``options`` on the synthetic data, quietly."""
    cfg = TrainConfig.from_dict(dict(BASE, **options))
    return train(
        cfg, out, resume=resume, progress=False, dataset=DS, log=log,
        stop_after_epochs=stop_after_epochs,
    )  # fmt: skip


def test_deterministic_per_seed():
    a, b, c = run(), run(), run(seed=1)
    assert a["history"] == b["history"]
    assert a["history"] != c["history"]
    assert 0 < a["best_test_acc"] <= 1 and not a["diverged"]
    assert set(a["history"][0]) >= {"train_loss", "train_acc", "test_loss", "test_acc"}


def test_resume_continues_exactly(tmp_path):
    full = run(tmp_path / "full", schedule="cosine")

    class Killed(Exception):
        pass

    def kill_after_first_epoch(msg):
        if msg.startswith("epoch 1/"):
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "part", log=kill_after_first_epoch, schedule="cosine")
    resumed = run(tmp_path / "part", resume=True, schedule="cosine")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"] == full["history"]
    assert json.loads((tmp_path / "part" / "result.json").read_text())["history"] == full["history"]


def test_resume_refuses_a_different_config(tmp_path):
    run(tmp_path, epochs=1)
    with pytest.raises(ValueError, match="different configuration"):
        run(tmp_path, resume=True, epochs=1, lr=0.2)


def test_resume_accepts_a_checkpoint_written_before_an_option_existed(tmp_path):
    # a checkpoint of an older mupp lacks `last_layer_fast`: it ran with the default (a study
    # killed across versions must resume, not stop with "different configuration")
    full = run(tmp_path / "full", epochs=2)
    run(tmp_path / "old", stop_after_epochs=1, epochs=2)
    ckpt = tmp_path / "old" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    del state["config"]["last_layer_fast"]
    save_checkpoint(state, ckpt)
    resumed = run(tmp_path / "old", resume=True, epochs=2)
    assert resumed["history"] == full["history"]
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        run(tmp_path / "old", resume=True, epochs=2, lr=0.2)


def test_divergence_is_flagged_not_raised():
    r = run(lr=1e4, rho=0.0)
    assert r["diverged"] and len(r["history"]) == 1


def test_sgd_baseline_resnet_and_adamw_paths():
    r = run(rho=0.0, epochs=1)
    assert not r["diverged"]
    r = run(model="resnet8", width=8, base_width=8, epochs=1, augment=True, label_smoothing=0.1)
    assert r["history"][0]["test_acc"] > 0
    r = run(optimizer="adamw", lr=1e-3, epochs=1, schedule="cosine", warmup_epochs=0.5)
    assert not r["diverged"]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(optimizer="lion"), "optimizer must be one of"),
        (dict(lr=-1.0), "lr must be a non-negative finite number"),
        (dict(batch_size=0), "batch_size must be a whole number >= 1"),
        (dict(lerning_rate=0.1), "unknown training options"),
        (dict(epochs=1.5), "epochs must be a whole number >= 1"),
        (dict(lr=True), "lr must be a non-negative finite number"),
        (dict(train_subset=-100), "train_subset must be a whole number >= 1"),
        (dict(width=64.7), "width of the mlp is a number of hidden units"),
        (dict(model="resnet8", width=0.5), "width_mult 0.5 is width 32"),
        (dict(model_kwargs={"nope": 1}), "model_kwargs {'nope': 1} do not fit the mlp"),
        (dict(model_kwargs=3), "model_kwargs must be a mapping"),
        (dict(seed=0.5), "seed must be a whole number"),
        (dict(augment="yes"), "augment must be true or false"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(dict(BASE, **kw))


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text("[train]\nlr = 0.2\nmodel_kwargs = { output_mult = 0.5 }\n")
    (tmp_path / "b.yaml").write_text("lr: 0.3\n")
    assert load_config_file(tmp_path / "a.toml")["train"] == {
        "lr": 0.2,
        "model_kwargs": {"output_mult": 0.5},
    }
    assert load_config_file(tmp_path / "b.yaml") == {"lr": 0.3}


def test_train_cli(tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "synthetic",
        "--width",
        "32",
        "--base-width",
        "32",
        "--epochs",
        "1",
    ]
    argv += ["--rho", "0.05", "--out", str(tmp_path), "--no-progress", "--set", "train_subset=256"]
    assert main(argv) == 0
    assert "best test acc" in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["config"]["train_subset"] == 256
    assert main(["train", "--dataset", "synthetic", "--optimizer", "lamb", "--no-progress"]) == 2


def test_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainConfig.from_dict(dict(BASE, data_dir="data")).data_dir == str(tmp_path / "data")


def test_gpt_trains_on_a_text_file_and_reports_validation_loss(tmp_path):
    text = "".join(f"the cat sat on mat {i % 7}. " for i in range(400))
    (tmp_path / "t.txt").write_text(text)
    cfg = dict(
        model="gpt", dataset="tinyshakespeare", text_file=str(tmp_path / "t.txt"), width=32,
        base_width=16, block_size=16, optimizer="adamw", lr=3e-3, rho=0.05, rule="DP",
        epochs=2, batch_size=8, model_kwargs={"n_layer": 1, "n_head": 2},
    )  # fmt: skip
    r = train(TrainConfig.from_dict(cfg), None, progress=False, log=None)
    assert r["best_test_loss"] == min(h["test_loss"] for h in r["history"])
    assert r["best_test_bpc"] == pytest.approx(r["best_test_loss"] / math.log(2))
    assert r["history"][-1]["train_loss"] < math.log(len(set(text)))  # it learned something


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(model="gpt", dataset="cifar10"), "do not fit: the gpt trains on text"),
        (dict(model="mlp", dataset="tinyshakespeare"), "do not fit"),
        (dict(model="mlp", text_file="x.txt"), "text_file names a text corpus"),
        (dict(model="gpt", dataset="tinyshakespeare", block_size=0), "block_size must be"),
    ],
)
def test_text_configurations_are_checked_at_the_door(bad, message):
    from mupp.lab.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(bad).validate()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_checkpoints_the_step_and_resumes_bitwise(tmp_path, monkeypatch, signum):
    """SIGTERM or SIGINT inside an epoch: the step finishes, the checkpoint keeps the position
    in the epoch (data order, running sums, RNG), and --resume equals an uninterrupted run."""
    import mupp.lab.train as train_mod

    cfg = dict(BASE, schedule="cosine", label_smoothing=0.0)
    full = train(
        TrainConfig.from_dict(cfg), tmp_path / "full", progress=False, dataset=DS, log=None
    )
    real = train_mod.epoch_batches

    def signalling(cfg_, split, name, epoch):
        for i, batch in enumerate(real(cfg_, split, name, epoch)):
            if epoch == 1 and i == 3:  # a real signal, delivered during the 4th step of epoch 2
                os.kill(os.getpid(), signum)
            yield batch

    monkeypatch.setattr(train_mod, "epoch_batches", signalling)
    with pytest.raises(train_mod.Preempted) as stopped:
        train(TrainConfig.from_dict(cfg), tmp_path / "part", progress=False, dataset=DS, log=None)
    assert (stopped.value.epoch, stopped.value.step, stopped.value.signum) == (2, 4, signum)
    assert signal.getsignal(signum) is not None  # the old handler is back
    monkeypatch.setattr(train_mod, "epoch_batches", real)
    resumed = train(
        TrainConfig.from_dict(cfg),
        tmp_path / "part",
        resume=True,
        progress=False,
        dataset=DS,
        log=None,
    )
    assert resumed["history"] == full["history"]


@pytest.mark.slow
def test_mupp_train_stopped_by_sigterm_says_how_to_continue(tmp_path):
    """The CLI: one line, exit status 128 + 15, and --resume finishes the run."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mupp.lab.cli", "train", "--dataset", "synthetic", "--width", "64"]
    cmd += [
        "--base-width",
        "32",
        "--epochs",
        "400",
        "--rho",
        "0.1",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert "stopped at epoch" in stdout and "--resume` continues" in stdout


def test_a_failed_checkpoint_write_leaves_the_last_one_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()  # it would keep the disk full
    assert load_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize(
    "code,remedy",
    [
        (errno.ENOSPC, "rerun with --resume: the last complete checkpoint is intact"),
        (errno.EROFS, "read-only: choose an --out on a writable one"),
        (errno.EACCES, "permission denied: choose an --out"),
    ],
)
def test_operating_system_errors_are_one_line(tmp_path, monkeypatch, capsys, code, remedy):
    import mupp.lab.commands as commands

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code), str(tmp_path / "run" / "checkpoint.pt.tmp"))

    monkeypatch.setattr(commands, "train", refuse)
    status = main(
        ["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert os.strerror(code) in err and "checkpoint.pt.tmp" in err and remedy in err
    with pytest.raises(OSError):  # --debug still shows it
        main(["--debug", "train", "--dataset", "synthetic", "--out", str(tmp_path / "run")])


def test_train_takes_a_trainconfig_and_says_how_to_build_one():
    with pytest.raises(TypeError, match=r"train takes a TrainConfig, got dict: build it with"):
        train(dict(BASE), progress=False, log=None)


def test_a_grid_point_resolves_to_one_trainconfig():
    from mupp.lab.grid import canonical, resolve

    cfg = resolve(dict(BASE, lr=0.1), {"setting": "mup-global/sam/DP/looksam5", "rho": 0.0})
    assert isinstance(cfg, TrainConfig)
    assert (cfg.parameterization, cfg.rule, cfg.every, cfg.reuse) == (
        "mup-global",
        "DP",
        5,
        "looksam",
    )
    shared = canonical(cfg)  # rho = 0: every μP parameterization trains the same SGD run
    assert (shared.parameterization, shared.rule, shared.every, shared.reuse) == (
        "mupp",
        "LP",
        1,
        None,
    )
    with pytest.raises(ValueError, match="nosuch"):
        resolve(BASE, {"nosuch": 1})
