"""Where a sweep keeps its queue and results: Optuna storage URLs and drivers, the pop lock,
heartbeats, and a server storage that waits out outages (``mupp sweep --storage``).

- ``sqlite:///PATH`` (the default, ``sweep.db`` in ``--out``), any SQLAlchemy URL
  (``postgresql://``, ``mysql://``), or ``journal:PATH`` (a journal file);
- SQLite ignores ``SELECT ... FOR UPDATE``, so popping a queued trial also takes a file lock
  beside the database (:func:`pop_lock`); server databases pop atomically by themselves;
- a popped trial sends heartbeats (:func:`heartbeats`) so that a killed worker's trial is
  found stale and queued again;
- a database server that goes away is waited out for ``--storage-retry`` seconds
  (:func:`make_storage`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock  # a dependency of torch
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    OperationalError,
    PendingRollbackError,
    SQLAlchemyError,
)

HEARTBEAT_INTERVAL = 2
GRACE_PERIOD = 8
STORAGE_RETRY = 60.0  # seconds a sweep waits for a database server that went away


def storage_url(out_dir: str | os.PathLike, storage: str | None = None) -> str:
    """Default: an SQLite file in the output directory."""
    if storage:
        return storage
    return f"sqlite:///{Path(out_dir).resolve() / 'sweep.db'}"


def storage_driver_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: a plain ``postgresql://`` means psycopg 3 to
    SQLAlchemy 2, so it is mapped to psycopg2 where only that one is installed.  Bad URLs get a
    ``ValueError`` naming ``--storage`` and the accepted forms."""
    if url.startswith("journal:"):
        if not url[len("journal:") :]:
            raise ValueError("--storage journal:PATH needs a file path")
        return url
    forms = "sqlite:///PATH, postgresql://USER@HOST/DB, mysql://USER@HOST/DB or journal:PATH"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"--storage must be a database URL ({forms}); got {url!r}") from None
    if parsed.drivername == "postgresql":
        if importlib.util.find_spec("psycopg") is None:
            if importlib.util.find_spec("psycopg2") is None:
                raise ValueError(
                    "--storage postgresql:// needs a PostgreSQL driver: pip install 'mupp[postgres]'"
                )
            parsed = parsed.set(drivername="postgresql+psycopg2")
    try:
        parsed.get_dialect()
    except Exception:  # NoSuchModuleError or the driver's ImportError
        raise ValueError(
            f"--storage: no database driver for {parsed.drivername!r} is installed or known "
            f"({forms})"
        ) from None
    return parsed.render_as_string(hide_password=False)


def make_storage(url: str, read_only: bool = False, reached: bool = False):
    """Optuna storage with heartbeats: ``journal:PATH`` for a journal file, else an RDB URL.
    An unreachable or unreadable database is a ``ValueError`` with one clear line.
    ``read_only`` (queries: ``mupp transfer``, ``plot``) takes no lock file, so that an
    archived sweep on a read-only mount can be read.  A database server's storage waits out
    outages (``$MUPP_STORAGE_RETRY`` seconds), at its first connection too where ``reached``
    (this sweep has connected before: its workers)."""
    url = storage_driver_url(url)
    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(url[len("journal:") :]))
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            # two processes that open a new SQLite file at once would both create its tables;
            # a query opens an existing one and creates nothing
            with contextlib.nullcontext() if read_only else pop_lock(url):
                if not url.startswith("sqlite"):
                    return _OutlastingStorage(
                        url,
                        storage_retry_seconds(),
                        reached,
                        heartbeat_interval=HEARTBEAT_INTERVAL,
                        grace_period=GRACE_PERIOD,
                    )
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD,
                    engine_kwargs={"connect_args": {"timeout": 60}},
                )
        except SQLAlchemyError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(
                f"--storage {redact_url(url)}: the database cannot be opened ({first[:200]}); is the "
                "server reachable and the file a sweep database?"
            ) from None


def storage_retry_seconds() -> float:
    """How long a sweep waits for a database server that went away (``$MUPP_STORAGE_RETRY``,
    seconds; default :data:`STORAGE_RETRY`, 0 fails at once).  ``mupp sweep --storage-retry``
    sets it for the sweep and its workers."""
    text = os.environ.get("MUPP_STORAGE_RETRY", str(STORAGE_RETRY))
    try:
        return parse_seconds(text)
    except ValueError as e:
        raise ValueError(f"MUPP_STORAGE_RETRY: {e}") from None


