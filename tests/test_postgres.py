"""Two sweep workers against a real PostgreSQL server on loopback (skipped without one)."""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mupp.lab import sweep
from mupp.lab.storage import make_storage

pytestmark = pytest.mark.slow  # multi-process and subprocess runs

BINARIES = [shutil.which(b) for b in ("initdb", "pg_ctl")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL server on loopback that a test can stop and start again."""

    def __init__(self, root: Path, prefix: list[str], port: int):
        self.root, self.prefix, self.port = root, prefix, port
        self.datadir = root / "data"
        self.url = f"postgresql://mupp@127.0.0.1:{port}/postgres"  # the README's form

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root / 'sock'} -c listen_addresses=127.0.0.1"
        # -l: the server must not inherit our pipes (capturing them would wait for it to exit)
        log = str(self.root / "server.log")
        cmd = [BINARIES[1], "-D", str(self.datadir), "-l", log, "-o", opts, "-w", "start"]
        subprocess.run(
            self.prefix + cmd,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)

    def stop(self) -> None:
        cmd = [BINARIES[1], "-D", str(self.datadir), "-m", "fast", "-w", "stop"]
        subprocess.run(self.prefix + cmd, capture_output=True, timeout=60)


@pytest.fixture
def postgres_server():
    if not all(BINARIES):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip(
        "psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)"
    )
    # not under pytest's private tmp dir: the server's account must be able to reach it
    root = Path(tempfile.mkdtemp(prefix="mupp-pg-"))
    sockdir = root / "sock"
    sockdir.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: use the 'postgres' account
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chmod(root, 0o777)
        shutil.chown(sockdir, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(root, prefix, _free_port())
    subprocess.run(
        prefix + [BINARIES[0], "-D", str(server.datadir), "-A", "trust", "-U", "mupp"],
        check=True,
        capture_output=True,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    return postgres_server.url


def test_two_workers_on_postgresql(postgres_url, tmp_path):
    grid = {"lr": [0.05, 0.1], "rho": [0.0, 0.1], "width": [32]}
    base = dict(dataset="synthetic", base_width=32, epochs=1, batch_size=64)
    results = sweep.run_sweep(grid, base, tmp_path, storage=postgres_url, workers=2, progress=False)
    assert len(results) == 4 and len({r["point"] for r in results}) == 4


def test_readme_postgres_url_from_the_command_line(postgres_url, tmp_path, capsys):
    from mupp.lab.cli import main

    argv = ["sweep", "--grid", "lr=0.05", "--grid", "rho=0.0,0.1", "--grid", "width=32"]
    argv += ["--set", 'dataset="synthetic"', "--set", "base_width=32", "--set", "epochs=1"]
    argv += ["--storage", postgres_url, "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    assert "sweep finished: 2 of 2 grid points" in capsys.readouterr().out


def test_unreachable_postgres_server_is_one_clear_line(tmp_path, capsys):
    from mupp.lab.cli import main

    port = _free_port()  # nothing listens there
    argv = [
        "transfer",
        "--storage",
        f"postgresql://mupp@127.0.0.1:{port}/db",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mupp: error: --storage postgresql") and "cannot be opened" in err
    assert len(err.strip().splitlines()) == 1


def _sweep_command(url: str, out: Path, workers: int, epochs: int) -> list[str]:
    argv = [sys.executable, "-m", "mupp", "sweep", "--grid", "lr=0.05,0.1", "--grid"]
    argv += ["rho=0.0,0.1", "--grid", "width=32", "--set", 'dataset="synthetic"']
    argv += ["--set", "base_width=32", "--set", f"epochs={epochs}", "--set", "train_subset=2048"]
    argv += ["--storage", url, "--out", str(out), "--workers", str(workers), "--no-progress"]
    return argv


def _study(url: str):
    import optuna

    return optuna.load_study(study_name=sweep.STUDY_NAME, storage=make_storage(url))


def _wait_for_a_running_trial(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import optuna

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if _study(url).get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                return
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"no trial started: {proc.communicate()[1][-2000:]}")


def test_sweep_waits_out_a_database_server_restart(postgres_server, tmp_path):
    """The server goes away for 6 s while two workers train: both wait (no crash), the sweep
    finishes, and every point ran exactly once."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MUPP_STORAGE_RETRY="60")
    cmd = _sweep_command(postgres_server.url, tmp_path, workers=2, epochs=6)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_a_running_trial(postgres_server.url, proc)
        postgres_server.stop()
        time.sleep(6)
        postgres_server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "sweep finished: 4 of 4 grid points" in out
    import optuna

    done = _study(postgres_server.url).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.user_attrs["point"] for t in done) == sorted(
        {t.user_attrs["point"] for t in done}
    )
    assert len(done) == 4


def test_a_server_that_stays_away_ends_the_sweep_in_one_line(postgres_server, tmp_path):
    """Past --storage-retry the sweep exits 1 with one line per worker and a summary, no
    traceback; the rerun after the server is back finishes the grid."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _sweep_command(postgres_server.url, tmp_path, workers=2, epochs=6)
    cmd += ["--storage-retry", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_a_running_trial(postgres_server.url, proc)
        postgres_server.stop()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("mupp: error: ")
    assert any("stayed unreachable for 2 s" in line for line in lines), err
    postgres_server.start()
    # the workers could not mark their trials failed with the server away: reclaim them
    rerun = subprocess.run(
        cmd + ["--reclaim-running"], capture_output=True, text=True, env=env, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "sweep finished: 4 of 4 grid points" in rerun.stdout


def test_storage_retry_must_be_seconds(tmp_path, capsys, monkeypatch):
    from mupp.lab.cli import main

    argv = ["sweep", "--grid", "rho=0.0", "--set", 'dataset="synthetic"', "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(argv + ["--storage-retry", "soon"])
    assert (
        "--storage-retry: expected a number of seconds >= 0, like 60; got 'soon'"
        in capsys.readouterr().err
    )
    monkeypatch.setenv("MUPP_STORAGE_RETRY", "-1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "mupp: error: MUPP_STORAGE_RETRY: expected a number of seconds >= 0, like 60; got '-1'\n"
    )
