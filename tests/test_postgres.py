"""Two sweep workers against a real PostgreSQL server on loopback (skipped without one)."""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mupp.lab import sweep

BINARIES = [shutil.which(b) for b in ("initdb", "pg_ctl")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    if not all(BINARIES):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip(
        "psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)"
    )
    # not under pytest's private tmp dir: the server's account must be able to reach it
    root = Path(tempfile.mkdtemp(prefix="mupp-pg-"))
    datadir, sockdir = root / "data", root / "sock"
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
    port = _free_port()
    subprocess.run(
        prefix + [BINARIES[0], "-D", str(datadir), "-A", "trust", "-U", "mupp"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1"
    # -l: the server must not inherit our pipes (capturing them would wait for it to exit)
    start = [
        BINARIES[1],
        "-D",
        str(datadir),
        "-l",
        str(root / "server.log"),
        "-o",
        opts,
        "-w",
        "start",
    ]
    subprocess.run(
        prefix + start, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60
    )
    try:
        url = f"postgresql://mupp@127.0.0.1:{port}/postgres"  # the README's form
        deadline = time.time() + 20
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield url
    finally:
        subprocess.run(
            prefix + [BINARIES[1], "-D", str(datadir), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


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
