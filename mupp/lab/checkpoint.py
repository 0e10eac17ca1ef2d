"""Run checkpoints: one checksummed file per run, or a sharded directory under FSDP2.

:func:`save_checkpoint` writes a one-line SHA-256 header before the ``torch.save`` payload;
:func:`load_checkpoint` verifies it and loads with ``weights_only=True``, which never runs code
from the file.  :class:`RunCheckpoint` is what :func:`mupp.lab.train.train` saves every epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .config import TrainConfig, differing_keys, with_defaults

CHECKPOINT_FILE = "checkpoint.pt"  # a run's checkpoint (save_checkpoint writes it via .tmp)
SHARDED_DIR = "checkpoint"  # a sharded run's checkpoint directory (via .tmp, the last as .old)
RECORD_FILE = "result.json"  # a run's result record
MANIFEST = "mupp.json"  # a sharded checkpoint's record and file digests, written last

CHECKPOINT_MAGIC = b"mupp-checkpoint sha256="


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read: corrupt, truncated, or unsafe to load."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` (tensors and plain data only) atomically, with a SHA-256 checksum of
    its bytes in a one-line header, so that :func:`load_checkpoint` detects corruption."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(CHECKPOINT_MAGIC + digest + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: the previous checkpoint stays, no partial file
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`: verify its checksum, then load it
    with ``torch.load(weights_only=True)``, which never runs code from the file.  A checkpoint
    of an older mupp (no checksum) loads when it holds only tensors and plain data.  Anything
    else raises :class:`CheckpointError` saying what to do."""
    path = Path(path)
    data = path.read_bytes()
    remedy = _remedy(path)
    if data.startswith(CHECKPOINT_MAGIC):
        header, _, payload = data.partition(b"\n")
        want = header[len(CHECKPOINT_MAGIC) :].decode("ascii", "replace")
        if hashlib.sha256(payload).hexdigest() != want:
            raise CheckpointError(
                f"{path} is corrupt: its checksum does not match its contents; {remedy}"
            )
    else:
        payload = data  # an older mupp checkpoint: no checksum to verify
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} cannot be loaded safely ({first[:200]}): it is truncated, corrupt, or holds "
            f"objects other than tensors and plain data; {remedy}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a mupp checkpoint; {remedy}")
    return state


