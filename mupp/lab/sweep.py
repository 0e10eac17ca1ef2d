"""Grid sweeps on Optuna storage (``mupp sweep``): SQLite, any SQLAlchemy URL, or a journal file.

How a sweep stays exact:

- the study is created with a :class:`optuna.samplers.GridSampler` over the grid, and every
  grid point that has no finished result is *enqueued* once by :func:`prepare` (run before any
  worker starts, and again on resume);
- workers only pop enqueued trials, so two workers never run the same point.  PostgreSQL and
  MySQL make the pop atomic with ``SELECT ... FOR UPDATE``; SQLite ignores that clause, so two
  processes could both move the same WAITING trial to RUNNING (optuna/optuna#4002): on SQLite
  the pop also holds a file lock beside the database (:func:`pop_lock`).  A popped trial sends
  heartbeats while it trains;
- a worker killed mid-trial leaves a RUNNING trial whose heartbeat stops; :func:`prepare` on
  resume marks it failed (Optuna's ``fail_stale_trials``) and enqueues its point again, and the
  run itself resumes from its last epoch checkpoint;
- finished results are COMPLETE trials with the whole result record in their user attributes:
  never lost, never duplicated.  Diverged runs are COMPLETE with ``diverged = True``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm

from . import vectorized
from .checkpoint import RECORD_FILE
from .config import TrainConfig, differing_keys, with_defaults
from .grid import canonical, grid_points, in_slice, point_key, resolve, run_key
from .storage import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    StorageUnreachable,
    damaged_storage,
    heartbeats,
    make_storage,
    pop_lock,
    redact_url,
    storage_url,
)
from .train import Preempted, train

# a RUNNING trial that never got its first heartbeat (its worker died between study.ask() and
# it) is stale once it is this old: Optuna only judges trials that have a heartbeat
POP_GRACE = 60.0
BEATING = "heartbeat"  # the trial's user attribute set after its first heartbeat
STUDY_NAME = "mupp-sweep"


class SweepFailed(RuntimeError):
    """A sweep that cannot go on now but resumes when rerun (a worker died): the CLI prints
    its one line and exits 1, as for :class:`~mupp.lab.storage.StorageUnreachable`."""


def _study(url: str, grid: Mapping[str, Sequence[Any]] | None, create: bool, storage=None):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = storage if storage is not None else make_storage(url)
    sampler = optuna.samplers.GridSampler(dict(grid), seed=0) if grid else None
    if create:
        # two `mupp sweep` started together on a new SQLite file would both create the tables
        with pop_lock(url):
            return optuna.create_study(
                study_name=STUDY_NAME,
                storage=storage,
                sampler=sampler,
                direction="maximize",
                load_if_exists=True,
            )
    return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)


def prepare(
    url: str,
    grid: Mapping[str, Sequence[Any]],
    base_config: Mapping[str, Any],
    reclaim_running: bool = False,
    order: Sequence[str] | None = None,
    only: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, int]:
    """Create or load the study, fail stale trials, enqueue every grid point without a result,
    in grid order (``order``: :func:`grid_points`): a failed point queued again keeps its
    place, and a changed ``order`` re-orders the queue.  ``only`` (:func:`~.grid.in_slice`)
    queues a slice of the grid first; the stored grid stays whole, and a later call without
    it queues the rest.

    Stale trials are found by heartbeat (RDB storages).  ``reclaim_running`` fails every RUNNING
    trial: use it on resume when no other worker is alive, and with journal storage, which
    has no heartbeat.

    Returns counts: ``grid`` (its points), ``done`` (in the slice), ``done_outside`` (done
    outside it), ``running``, ``enqueued`` (newly), ``waiting`` (total).
    """
    study = _study(url, grid, create=True)
    stored = study.user_attrs.get("base_config")
    new_grid = {k: list(v) for k, v in grid.items()}
    if stored is None:
        study.set_user_attr("base_config", dict(base_config))
        study.set_user_attr("grid", new_grid)
    elif stored != dict(base_config) or study.user_attrs.get("grid") != new_grid:
        raise ValueError(
            "this output directory/storage holds a sweep with a different configuration or "
            "grid: "
            + config_diff(
                {**stored, **_prefixed(study.user_attrs.get("grid", {}))},
                {**dict(base_config), **_prefixed(new_grid)},
            )
            + ". Rerun with the stored settings to resume, or use another --out/--storage for "
            "the new sweep (finished results stay where they are)"
        )
    optuna.storages.fail_stale_trials(study)
    _fail_unbeaten(study)
    if reclaim_running:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            _fail_running(study, t)
    lock = pop_lock(url)
    locked = not isinstance(lock, contextlib.nullcontext)  # a file lock serializes the pops
    with lock:  # no worker pops while the queue is read and rebuilt
        done, running_keys, waiting = set(), set(), []
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.COMPLETE:
                done.add(_trial_point(t))
            elif t.state == TrialState.RUNNING:
                running_keys.add(_trial_point(t))
            elif t.state == TrialState.WAITING:
                waiting.append(t)
        taken = done | running_keys
        points = grid_points(grid, order)
        in_view = {point_key(p): p for p in points if in_slice(p, only)}  # in grid order
        queue = [(k, p) for k, p in in_view.items() if k not in taken]
        queued = [_trial_point(t) for t in sorted(waiting, key=lambda t: t.number)]
        missing = {k for k, _ in queue} - set(queued)
        # the queue runs in grid order: a point that failed (a killed worker's) goes back to
        # its place instead of after everything queued, and a changed ``order`` takes effect;
        # superseded entries are marked PRUNED, as _pop marks an entry another worker emptied.
        # Without a file lock (server storages) only while no other worker runs: one could pop
        # between this scan and the rebuild.
        if queued != [k for k, _ in queue] and (locked or not running_keys):
            for t in waiting:
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.PRUNED)
        else:
            queue = [(k, p) for k, p in queue if k in missing]
        for key, params in queue:
            study.enqueue_trial(params, user_attrs={"point": key})
    enqueued = len(missing)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    return {
        "grid": len(points),
        "done": len(done & in_view.keys()),
        "done_outside": len(done - in_view.keys()),
        "running": running,
        "enqueued": enqueued,
        "waiting": waiting,
    }


def _trial_point(trial) -> str | None:
    """The grid point a trial holds (its ``point`` attribute, or the key of its enqueued
    parameters)."""
    key = trial.user_attrs.get("point") or trial.system_attrs.get("point")
    if key is None and "fixed_params" in trial.system_attrs:
        key = point_key(trial.system_attrs["fixed_params"])
    return key


def _prefixed(grid: Mapping[str, Any]) -> dict[str, Any]:
    return {f"grid.{k}": v for k, v in grid.items()}


def config_diff(stored: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``key: stored -> new`` for every key whose value differs."""
    parts = [
        f"{k}: {stored.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
        for k in differing_keys(stored, new)
    ]
    return "; ".join(parts) or "(no difference)"


