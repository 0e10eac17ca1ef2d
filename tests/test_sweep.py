"""Sweeps on Optuna storage: exactly-once with two workers, SIGKILL + resume, analysis, plots."""

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from mupp.lab import sweep
from mupp.lab.cli import main
from mupp.lab.grid import (
    grid_points,
    point_key,
)
from mupp.lab.storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, make_storage, pop_lock, storage_url

BASE = dict(dataset="synthetic", base_width=32, epochs=1, batch_size=64, model="mlp")


def completed(url):
    from optuna.trial import TrialState

    study = sweep._study(url, None, create=False)
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), study


@pytest.mark.slow
def test_two_workers_finish_a_grid_exactly_once(tmp_path):
    grid = {"lr": [0.05, 0.1], "rho": [0.0, 0.1], "width": [32, 64]}
    results = sweep.run_sweep(grid, BASE, tmp_path, workers=2, progress=False)
    assert len(results) == 8
    points = [r["point"] for r in results]
    assert len(set(points)) == 8
    assert {tuple(sorted(r["params"].items())) for r in results} == {
        tuple(sorted(p.items())) for p in grid_points(grid)
    }
    # running again finds nothing to do and duplicates nothing
    again = sweep.run_sweep(grid, BASE, tmp_path, workers=2, progress=False)
    assert len(again) == 8
    with pytest.raises(ValueError, match="different configuration or grid"):
        sweep.run_sweep({"lr": [0.3]}, BASE, tmp_path, progress=False)