class RunCheckpoint:
    """A run's checkpoint: ``checkpoint.pt`` (one file, written by rank 0), or for sharded
    runs a ``checkpoint/`` directory of ``torch.distributed.checkpoint`` shards (every rank
    writes its own) with the run's record in ``checkpoint/mupp.json``.  Both are replaced
    atomically: a killed run resumes from the last complete epoch."""

    def __init__(self, out: Path, cfg: TrainConfig, sharded: bool, writer: bool) -> None:
        self.out, self.cfg, self.sharded, self.writer = out, cfg, sharded, writer
        self.path = out / (SHARDED_DIR if sharded else CHECKPOINT_FILE)

    def exists(self) -> bool:
        """Whether a complete checkpoint is there to resume from (a sharded one interrupted
        between the renames of :meth:`save` is recovered first)."""
        if not self.sharded:
            return self.path.is_file()
        self._recover()
        return (self.path / MANIFEST).is_file()

    def _check_config(self, stored: Mapping[str, Any]) -> None:
        stored, want = with_defaults(stored), self.cfg.to_dict()
        if stored != want:
            differ = differing_keys(stored, want)
            raise ValueError(
                f"{self.path} belongs to a different configuration (differs in {differ}); use "
                "another output directory, or --restart to discard it"
            )

    def save(
        self,
        model,
        opt,
        sched,
        history,
        epoch: int,
        elapsed: float,
        position: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the state after ``epoch`` (model, optimizer, scheduler, RNG, history).  A
        run stopped inside epoch ``epoch + 1`` also saves its ``position`` there (the steps
        taken and the epoch's running sums), from which :meth:`load` continues."""
        meta = {
            "config": self.cfg.to_dict(),
            "scheduler": sched.state_dict(),
            "history": history,
            "epoch": epoch,
            "elapsed": elapsed,
            "position": dict(position) if position is not None else None,
        }
        if not self.sharded:
            if not self.writer:
                return
            state = dict(
                meta,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                rng=torch.get_rng_state(),
            )
            save_checkpoint(state, self.path)
            return
        tmp, old = self._tmp, self._old
        if self.writer and tmp.exists():
            shutil.rmtree(tmp)
        torch.distributed.barrier()
        distributed.save_sharded(tmp, model, opt, {"rng": torch.get_rng_state()})
        torch.distributed.barrier()
        # every rank hashes its share of the files; the manifest, written last and atomically,
        # marks the directory complete
        meta["files"] = _shard_digests(tmp, sorted(f.name for f in tmp.iterdir() if f.is_file()))
        if self.writer:
            manifest = tmp / f"{MANIFEST}.tmp"
            manifest.write_text(json.dumps(meta))
            os.replace(manifest, tmp / MANIFEST)
            # a crash from here on leaves a complete checkpoint.tmp/ or checkpoint.old/, which
            # _recover() puts back in place
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    @property
    def _tmp(self) -> Path:
        return self.out / f"{SHARDED_DIR}.tmp"

    @property
    def _old(self) -> Path:
        return self.out / f"{SHARDED_DIR}.old"

    def _recover(self) -> None:
        """Put a sharded checkpoint back in place after a crash between the renames of
        :meth:`save`: a complete ``checkpoint.tmp/`` (the newer), else ``checkpoint.old/``,
        replaces a ``checkpoint/`` without a manifest.  Called on every rank."""
        if (self.path / MANIFEST).is_file():
            return
        found = next((d for d in (self._tmp, self._old) if (d / MANIFEST).is_file()), None)
        if found is None:
            return
        together = torch.distributed.is_initialized()
        if together:  # every rank has looked before the writer moves anything
            torch.distributed.barrier()
        if self.writer:
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(found, self.path)
        if together:
            torch.distributed.barrier()

    def load(self, model, opt, sched) -> tuple[list, int, float, dict | None]:
        """Restore the state in place; returns ``(history, next epoch, elapsed seconds,
        position in that epoch or None)``."""
        if not self.sharded:
            state = load_checkpoint(self.path)
            self._check_config(state["config"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            meta = state
        else:
            meta = self._verified_manifest()
            self._check_config(meta["config"])
            try:
                extra = distributed.load_sharded(
                    self.path, model, opt, {"rng": torch.get_rng_state()}
                )
            except Exception as e:  # an older checkpoint without digests, damaged
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(
                    f"{self.path} cannot be loaded ({first[:200]}); {_remedy(self.path)}"
                ) from None
            torch.set_rng_state(extra["rng"])
        sched.load_state_dict(meta["scheduler"])
        return meta["history"], meta["epoch"] + 1, meta["elapsed"], meta.get("position")

    def _verified_manifest(self) -> dict[str, Any]:
        """The sharded checkpoint's manifest, after checking every file against its digest
        (each rank hashes a share).  A malformed manifest, or a file missing, truncated or
        changed, is a :class:`CheckpointError` (the same line on every rank)."""
        manifest = self.path / MANIFEST
        try:
            meta = json.loads(manifest.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            missing_keys = {"config", "scheduler", "history", "epoch", "elapsed"} - set(meta)
            if missing_keys:
                raise ValueError(f"no {sorted(missing_keys)}")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{manifest} is not a mupp checkpoint manifest ({str(e)[:120]}); "
                f"{_remedy(self.path)}"
            ) from None
        want = meta.get("files")
        if want is None:  # written by an older mupp: no digests to check
            return meta
        present = sorted(n for n in want if (self.path / n).is_file())
        got = _shard_digests(self.path, present)
        damaged = sorted(n for n in want if got.get(n) != want[n])
        if damaged:
            raise CheckpointError(
                f"{self.path} is corrupt: {', '.join(damaged[:3])}"
                + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
                + f" missing or changed since it was written; {_remedy(self.path)}"
            )
        return meta

    def delete(self) -> None:
        """Remove the checkpoint (a finished run keeps only its record)."""
        if not self.writer:
            return
        if self.sharded:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_digests(folder: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of ``folder``'s files ``names``: under ``torch.distributed`` each rank hashes
    every world-size-th file and all ranks get the whole table."""
    rank, world_size = distributed.world()
    mine = {n: _file_digest(folder / n) for n in names[rank::world_size]}
    if world_size == 1:
        return mine
    tables: list[dict[str, str] | None] = [None] * world_size
    torch.distributed.all_gather_object(tables, mine)
    return {n: d for table in tables for n, d in (table or {}).items()}


def _remedy(path: Path) -> str:
    return (
        f"delete {path.parent} (or rerun with --restart) to start the run over, or resume "
        "from a copy you trust"
    )


def discard_run(out: str | os.PathLike) -> None:
    """Remove a run folder's checkpoint (file or sharded directory, with their temporaries)
    and its record, so that the run starts over (``mupp train --restart``)."""
    folder = Path(out)
    for name in (CHECKPOINT_FILE, f"{CHECKPOINT_FILE}.tmp", RECORD_FILE):
        (folder / name).unlink(missing_ok=True)
    for name in (SHARDED_DIR, f"{SHARDED_DIR}.tmp", f"{SHARDED_DIR}.old"):
        shutil.rmtree(folder / name, ignore_errors=True)