def _fail_unbeaten(study) -> None:
    """Fail the RUNNING trials older than :data:`POP_GRACE` that never had a heartbeat (their
    worker died right after popping them: Ctrl-C or kill -9 between ``study.ask()`` and the
    first beat), so that :func:`prepare` queues their points again; Optuna's own stale check
    only sees trials with a heartbeat."""
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start
        if BEATING in t.user_attrs or started is None:
            continue
        if (now - started).total_seconds() >= POP_GRACE:
            _fail_running(study, t)


def _fail_running(study, trial) -> None:
    """Mark a RUNNING trial failed (its point is queued again), unless it finished meanwhile."""
    try:
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _pop(study, storage, grid, lock) -> tuple[Any, dict[str, Any]] | None:
    """Pop one enqueued trial under ``lock`` (:func:`pop_lock`); ``None`` when the queue is
    empty.  Its first heartbeat is recorded at once, and marked (:data:`BEATING`): a trial
    popped by a worker that dies before that is failed by :func:`_fail_unbeaten`."""
    with lock:
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        with warnings.catch_warnings():  # we send the heartbeats ourselves
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        if hasattr(storage, "record_heartbeat") and getattr(storage, "heartbeat_interval", None):
            storage.record_heartbeat(trial._trial_id)
            trial.set_user_attr(BEATING, True)
    fixed = storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
    if fixed is None:
        # another worker took the last queued point between our check and ask()
        study.tell(trial, state=TrialState.PRUNED)
        return None
    params = dict(fixed)
    for k in params:
        trial.suggest_categorical(k, grid[k])  # returns the enqueued value
    trial.set_user_attr("point", point_key(params))
    return trial, params