def _slow_worker(url, out_dir):
    sweep.worker(url, out_dir, vectorize=False)  # one trial at a time, with checkpoints


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume_loses_and_duplicates_nothing(tmp_path):
    grid = {"lr": [0.05, 0.1], "width": [256], "rho": [0.1]}
    base = dict(BASE, epochs=40)
    url = storage_url(tmp_path)
    sweep.prepare(url, grid, base)
    proc = mp.get_context("spawn").Process(target=_slow_worker, args=(url, str(tmp_path)))
    proc.start()
    from optuna.trial import TrialState

    study = sweep._study(url, None, create=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and any(
            (tmp_path / "runs").glob("*/checkpoint.pt")
        ):
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    time.sleep(GRACE_PERIOD + 2)  # heartbeat goes stale
    counts = sweep.prepare(url, grid, base)
    assert counts["running"] == 0 and counts["enqueued"] >= 1
    # finish with short runs: same grid points, fewer epochs is a different config -> refuse
    with pytest.raises(ValueError, match="different configuration"):
        sweep.prepare(url, grid, dict(base, epochs=1))
    results = sweep.run_sweep(grid, base, tmp_path, workers=1, progress=False, vectorize=False)
    assert len(results) == 2 and len({r["point"] for r in results}) == 2
    fails = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert len(fails) == 1
    # the killed run resumed from its checkpoint instead of starting over
    killed_point = fails[0].user_attrs["point"]
    resumed = next(r for r in results if r["point"] == killed_point)
    assert len(resumed["result"]["history"]) == 40


def test_sweep_plot_transfer_cli(tmp_path, capsys):
    out = str(tmp_path)
    argv = ["sweep", "--grid", "lr=0.05,0.1", "--grid", "rho=0.0,0.1", "--grid", "width=32,64"]
    argv += [
        "--set",
        'dataset="synthetic"',
        "--set",
        "base_width=32",
        "--set",
        "epochs=1",
        "--out",
        out,
        "--no-progress",
    ]
    assert main(argv) == 0
    assert main(["plot", "--out", out]) == 0
    assert main(["transfer", "--out", out, "--json", str(tmp_path / "t.json")]) == 0
    text = capsys.readouterr().out
    assert "transfer regret" in text and (tmp_path / "sweep_heatmaps.png").exists()
    assert main(["sweep", "--preset", "nope"]) == 2
    assert main(["transfer", "--out", str(tmp_path / "nothing-here")]) == 2
    # --seeds keeps only those seeds (the grid here has seed 0 only)
    assert main(["transfer", "--out", out, "--seeds", "0"]) == 0
    assert "lr 0.05" not in capsys.readouterr().out
    assert main(["transfer", "--out", out, "--by-lr"]) == 0
    by_lr = capsys.readouterr().out
    assert "lr 0.05" in by_lr and "lr 0.1" in by_lr
    assert main(["transfer", "--out", out, "--seeds", "5"]) == 2
    assert "no finished runs with these seeds" in capsys.readouterr().err
    assert main(["transfer", "--out", out, "--lrs", "0.1", "--json", str(tmp_path / "l.json")]) == 0
    # a storage read from elsewhere draws into a folder that does not exist yet
    url = storage_url(out)
    figs, js = tmp_path / "new" / "figs", tmp_path / "new2" / "t.json"
    assert main(["plot", "--storage", url, "--out", str(figs)]) == 0
    assert (figs / "sweep_heatmaps.png").exists()
    assert main(["transfer", "--storage", url, "--json", str(js)]) == 0 and js.exists()
    only = json.loads((tmp_path / "l.json").read_text())["parameterizations"]["mupp"]
    assert {o["lr"] for o in only["optimum"].values()} == {0.1}
    assert main(["transfer", "--out", out, "--rhos", "0.1", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["rho_grid"] == [0.1]  # the sweep's grid is 0, 0.1
    assert main(["transfer", "--out", out, "--widths", "64", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["parameterizations"]["mupp"]["widths"] == [64]
    assert main(["transfer", "--out", out, "--rhos", "0.7"]) == 2
    assert "--rhos 0.7: no finished runs with these rhos" in capsys.readouterr().err
    assert main(["transfer", "--out", out, "--versus", "mupp"]) == 0  # no other setting to pair
    assert main(["transfer", "--out", out, "--versus", "sp"]) == 2
    assert "versus='sp': no such setting among the runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["transfer", "--out", out, "--rhos", "0,big"])
    assert "expected rho values like 0,0.1; got '0,big'" in capsys.readouterr().err
    assert main(["transfer", "--out", out, "--lrs", "0.3"]) == 2
    assert "--lrs 0.3: no finished runs with these lrs" in capsys.readouterr().err
    assert main(["sweep", "--grid", "lr=0.1", "--set", "lerning_rate=1", "--out", out]) == 2
    # --also: a companion sweep's setting joins the analysis; a sweep's own runs count once
    dp = str(tmp_path / "dp")
    companion = ["sweep", "--grid", "setting=mupp/sam/DP", "--grid", "lr=0.05", "--grid"]
    companion += ["rho=0.0,0.1", "--grid", "width=32,64", *argv[7:-3], "--out", dp, "--no-progress"]
    assert main(companion) == 0
    both, alone, twice = (tmp_path / f"{n}.json" for n in ("both", "alone", "twice"))
    assert main(["transfer", "--out", out, "--also", dp, "--json", str(both)]) == 0
    assert set(json.loads(both.read_text())["parameterizations"]) == {"mupp", "mupp/sam/DP"}
    assert main(["transfer", "--out", out, "--json", str(alone)]) == 0
    assert main(["transfer", "--out", out, "--also", out, "--json", str(twice)]) == 0
    assert json.loads(twice.read_text()) == json.loads(alone.read_text())
    assert main(["plot", "--out", out, "--also", dp]) == 0


def test_journal_storage(tmp_path):
    grid = {"lr": [0.05], "rho": [0.0, 0.1], "width": [32]}
    url = f"journal:{tmp_path / 'journal.log'}"
    res = sweep.run_sweep(grid, BASE, tmp_path, storage=url, progress=False)
    assert len(res) == 2


def test_vectorized_sweep_matches_one_by_one(tmp_path):
    grid = {"lr": [0.05, 0.1], "rho": [0.0, 0.1], "width": [32, 64]}
    base = dict(BASE, epochs=2, momentum=0.5)
    vec = sweep.run_sweep(grid, base, tmp_path / "vec", progress=False, vectorize=True)
    seq = sweep.run_sweep(grid, base, tmp_path / "seq", progress=False)  # CPU: one by one
    url = storage_url(tmp_path / "vec")
    trials, _ = completed(url)
    assert all(t.user_attrs["vectorized"] for t in trials)  # two groups of four
    by_point = {r["point"]: r["result"] for r in seq}
    assert len(vec) == 8
    for r in vec:
        s = by_point[r["point"]]
        assert r["result"]["diverged"] == s["diverged"]
        if s["diverged"]:  # blown-up runs amplify summation order; compare stable ones
            continue
        for a, b in zip(r["result"]["history"], s["history"]):
            assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3, abs=1e-4)


def _pop_all(url, out_path, use_lock):
    import contextlib

    storage = make_storage(url)
    study = sweep._study(url, None, create=False, storage=storage)
    grid = study.user_attrs["grid"]
    lock = pop_lock(url) if use_lock else contextlib.nullcontext()
    got = []
    while (popped := sweep._pop(study, storage, grid, lock)) is not None:
        got.append(popped[0].number)
    Path(out_path).write_text(json.dumps(got))


def _race_pops(tmp_path, use_lock, procs=4, points=48):
    url = storage_url(tmp_path)
    sweep.prepare(url, {"lr": [0.01 * (i + 1) for i in range(points)]}, BASE)
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"popped{i}.json" for i in range(procs)]
    ps = [ctx.Process(target=_pop_all, args=(url, str(o), use_lock)) for o in outs]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    assert [p.exitcode for p in ps] == [0] * procs
    return [n for o in outs for n in json.loads(o.read_text())]


def test_concurrent_pops_on_sqlite_never_hand_out_a_trial_twice(tmp_path):
    # SQLite ignores SELECT ... FOR UPDATE: without pop_lock, processes racing on the queue can
    # move the same WAITING trial to RUNNING (optuna/optuna#4002; this broke a CI run of ours)
    popped = _race_pops(tmp_path, use_lock=True)
    assert sorted(popped) == list(range(48))


def test_a_result_for_a_trial_failed_elsewhere_warns_and_is_not_counted(tmp_path):
    from optuna.trial import TrialState

    url = storage_url(tmp_path)
    sweep.prepare(url, {"lr": [0.05]}, BASE)
    storage = make_storage(url)
    study = sweep._study(url, None, create=False, storage=storage)
    trial, params = sweep._pop(study, storage, study.user_attrs["grid"], pop_lock(url))
    assert params == {"lr": 0.05}
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # reclaimed as stale
    result = {"best_test_acc": 0.5, "diverged": False, "history": [{"epoch": 1, "test_acc": 0.5}]}
    with pytest.warns(RuntimeWarning, match="finished by another process"):
        assert sweep._record(study, trial, result, vectorized=False) is False
    assert storage.get_trial(trial._trial_id).state == TrialState.FAIL


def test_a_point_queued_again_keeps_its_place_in_grid_order(tmp_path):
    # a killed worker's point is queued again on resume: it must run before the points that
    # come after it in the grid, not after the whole remaining queue
    from optuna.trial import TrialState

    url = storage_url(tmp_path)
    grid = {"lr": [0.05, 0.1, 0.2]}
    sweep.prepare(url, grid, BASE)
    storage = make_storage(url)
    study = sweep._study(url, None, create=False, storage=storage)
    lock = pop_lock(url)
    trial, params = sweep._pop(study, storage, grid, lock)
    assert params == {"lr": 0.05}
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # the worker died
    counts = sweep.prepare(url, grid, BASE)
    assert (counts["enqueued"], counts["waiting"], counts["done"]) == (1, 3, 0)
    order = []
    while (popped := sweep._pop(study, storage, grid, lock)) is not None:
        order.append(popped[1]["lr"])
    assert order == [0.05, 0.1, 0.2]


def test_a_new_queue_order_takes_effect_on_resume(tmp_path):
    grid = {"lr": [0.05, 0.1], "seed": [0, 1]}
    url = storage_url(tmp_path)
    sweep.prepare(url, grid, BASE, order=["lr", "seed"])
    counts = sweep.prepare(url, grid, BASE, order=["seed", "lr"])
    assert (counts["enqueued"], counts["waiting"]) == (0, 4)
    storage = make_storage(url)
    study = sweep._study(url, None, create=False, storage=storage)
    lock = pop_lock(url)
    order = []
    while (popped := sweep._pop(study, storage, grid, lock)) is not None:
        order.append((popped[1]["seed"], popped[1]["lr"]))
    assert order == [(0, 0.05), (0, 0.1), (1, 0.05), (1, 0.1)]


def test_optuna_dashboard_shows_a_sweep_with_its_parameters_objective_and_curves(tmp_path):
    """``optuna-dashboard sqlite:///OUT/sweep.db`` is how to watch a sweep (docs/sweeps.md):
    its own WSGI app, asked as the browser asks it."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    records = sweep.run_sweep(
        {"lr": [0.05, 0.1]}, {**BASE, "epochs": 2}, tmp_path, workers=1, progress=False
    )
    app = optuna_dashboard.wsgi(make_storage(storage_url(tmp_path), read_only=True))

    def get(path):
        environ, status = {}, []
        setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        assert status == ["200 OK"], (path, status, body[:300])
        return json.loads(body)

    (summary,) = get("/api/studies")["study_summaries"]
    assert (summary["study_name"], summary["directions"]) == ("mupp-sweep", ["maximize"])
    study = get(f"/api/studies/{summary['study_id']}")
    shown = {
        t["params"][0]["param_external_value"]: (t["values"][0], len(t["intermediate_values"]))
        for t in study["trials"]
        if t["state"] == "Complete"
    }
    assert [p["name"] for t in study["trials"] for p in t["params"]] == ["lr", "lr"]
    best = {r["params"]["lr"]: r["result"]["best_test_acc"] for r in records}
    assert shown == {"0.05": (pytest.approx(best[0.05]), 2), "0.1": (pytest.approx(best[0.1]), 2)}


def _queue(url, grid):
    storage = make_storage(url)
    study = sweep._study(url, None, create=False, storage=storage)
    lock, popped = pop_lock(url), []
    while (nxt := sweep._pop(study, storage, grid, lock)) is not None:
        popped.append((nxt[1]["seed"], nxt[1]["lr"]))
    return popped


def test_a_slice_queues_first_and_a_run_without_it_queues_the_rest(tmp_path):
    grid = {"lr": [0.05, 0.1], "seed": [0, 1, 2]}
    url = storage_url(tmp_path)
    counts = sweep.prepare(url, grid, BASE, order=["seed", "lr"], only={"seed": [1]})
    assert (counts["enqueued"], counts["waiting"]) == (2, 2)
    assert _queue(url, grid) == [(1, 0.05), (1, 0.1)]
    counts = sweep.prepare(url, grid, BASE, order=["seed", "lr"])  # the grid stored is whole
    assert counts["waiting"] == 4
    assert _queue(url, grid) == [(0, 0.05), (0, 0.1), (2, 0.05), (2, 0.1)]


def test_sweep_only_trains_its_slice_and_exits_0_when_the_slice_is_done(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["sweep", "--set", "dataset=synthetic", "--set", "epochs=1", "--set", "base_width=32"]
    argv += ["--grid", "seed=0,1", "--grid", "lr=0.05", "--out", str(out), "--no-progress"]
    argv += ["--workers", "1"]
    assert main(argv + ["--only", "seed=1"]) == 0
    printed = capsys.readouterr().out
    assert (
        "sweep: the --only slice holds 1 of 2 grid points: 0 done, 1 queued (1 newly), 0 running "
        "elsewhere; outside it 0 done, 1 left for later;"
    ) in printed
    assert "sweep finished: 1 of 1 points of the --only slice" in printed
    records = sweep.load_results(storage_url(out))
    assert [r["params"]["seed"] for r in records] == [1]
    assert main(argv + ["--only", "seed=1"]) == 0  # the slice again: done, counted as such
    assert "holds 1 of 2 grid points: 1 done, 0 queued" in capsys.readouterr().out
    assert main(argv) == 0
    assert "sweep: 2 grid points, 1 done, 1 queued (1 newly)" in capsys.readouterr().out
    assert sorted(r["params"]["seed"] for r in sweep.load_results(storage_url(out))) == [0, 1]


@pytest.mark.parametrize(
    "only,message",
    [
        ("sed=1", "--only sed: not an axis of the grid (axes: ['lr', 'seed'])"),
        ("seed=7", "--only seed: [7] not among the grid's values [0, 1]"),
        ("seed", "--only expects KEY=V1,V2,...; got 'seed'"),
    ],
)
def test_a_bad_slice_is_refused_before_any_storage_is_made(tmp_path, capsys, only, message):
    argv = ["sweep", "--set", "dataset=synthetic", "--grid", "seed=0,1", "--grid", "lr=0.05"]
    assert main(argv + ["--out", str(tmp_path / "s"), "--only", only]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", __import__("mupp.lab.config", fromlist=["x"]).preset_names())
def test_every_shipped_preset_validates_and_orders_its_whole_grid(name):
    """A preset with a typo (an unknown key, an axis missing from its queue order) fails here,
    not hours into a user's sweep: every grid point must make a valid TrainConfig."""
    import argparse

    from mupp.lab.commands import _sweep_spec
    from mupp.lab.config import load_preset

    args = argparse.Namespace(preset=name, config=None, data_dir=None, set=None, grid=None)
    base, grid, order = _sweep_spec(args)
    points = grid_points(grid, order)
    n = 1
    for values in grid.values():
        n *= len(values)
    assert len(points) == n and len({point_key(p) for p in points}) == n
    declared = load_preset(name).get("sweep", {}).get("order")
    if declared is not None:  # the declared order names every axis, slowest first
        assert sorted(declared) == sorted(grid)
        first = points[0][declared[0]], points[-1][declared[0]]
        assert first == (grid[declared[0]][0], grid[declared[0]][-1])


def test_workers_are_capped_at_the_queued_points_and_warned_above_the_cores(capsys):
    from mupp.lab.sweep import _worker_count

    assert _worker_count(2, 5) == 2
    assert _worker_count(2, 1) == 1
    with pytest.warns(UserWarning, match="exceeds the .* CPU cores"):
        assert _worker_count(64, 4) == 4
    assert "64 workers asked for 4 queued point(s): starting 4" in capsys.readouterr().out
    assert _worker_count(3, 0) == 1  # nothing queued: one worker waits for the others


def test_a_trial_popped_without_a_heartbeat_is_reclaimed(tmp_path, monkeypatch):
    """A worker killed between study.ask() and its first heartbeat leaves a RUNNING trial
    that Optuna never finds stale; prepare fails it after POP_GRACE and queues its point."""
    from optuna.trial import TrialState

    grid = {"lr": [0.05, 0.1], "width": [256], "rho": [0.1]}
    url = storage_url(tmp_path)
    sweep.prepare(url, grid, BASE)
    study = sweep._study(url, None, create=False)
    stranded = study.ask()  # popped, as a worker does, and never beaten: the kill window
    popped = sweep._pop(study, make_storage(url), grid, pop_lock(url))
    assert popped is not None and popped[0].user_attrs[sweep.BEATING]  # a live worker's
    counts = sweep.prepare(url, grid, BASE)  # too young to judge: still running
    assert counts["running"] == 2
    monkeypatch.setattr(sweep, "POP_GRACE", 0.0)
    counts = sweep.prepare(url, grid, BASE)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[stranded.number] == TrialState.FAIL
    assert counts["running"] == 1  # the beaten trial is Optuna's to judge, by its heartbeat
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1  # the stranded trial's point is queued again


def _sweep_parent(out_dir):
    base = dict(BASE, epochs=60)
    grid = {"lr": [0.05, 0.1, 0.2, 0.4], "width": [256], "rho": [0.1]}
    sweep.run_sweep(grid, base, out_dir, workers=2, progress=False, vectorize=False)


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.slow
def test_workers_stop_when_the_parent_alone_is_terminated(tmp_path):
    """SIGTERM to the sweep's parent only (docker stop, Kubernetes): its workers stop too,
    instead of training on as orphans, and their trials are queued again on the next run."""
    from optuna.trial import TrialState

    parent = mp.get_context("spawn").Process(target=_sweep_parent, args=(str(tmp_path),))
    parent.start()
    url = storage_url(tmp_path)
    deadline = time.time() + 120
    workers, running = [], []
    while time.time() < deadline and (len(workers) < 2 or len(running) < 2):
        time.sleep(0.5)
        workers = _children(parent.pid)
        if (tmp_path / "sweep.db").exists():
            study = sweep._study(url, None, create=False)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(workers) >= 2 and len(running) == 2
    os.kill(parent.pid, signal.SIGTERM)
    parent.join(30)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)
    time.sleep(GRACE_PERIOD + HEARTBEAT_INTERVAL + 1)  # their heartbeats go stale
    grid = {"lr": [0.05, 0.1, 0.2, 0.4], "width": [256], "rho": [0.1]}
    counts = sweep.prepare(url, grid, dict(BASE, epochs=60))
    assert counts["running"] == 0 and counts["done"] + counts["waiting"] == 4


def test_queries_read_an_archived_sweep_without_the_lock_file(tmp_path, monkeypatch):
    """mupp transfer/plot on a read-only mount: the pop-lock file cannot be created there."""
    grid = {"lr": [0.05, 0.1], "width": [64], "rho": [0.1]}
    sweep.run_sweep(grid, BASE, tmp_path, workers=1, progress=False)

    def read_only_mount(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "sweep.db.pop.lock"))

    monkeypatch.setattr("mupp.lab.storage.FileLock", read_only_mount)
    assert len(sweep.load_results(storage_url(tmp_path))) == 2
    assert main(["transfer", "--out", str(tmp_path)]) == 0


def test_a_damaged_sweep_db_says_how_to_rebuild_it_from_runs(tmp_path, monkeypatch, capsys):
    grid = {"lr": [0.05, 0.1], "width": [64], "rho": [0.1]}
    sweep.run_sweep(grid, BASE, tmp_path, workers=1, progress=False)
    db = tmp_path / "sweep.db"
    with open(db, "r+b") as f:  # zeroed pages, as a torn write or a bad disk leaves them
        f.seek(4096)
        f.write(b"\0" * 8192)
    assert main(["transfer", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "rebuilt from the records in runs/" in err
    with pytest.raises(ValueError, match="move it aside and rerun the same `mupp sweep`"):
        sweep.run_sweep(grid, BASE, tmp_path, workers=1, progress=False)
    # what the message promises: a new database refills from runs/ without training again
    db.rename(tmp_path / "sweep.db.damaged")

    def no_training(*a, **k):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(sweep, "train", no_training)
    assert len(sweep.run_sweep(grid, BASE, tmp_path, workers=1, progress=False)) == 2


@pytest.mark.parametrize(
    "kw", [dict(workers=0), dict(storage="nosuchdriver://x"), dict(storage="postgresql://u@/")]
)
def test_a_rejected_sweep_leaves_no_empty_out(tmp_path, kw):
    out = tmp_path / "new" / "sweep"
    with pytest.raises(ValueError):
        sweep.run_sweep({"lr": [0.1]}, BASE, out, progress=False, **kw)
    assert not out.exists()


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device", "runs/x/checkpoint.pt.tmp"),
        ValueError("--storage sqlite:///x: the database cannot be opened"),
    ],
)
def test_a_worker_that_fails_prints_one_line_and_exits_1(monkeypatch, capsys, error):
    """A full disk or an unreadable storage inside a worker process: one line naming the
    worker, exit status 1 (the parent then says how many failed), no traceback."""
    import torch

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(sweep, "worker", failing)
    monkeypatch.setattr(sweep, "_stop_with_parent", lambda: None)
    with pytest.raises(SystemExit) as stopped:
        sweep._worker_entry("sqlite:///x.db", "out", torch.get_num_threads(), None, False)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("mupp sweep worker ") and str(error) in err
    assert len(err.strip().splitlines()) == 1


def test_a_finished_equivalent_run_is_reused_not_retrained(tmp_path, monkeypatch):
    """A point equivalent to a finished one (here: μP-global SGD after μP² SGD, recorded by
    an older mupp without a newer option) takes the finished record: nothing trains."""
    from types import SimpleNamespace

    from mupp.lab import sweep
    from mupp.lab.config import TrainConfig

    base = dict(dataset="synthetic", width=32, base_width=16, epochs=1, rho=0.0)
    stored = TrainConfig.from_dict({**base, "parameterization": "mupp"}).to_dict()
    del stored["last_layer_fast"]  # a record written before that option existed
    record = {"config": stored, "best_test_acc": 0.5, "diverged": False}
    trial = SimpleNamespace(user_attrs={"result": record})
    study = SimpleNamespace(get_trials=lambda deepcopy, states: [trial])
    monkeypatch.setattr(sweep, "train", lambda *a, **k: pytest.fail("trained again"))
    got = sweep._train_shared(
        TrainConfig.from_dict({**base, "parameterization": "mup-global"}),
        tmp_path,
        False,
        study=study,
    )
    assert got is record