def parse_seconds(text: str) -> float:
    """A duration in seconds (>= 0) given as text, else ``ValueError`` (also for NaN): the one
    parser of ``--storage-retry`` and ``$MUPP_STORAGE_RETRY``."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"expected a number of seconds >= 0, like 60; got {text!r}")
    return seconds


class StorageUnreachable(RuntimeError):
    """The database server stayed unreachable for the whole retry window (a sweep stopped by
    it resumes when rerun)."""


def _is_disconnect(e: BaseException) -> bool:
    """Whether a storage error is the database connection failing (the server restarting or
    unreachable), not a bad statement."""
    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) else e
    # PendingRollbackError: a session whose rollback failed in the outage (it is discarded
    # before the retry)
    return isinstance(cause, (OperationalError, PendingRollbackError)) or (
        isinstance(cause, DBAPIError) and cause.connection_invalidated
    )


def _outlasting_outages(method):
    """Wrap a storage method: a call that fails because the connection failed is retried
    with exponential backoff (0.5 s doubling to 8 s) for up to the storage's ``retry_s``,
    then ends in :class:`StorageUnreachable`.  A transaction cut off by the outage was rolled
    back by the server, so its retry runs it once."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline, wait = None, 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as e:
                if not _is_disconnect(e):
                    raise
                deadline = deadline if deadline is not None else time.monotonic() + self.retry_s
                if time.monotonic() + wait > deadline:
                    cause = e.__cause__ or e
                    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
                    raise StorageUnreachable(
                        f"--storage {redact_url(self.url)}: the database server stayed unreachable "
                        f"for {self.retry_s:g} s ({first[:160]}); rerun to resume (finished "
                        "points are kept), or raise --storage-retry"
                    ) from None
                inner = getattr(self, "inner", None)
                if inner is not None:  # a session left mid-transaction by the drop: start anew
                    inner.remove_session()
                time.sleep(wait)
                wait = min(2 * wait, 8.0)

    return call


def _delegated(name: str):
    """A method that calls the wrapped storage's ``name``, waiting out outages."""

    def call(self, *args, **kwargs):
        return getattr(self.inner, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return _outlasting_outages(call)


class _OutlastingStorageBase(BaseStorage, BaseHeartbeat):
    """Holds an :class:`optuna.storages.RDBStorage` for a database server and implements
    Optuna's storage interface (``BaseStorage`` and its heartbeat) by calling it, each call
    waiting out an outage of up to ``retry_s`` seconds (a failover, a restarted pod) instead
    of crashing every worker at its next call (:func:`_outlasting_outages`).  Pooled
    connections are pinged at checkout.  A server this sweep has not ``reached`` before
    fails at once: a wrong URL is not transient."""

    def __init__(self, url: str, retry_s: float, reached: bool, **kwargs: Any) -> None:
        self.url, self.retry_s = url, retry_s
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
        self.inner = self._reopen(kwargs) if reached else RDBStorage(url, **kwargs)

    @_outlasting_outages
    def _reopen(self, kwargs: dict[str, Any]) -> RDBStorage:
        """The inner storage of a server this sweep has reached before (a worker that starts
        during an outage waits for it)."""
        return RDBStorage(self.url, **kwargs)

    @property
    def heartbeat_interval(self) -> int | None:
        return self.inner.heartbeat_interval

    def remove_session(self) -> None:
        self.inner.remove_session()


# the whole interface, generated so that no method is left undelegated (an abstract method
# left out would make the class impossible to create)
_OutlastingStorage = type(
    "_OutlastingStorage",
    (_OutlastingStorageBase,),
    {
        name: _delegated(name)
        for name in sorted(
            BaseStorage.__abstractmethods__
            | BaseHeartbeat.__abstractmethods__
            | {"get_best_trial", "get_trial_id_from_study_id_trial_number", "get_trial_param"}
            | {"get_trial_system_attrs", "get_trial_user_attrs", "get_failed_trial_callback"}
        )
    },
)


def redact_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def pop_lock(url: str):
    """A cross-process lock that makes popping an enqueued trial atomic where the storage is not.

    SQLite (one machine by construction) gets a :class:`filelock.FileLock` on ``<db>.pop.lock``;
    every other storage is atomic by itself and gets a no-op context.
    """
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            return FileLock(f"{database}.pop.lock", timeout=120)
    return contextlib.nullcontext()


@contextlib.contextmanager
def heartbeats(storage, trial_ids: list[int]) -> Iterator[None]:
    """Send the trials' heartbeats every ``HEARTBEAT_INTERVAL`` seconds from a thread while
    the block runs (storages without heartbeats: nothing), so that a killed worker's trials
    are found stale and re-queued."""
    if not (hasattr(storage, "record_heartbeat") and getattr(storage, "heartbeat_interval", None)):
        yield
        return
    for trial_id in trial_ids:
        storage.record_heartbeat(trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL):
            try:
                for trial_id in trial_ids:
                    storage.record_heartbeat(trial_id)
            except Exception:  # pragma: no cover - storage hiccup; the next beat retries
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def damaged_storage(url: str) -> Iterator[None]:
    """Turn a damaged database (zeroed or overwritten pages of a SQLite file) into one
    ``ValueError`` that says what to do: every finished run keeps its record in ``runs/``,
    so a new database rebuilds every finished point from there."""
    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) else e
        first = (str(cause or e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"the sweep storage {redact_url(url)} cannot be read ({first[:160]}). If it is a "
            "damaged sweep.db, move it aside and rerun the same `mupp sweep`: every finished "
            "point is rebuilt from the records in runs/"
        ) from None