def _pop_group(study, storage, grid, lock, base, first, limit: int):
    """Pop trials after ``first`` while they can train with it as one vectorized group (same
    :func:`mupp.lab.vectorized.group_key`), up to ``limit``.  Returns ``(group, carry)``:
    ``carry`` is a popped trial of another group (it opens the next one) or ``None``."""
    popped = [first]
    key = vectorized.group_key(resolve(base, first[1]))
    while len(popped) < limit:
        nxt = _pop(study, storage, grid, lock)
        if nxt is None:
            return popped, None
        if vectorized.group_key(resolve(base, nxt[1])) != key:
            return popped, nxt  # queue order keeps lr/rho together: this one opens the next group
        popped.append(nxt)
    return popped, None


def _train_popped(
    cfgs: list[TrainConfig], out_dir: str, progress: bool, keep_checkpoints: bool, study
) -> list[dict[str, Any]]:
    """Results of the popped configurations: one vectorized group when there are several
    (:func:`_pop_group` only groups compatible ones), else one resumable run."""
    if len(cfgs) > 1:
        return vectorized.train_group(cfgs)
    runs = Path(out_dir) / "runs"
    return [_train_shared(c, runs, progress, keep_checkpoints, study) for c in cfgs]


def worker(
    url: str,
    out_dir: str,
    progress: bool = False,
    max_trials: int | None = None,
    vectorize: bool | None = None,
    group_size: int = 25,
    keep_checkpoints: bool = False,
) -> int:
    """Pop enqueued trials until none is left; returns how many this worker finished.

    A finished run keeps its record (``result.json``) and, only with ``keep_checkpoints``,
    its weights; an interrupted one keeps its checkpoint and resumes from it.

    With ``vectorize``, up to ``group_size`` popped trials that differ only in ``lr``/``rho``
    (and that :mod:`mupp.lab.vectorized` supports) train together; the others run one by one,
    resuming from their checkpoints.  ``None`` (default) vectorizes on CUDA only: on CPU,
    ``benchmarks/sweep_throughput.py`` measured no gain (docs/performance.md).
    """
    # the raw storage (heartbeats go to it directly), of a server prepare() has reached
    storage = make_storage(url, reached=True)
    study = _study(url, None, create=False, storage=storage)
    lock = pop_lock(url)
    base = dict(study.user_attrs["base_config"])
    grid = study.user_attrs["grid"]
    finished = 0
    carry = None  # a popped trial that starts the next group
    while max_trials is None or finished < max_trials:
        first = carry if carry is not None else _pop(study, storage, grid, lock)
        carry = None
        if first is None:
            break
        popped = [first]
        cfg0 = resolve(base, first[1])
        auto = cfg0.device.startswith("cuda")
        if (auto if vectorize is None else vectorize) and vectorized.supports(cfg0):
            limit = group_size if max_trials is None else min(group_size, max_trials - finished)
            popped, carry = _pop_group(study, storage, grid, lock, base, first, limit)
        cfgs = [resolve(base, params) for _, params in popped]
        try:
            with heartbeats(storage, [t._trial_id for t, _ in popped]):
                results = _train_popped(cfgs, out_dir, progress, keep_checkpoints, study)
        except BaseException:
            for t, _ in popped + ([carry] if carry is not None else []):
                study.tell(t, state=TrialState.FAIL)
            raise
        for (trial, _), result in zip(popped, results):
            if _record(study, trial, result, vectorized=len(popped) > 1):
                finished += 1
    return finished


