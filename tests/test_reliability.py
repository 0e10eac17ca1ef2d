"""Bad input and faults: checkpoints never run code and detect corruption, every bad input is
one clear line (exit 2) naming what was wrong, and sweeps never over-report."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from builders import mlp, prepared_mlp

import mupp
from mupp.lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mupp.lab.cli import main
from mupp.lab.config import TrainConfig
from mupp.lab.train import train

BASE = dict(dataset="synthetic", width=32, base_width=32, epochs=2, batch_size=64)


def one_line_error(argv, capsys, *fragments):
    """The command fails with exit 2 and one line on stderr that says what was wrong."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mupp: error: ")
    for f in fragments:
        assert f in err, err
    return err


# ------------------------------------------------------------------------------ checkpoints


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"config": Payload()}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        train(TrainConfig.from_dict(BASE), run, resume=True, progress=False, log=None)
    assert not (tmp_path / "PWNED").exists()


def test_flipped_bytes_are_detected_and_the_error_says_what_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig.from_dict(dict(BASE, epochs=1)), run, progress=False, log=None)
    ckpt = run / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: its checksum does not match"):
        load_checkpoint(ckpt)
    argv = ["train", "--dataset", "synthetic", "--width", "32", "--base-width", "32"]
    argv += ["--epochs", "2", "--out", str(run), "--resume", "--no-progress"]
    one_line_error(argv, capsys, "corrupt", "--restart")
    # --restart starts the run over
    assert main(argv[:-2] + ["--restart", "--no-progress"]) == 0
    assert len(json.loads((run / "result.json").read_text())["history"]) == 2


def test_an_older_checkpoint_without_checksum_still_loads(tmp_path):
    state = {"config": {"a": 1}, "model": {"w": torch.ones(2)}}
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["model"]["w"].sum() == 2
    save_checkpoint(state, tmp_path / "new.pt")
    assert (tmp_path / "new.pt").read_bytes().startswith(b"mupp-checkpoint sha256=")
    assert load_checkpoint(tmp_path / "new.pt")["config"] == {"a": 1}
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "old.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "trunc.pt")


# ------------------------------------------------------------------------------ bad input


def write_npz(path, **over):
    arrays = dict(
        x_train=np.zeros((20, 32, 32, 3), np.uint8),
        y_train=np.zeros(20, np.int64),
        x_test=np.zeros((10, 32, 32, 3), np.uint8),
        y_test=np.zeros(10, np.int64),
    )
    arrays.update(over)
    np.savez(path / "cifar10.npz", **arrays)


@pytest.mark.parametrize(
    "over,fragment",
    [
        (dict(y_train=np.zeros(15, np.int64)), "y_train must hold one label per image (20)"),
        (dict(x_train=np.zeros((20, 32, 32, 3), np.float32)), "x_train must be uint8"),
        (dict(x_test=np.zeros((10, 28, 28), np.uint8)), "x_test must have shape"),
        (dict(y_test=np.full(10, 12)), "y_test must be integer labels in 0..9"),
    ],
)
def test_bad_npz_arrays(tmp_path, capsys, over, fragment):
    write_npz(tmp_path, **over)
    one_line_error(["data", "info", "cifar10", "--data-dir", str(tmp_path)], capsys, fragment)


def test_truncated_npz(tmp_path, capsys):
    write_npz(tmp_path)
    p = tmp_path / "cifar10.npz"
    p.write_bytes(p.read_bytes()[:300])
    one_line_error(
        ["data", "info", "cifar10", "--data-dir", str(tmp_path)], capsys, "not a readable npz"
    )


TRAIN = ["train", "--dataset", "synthetic", "--width", "32", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--set", "epochs=1.5"], "epochs must be a whole number"),
        (["--set", 'model_kwargs={"nope":1}'], "model_kwargs {'nope': 1} do not fit the mlp"),
        (["--set", "lr=true"], "lr must be a non-negative finite number; got True"),
        (["--train-subset", "-100"], "train_subset must be a whole number >= 1"),
        (["--width", "64.7"], "width of the mlp is a number of hidden units"),
        (["--set", "label_noise=1.5"], "label_noise must be a fraction"),
    ],
)
def test_bad_training_options(tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    one_line_error(TRAIN + extra + ["--out", str(out)], capsys, fragment)
    assert not out.exists()  # a failing command leaves no empty folder behind


def test_cuda_on_a_machine_without_it(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(TRAIN + ["--device", "cuda"], capsys, "device 'cuda' is not available")


def test_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(TRAIN + ["--out", str(f)], capsys, "is a file; expected a directory")


def test_malformed_config_and_grid(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    one_line_error(["train", "--config", str(bad)], capsys, "is malformed")
    scalar = tmp_path / "scalar.toml"
    scalar.write_text('[train]\ndataset = "synthetic"\n[grid]\nlr = 0.1\n')
    one_line_error(
        ["sweep", "--config", str(scalar), "--out", str(tmp_path / "s")],
        capsys,
        "[grid] lr must be a non-empty list",
    )
    assert not (tmp_path / "s").exists()


def test_every_grid_point_is_validated_before_training(tmp_path, capsys):
    argv = ["sweep", "--grid", "lr=0.1,-1", "--grid", "rho=0.0", "--set", 'dataset="synthetic"']
    err = one_line_error(argv + ["--out", str(tmp_path / "s")], capsys, "grid point")
    assert "lr must be a non-negative finite number; got -1" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "storage,fragment",
    [
        ("notaurl", "--storage must be a database URL"),
        ("nosuchdb://x/y", "no database driver for 'nosuchdb'"),
    ],
)
def test_bad_storage_urls(tmp_path, capsys, storage, fragment):
    one_line_error(["transfer", "--storage", storage, "--out", str(tmp_path)], capsys, fragment)


def test_corrupt_sweep_database(tmp_path, capsys):
    (tmp_path / "sweep.db").write_bytes(b"this is not sqlite" * 100)
    one_line_error(["transfer", "--out", str(tmp_path)], capsys, "cannot be opened")


def test_workers_with_a_missing_data_folder(tmp_path, capsys):
    argv = ["sweep", "--grid", "lr=0.1", "--grid", "rho=0.0", "--workers", "2"]
    argv += ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]
    assert main(argv) == 2  # before any worker starts: no traceback from each of them
    err = capsys.readouterr().err
    assert err.startswith("mupp: error: cifar10 not found") and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_coordcheck_needs_two_widths(capsys):
    one_line_error(["coordcheck", "--compare-last-layer", "--widths", "64"], capsys, "at least 2")


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="at least 2"):
        main(["--debug", "coordcheck", "--compare-last-layer", "--widths", "64"])