def _train_shared(
    config: TrainConfig,
    runs_dir: Path,
    progress: bool,
    keep_checkpoints: bool = False,
    study=None,
) -> dict[str, Any]:
    """Train the canonical form of ``config`` (:func:`canonical_config`) in its run directory,
    or reuse the record of an equivalent grid point that already finished it: in the study
    (finished trials carry their records) or in the run directory."""
    cfg = canonical(config)
    want = cfg.to_dict()

    def same_run(result: dict | None) -> bool:
        return result is not None and with_defaults(result.get("config", {})) == want

    if study is not None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if same_run(t.user_attrs.get("result")):
                return t.user_attrs["result"]
    run_dir = runs_dir / run_key(want)
    done = run_dir / RECORD_FILE
    if done.is_file():
        try:
            result = json.loads(done.read_text())
        except ValueError:
            result = None  # a torn write: train again (resuming from the checkpoint)
        if same_run(result):
            return result
    return train(
        cfg, run_dir, resume=True, progress=progress, log=None, keep_checkpoint=keep_checkpoints
    )


def _record(study, trial, result: dict[str, Any], vectorized: bool) -> bool:
    """Store a finished run on its trial; ``False`` when the trial was finished elsewhere.

    That happens when :func:`prepare` (another ``mupp sweep`` started with ``--reclaim-running``,
    or a heartbeat that stalled past the grace period) failed this trial as stale and queued its
    point again: the re-queued trial resumes from the run's checkpoint, so nothing is lost.
    Each epoch's test accuracy becomes an intermediate value: optuna-dashboard draws the runs'
    learning curves from them.
    """
    try:
        for h in result["history"]:
            if math.isfinite(h["test_acc"]):
                trial.report(h["test_acc"], h["epoch"])
        trial.set_user_attr("result", result)
        trial.set_user_attr("diverged", result["diverged"])
        trial.set_user_attr("vectorized", vectorized)
        study.tell(trial, result["best_test_acc"])
    except optuna.exceptions.UpdateFinishedTrialError:
        warnings.warn(
            f"trial {trial.number} was finished by another process (failed as stale); its point "
            "was queued again and will resume from its checkpoint",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _worker_entry(
    url: str, out_dir: str, threads: int, vectorize: bool | None, keep_checkpoints: bool
) -> None:
    warnings.filterwarnings("ignore", module="optuna")
    torch.set_num_threads(threads)
    _stop_with_parent()
    try:
        worker(url, out_dir, vectorize=vectorize, keep_checkpoints=keep_checkpoints)
    except Preempted as stopped:  # run checkpointed, trial re-queued: exit as the signal would
        sys.exit(128 + stopped.signum)
    # one line each (a full disk, a read-only mount, the server away); the parent sums up
    except (SweepFailed, StorageUnreachable, ValueError, OSError) as e:
        print(f"mupp sweep worker {os.getpid()}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _stop_with_parent(poll: float = 1.0) -> None:
    """End this worker process when its parent ends (``docker stop`` and Kubernetes send
    SIGTERM to the sweep's parent alone): a daemon thread polls the parent's pid and sends
    this process SIGTERM, which stops it at once.  Its trial keeps a heartbeat that goes
    stale, so the next ``mupp sweep`` queues the point again."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="mupp-parent-watch").start()


def run_sweep(
    grid: Mapping[str, Sequence[Any]],
    base_config: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    storage: str | None = None,
    workers: int = 1,
    progress: bool = True,
    reclaim_running: bool = False,
    vectorize: bool | None = None,
    order: Sequence[str] | None = None,
    keep_checkpoints: bool = False,
    only: Mapping[str, Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Prepare the study (queue ``order``: :func:`grid_points`; the slice ``only``: :func:`prepare`), run ``workers`` local processes until the queue is empty, return the results."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; expected a directory")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        url = storage_url(out_dir, storage)
        with damaged_storage(url):
            counts = prepare(url, grid, base_config, reclaim_running, order, only)
    except BaseException:  # a rejected sweep (bad storage URL, ...) leaves no empty --out
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    total = counts["done"] + counts["waiting"] + counts["running"]  # the slice's points
    later = counts["grid"] - total - counts["done_outside"]  # outside the slice, not done
    head = f"the --only slice holds {total} of {counts['grid']} grid points: " if only else ""
    tail = f"; outside it {counts['done_outside']} done, {later} left for later" if only else ""
    print(
        f"sweep: {head or f'{total} grid points, '}{counts['done']} done, {counts['waiting']} "
        f"queued ({counts['enqueued']} newly), {counts['running']} running elsewhere{tail}; "
        f"storage {redact_url(url)}"
    )
    if counts["running"]:
        print(
            f"  a trial left running by a killed worker is re-queued once its heartbeat is "
            f"{GRACE_PERIOD + HEARTBEAT_INTERVAL} s stale (rerun then, or --reclaim-running "
            "when no other worker is alive)"
        )
    workers = _worker_count(workers, counts["waiting"])
    if workers == 1:
        _run_with_progress(
            url, str(out_dir), total, counts["done"], progress, None, vectorize, keep_checkpoints
        )
    else:
        ctx = mp.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        procs = [
            ctx.Process(
                target=_worker_entry,
                args=(url, str(out_dir), threads, vectorize, keep_checkpoints),
            )
            for _ in range(workers)
        ]
        for p in procs:
            p.start()
        _run_with_progress(url, str(out_dir), total, counts["done"], progress, procs, vectorize)
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise SweepFailed(
                f"{len(bad)} sweep worker(s) failed (exit codes {bad}; each printed why above); "
                "rerun to resume: finished points are kept and the failed workers' points are "
                "queued again"
            )
    return load_results(url)


def _worker_count(workers: int, queued: int) -> int:
    """``workers`` capped at the number of queued points (a worker with nothing to pop only
    costs memory, about 350 MB each), with a warning above the CPU count."""
    cpus = os.cpu_count() or 1
    if workers > cpus:
        warnings.warn(
            f"--workers {workers} exceeds the {cpus} CPU cores: workers share cores and each "
            "holds its own model and data",
            UserWarning,
            stacklevel=3,
        )
    capped = max(1, min(workers, queued))
    if capped < workers:
        print(f"  {workers} workers asked for {queued} queued point(s): starting {capped}")
    return capped


def _run_with_progress(
    url: str,
    out_dir: str,
    total: int,
    done: int,
    progress: bool,
    procs,
    vectorize: bool | None = None,
    keep_checkpoints: bool = False,
) -> None:
    bar = None
    if progress:
        bar = tqdm(total=total, initial=done, desc="sweep", unit="run")
    study = _study(url, None, create=False, storage=make_storage(url, reached=True))

    def count() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    if procs is None:
        while True:
            n = worker(
                url,
                out_dir,
                max_trials=None if bar is None else 25,
                vectorize=vectorize,
                keep_checkpoints=keep_checkpoints,
            )
            if bar is not None:
                bar.n = count()
                bar.refresh()
            if n == 0:
                break
    else:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            if bar is not None:
                bar.n = count()
                bar.refresh()
    if bar is not None:
        bar.n = count()
        bar.close()


def load_results(url: str) -> list[dict[str, Any]]:
    """One record per finished grid point: ``params`` and the training ``result`` (a query:
    no lock file is taken, the storage is only read)."""
    with damaged_storage(url):
        study = _study(url, None, create=False, storage=make_storage(url, read_only=True))
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out = []
    for t in trials:
        if "result" in t.user_attrs:
            out.append(
                {
                    "params": dict(t.params),
                    "point": t.user_attrs.get("point"),
                    "result": t.user_attrs["result"],
                }
            )
    return out