def test_sam_rejects_a_string_rho_at_construction():
    with pytest.raises(ValueError, match="rho must be a non-negative finite number; got '0.1'"):
        mupp.SAM(prepared_mlp().parameters(), torch.optim.SGD, lr=0.1, rho="0.1")


def test_base_with_another_input_size_is_refused():
    def net(w, d_in):
        return mlp(w, d_in=d_in)

    with pytest.raises(ValueError, match="another input or output size"):
        mupp.set_base_shapes(net(32, 12), net(8, 20), delta=net(16, 20))


def test_optimizer_state_of_another_width_is_refused():
    def trained(width):
        m = prepared_mlp(width, 8)
        opt = mupp.SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, momentum=0.9)
        x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
        opt.step(lambda: torch.nn.functional.cross_entropy(m(x), y).backward())
        return opt

    small, big = trained(32), trained(64)
    with pytest.raises(ValueError, match="another width"):
        big.load_state_dict(small.state_dict())
    big.load_state_dict(trained(64).state_dict())  # the same width loads


# ------------------------------------------------------------------------------ sweeps


def test_an_incomplete_rerun_says_so_and_exits_nonzero(tmp_path, capsys):
    from mupp.lab import sweep
    from mupp.lab.storage import pop_lock, storage_url

    grid = {"lr": [0.05, 0.1], "rho": [0.0], "width": [32]}
    base = dict(dataset="synthetic", base_width=32, epochs=1)
    url = storage_url(tmp_path)
    (tmp_path).mkdir(exist_ok=True)
    sweep.prepare(url, grid, base)
    study = sweep._study(url, None, create=False)
    with pop_lock(url):
        trial = study.ask()  # a point "running elsewhere"
    argv = ["sweep", "--grid", "lr=0.05,0.1", "--grid", "rho=0.0", "--grid", "width=32"]
    argv += ["--set", 'dataset="synthetic"', "--set", "base_width=32", "--set", "epochs=1"]
    argv += ["--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 3
    out = capsys.readouterr().out
    assert "sweep incomplete: 1 of 2 grid points" in out and "about 10 s" in out
    assert main(argv + ["--allow-partial"]) == 0
    del trial


def test_a_different_configuration_names_what_differs(tmp_path, capsys):
    argv = ["sweep", "--grid", "lr=0.05", "--grid", "rho=0.0", "--grid", "width=32"]
    argv += ["--set", 'dataset="synthetic"', "--set", "base_width=32", "--out", str(tmp_path)]
    assert main(argv + ["--set", "epochs=1", "--no-progress"]) == 0
    capsys.readouterr()
    err = one_line_error(argv + ["--set", "epochs=2", "--no-progress"], capsys, "epochs: 1 -> 2")
    assert "another --out" in err


@pytest.mark.slow
def test_concurrent_first_starts_on_a_new_folder(tmp_path):
    cmd = [sys.executable, "-m", "mupp", "sweep", "--grid", "lr=0.05,0.1", "--grid", "rho=0.0"]
    cmd += ["--grid", "width=32", "--set", 'dataset="synthetic"', "--set", "base_width=32"]
    cmd += ["--set", "epochs=1", "--out", str(tmp_path), "--no-progress", "--allow-partial"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-2000:]
        assert b"IntegrityError" not in err
    assert main(["transfer", "--out", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            "[train]\nepochs = 1\n[trian]\nepochs = 2\n[grid]\nrho = [0.0]\n",
            "unknown table(s) ['trian']",
        ),
        (
            '[train]\nepochs = 1\n[grid]\nrho = [0.0]\n[sweeep]\norder = ["rho"]\n',
            "unknown table(s) ['sweeep']",
        ),
        ('[grid]\nrho = [0.0]\n[sweep]\nordr = ["rho"]\n', "[sweep] has unknown keys ['ordr']"),
        (
            '[grid]\nrho = [0.0]\n[sweep]\norder = ["nosuch", "rho"]\n',
            "[sweep] order names ['nosuch']",
        ),
    ],
)
def test_misspelled_config_tables_are_refused(tmp_path, capsys, text, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    one_line_error(["sweep", "--config", str(cfg), "--out", str(tmp_path / "s")], capsys, fragment)


def test_train_refuses_to_start_over_a_resumable_run_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--out", str(out), "--set", "train_subset=128"]) == 0
    capsys.readouterr()
    one_line_error(TRAIN + ["--out", str(out), "--set", "train_subset=128"], capsys,
                   "holds a run that can resume", "--resume", "--restart")  # fmt: skip
    assert main(TRAIN + ["--out", str(out), "--set", "train_subset=128", "--restart"]) == 0
