"""One training run (``mupp train``): SAM or its base optimizer on CIFAR/synthetic data.

Deterministic per seed: the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``, and each epoch's checkpoint stores model, optimizer, scheduler, history and the
global RNG state, so ``resume=True`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import distributed
from .models import MODELS, build
from .optim import SAM, mup_param_groups
from .optim.groups import PARAMETERIZATIONS
from .optim.lastlayer import LastLayerStep
from .optim.perturbation import RULES, VARIANTS

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything that defines a run.  ``rho = 0`` trains with the base optimizer alone."""

    model: str = "mlp"
    width: float = 256
    base_width: float | None = 64
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    label_noise: float = 0.0  # fraction of training labels flipped to another class
    label_noise_seed: int = 0  # which labels: fixed across training seeds by default
    parameterization: str = "mupp"
    variant: str = "sam"
    rule: str = "LP"
    optimizer: str = "sgd"
    lr: float = 0.1
    rho: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False
    batch_size: int = 64
    epochs: int = 20
    seed: int = 0
    device: str = "cpu"
    perturbation_sync: str = "sync"  # under torchrun: "sync" (global ε) or "local" (per worker)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 shards)
    # last-layer SAM in one forward and one backward (mupp.optim.lastlayer), on one process
    last_layer_fast: bool = True

    def validate(self) -> TrainConfig:
        if self.data_dir is not None:  # one dataset, one identity, however the path was written
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())
        checks = {
            "model": (self.model, MODELS),
            "dataset": (self.dataset, data_mod.DATASETS),
            "parameterization": (self.parameterization, PARAMETERIZATIONS),
            "variant": (self.variant, VARIANTS),
            "rule": (self.rule, RULES),
            "optimizer": (self.optimizer, OPTIMIZERS),
            "schedule": (self.schedule, SCHEDULES),
            "perturbation_sync": (self.perturbation_sync, distributed.MODES),
            "parallel": (self.parallel, distributed.PARALLEL),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
        for name in ("lr", "rho", "momentum", "weight_decay", "label_smoothing", "warmup_epochs"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative finite number; got {v!r}")
        if not (_is_number(self.label_noise) and 0 <= self.label_noise < 1):
            raise ValueError(f"label_noise must be a fraction in [0, 1); got {self.label_noise!r}")
        for name in ("batch_size", "epochs", "train_subset", "test_subset"):
            v = getattr(self, name)
            if v is None and name.endswith("subset"):
                continue
            if not (_is_integer(v) and v >= 1):
                raise ValueError(f"{name} must be a whole number >= 1; got {v!r}")
            setattr(self, name, int(v))
        for name in ("seed", "label_noise_seed"):
            if not _is_integer(getattr(self, name)):
                raise ValueError(f"{name} must be a whole number; got {getattr(self, name)!r}")
        for name in ("width", "base_width"):
            v = getattr(self, name)
            if v is None and name == "base_width":
                continue
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number; got {v!r}")
            if self.model in ("mlp", "vit") and not float(v).is_integer():
                raise ValueError(
                    f"{name} of the {self.model} is a number of units, a whole number; got {v!r} "
                    "(ResNets take a fractional width multiplier)"
                )
        for name in ("nesterov", "augment", "last_layer_fast"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a mapping; got {self.model_kwargs!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} is not available here (torch.cuda.is_available() is "
                "False); use device 'cpu'"
            )
        try:  # unknown or invalid model options fail now, not after loading the data
            with torch.device("meta"):
                _make_model(self, 10)
        except TypeError as e:
            raise ValueError(
                f"model_kwargs {self.model_kwargs!r} do not fit the {self.model}: {e}"
            ) from None
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(names)}")
        return cls(**dict(d)).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_integer(v: Any) -> bool:
    return _is_number(v) and float(v).is_integer()


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict (a malformed file: ``ValueError`` naming
    the file and the problem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            import tomllib

            data = tomllib.loads(text)
    except Exception as e:  # the parsers' own error types (TOMLDecodeError, YAMLError)
        raise ValueError(f"config file {str(path)!r} is malformed: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of options")
    return data


def _make_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    kw = dict(cfg.model_kwargs)
    if cfg.model == "mlp":
        kw.setdefault("d_out", num_classes)
    else:
        kw.setdefault("num_classes", num_classes)
    return build(cfg.model, cfg.width, cfg.base_width, **kw)


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    base = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    kw: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kw.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.rho > 0:
        return SAM(
            model.parameters(),
            base,
            lr=cfg.lr,
            rho=cfg.rho,
            parameterization=cfg.parameterization,
            rule=cfg.rule,
            variant=cfg.variant,
            **kw,
        )
    kind = "sgd" if cfg.optimizer == "sgd" else "adam"
    par = "sp" if cfg.parameterization == "sp" else "mupp"
    groups = mup_param_groups(model.parameters(), cfg.lr, kind, par, kw.pop("weight_decay"))
    return base(groups, lr=cfg.lr, **kw)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            prog = (step - warm) / max(1.0, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
        return 1.0

    return f


def eval_inputs(
    split: data_mod.Split, name: str, flatten: bool, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's normalized inputs and labels, prepared once per run for :func:`evaluate`
    (re-normalizing 10,000 test images every epoch cost as much as a forward of a narrow MLP)."""
    x = data_mod.normalize(split.x.to(device), name)
    return (x.reshape(len(x), -1) if flatten else x), split.y.to(device)


def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean loss, per-example correctness) of ``model`` on prepared inputs
    (:func:`eval_inputs`), in inference mode and in batches of ``batch_size``."""
    was_training = model.training
    model.eval()
    correct, total_loss = [], 0.0
    with torch.inference_mode():
        for i in range(0, len(y), batch_size):
            out = model(x[i : i + batch_size])
            yb = y[i : i + batch_size]
            total_loss += F.cross_entropy(out, yb, reduction="sum").item()
            correct.append((out.argmax(1) == yb).cpu())
    model.train(was_training)
    c = torch.cat(correct)
    return c.float().mean().item(), total_loss / len(c), c


def epoch_batches(cfg: TrainConfig, split: data_mod.Split, name: str, epoch: int):
    """The training batches of ``epoch``: their order depends only on ``(seed, epoch)``, which
    makes runs deterministic, resumable, and shareable by vectorized groups."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return data_mod.batches(
        split,
        cfg.batch_size,
        shuffle=True,
        generator=gen,
        name=name,
        augment_data=cfg.augment,
        flatten=cfg.model == "mlp",
        drop_last=True,
        device=cfg.device,
    )


def _subset(split: data_mod.Split, n: int | None) -> data_mod.Split:
    return split if n is None or n >= len(split) else data_mod.Split(split.x[:n], split.y[:n])


def splits(cfg: TrainConfig, ds: data_mod.Dataset) -> tuple[data_mod.Split, data_mod.Split]:
    """The run's (train, test) splits: the first ``train_subset``/``test_subset`` images, with
    ``label_noise`` applied to the training labels (drawn with ``label_noise_seed``)."""
    train_split = _subset(ds.train, cfg.train_subset)
    if cfg.label_noise:
        train_split = data_mod.with_label_noise(
            train_split, cfg.label_noise, ds.num_classes, cfg.label_noise_seed
        )
    return train_split, _subset(ds.test, cfg.test_subset)


def train(
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    dataset: data_mod.Dataset | None = None,
    log: Callable[[str], None] | None = print,
    keep_checkpoint: bool = True,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Train one configuration; returns the result record (also written to ``result.json``).

    The record has per-epoch ``history`` (train/test accuracy and loss), ``best_test_acc``,
    ``final_test_acc``, ``test_acc_exact`` (first 1000 exact CIFAR-10 test images, at the
    best epoch, when known), ``wall_time`` and ``diverged`` (non-finite loss, or test accuracy
    at chance after the first epoch).

    Every epoch writes a checkpoint to ``out_dir`` (what ``resume=True`` continues from):
    ``checkpoint.pt``, or under ``parallel = "fsdp"`` a sharded ``checkpoint/`` directory
    (``torch.distributed.checkpoint``; it resumes on any number of ranks).  With
    ``keep_checkpoint=False`` a finished run deletes it and keeps only its record.
    ``stop_after_epochs`` ends this call after that many epochs (the run stays resumable).
    Under ``torchrun``, ``parallel`` picks DistributedDataParallel or FSDP2; rank 0 logs.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file; expected a directory")
    ds = dataset if dataset is not None else data_mod.load(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    train_split, test_split = splits(cfg, ds)
    flatten = cfg.model == "mlp"
    rank, world_size = distributed.init_from_env(cfg.device)
    if cfg.batch_size % world_size:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be divisible by the number of workers ({world_size})"
        )
    sharded = cfg.parallel == "fsdp" and torch.distributed.is_initialized()
    if sharded and cfg.perturbation_sync == "local":
        raise ValueError(
            "perturbation_sync='local' is not available with parallel='fsdp' (FSDP2 reduce-"
            "scatters every gradient); use 'sync', or parallel='ddp' for m-sharpness"
        )
    if rank != 0:
        progress, log = False, None  # rank 0 logs and writes the record
    torch.manual_seed(cfg.seed)
    model = _make_model(cfg, ds.num_classes).to(cfg.device)
    if sharded:
        distributed.shard_model(model)  # before the optimizer: sharding replaces parameters
    opt = _make_optimizer(cfg, model)
    net = model
    if world_size > 1 and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(model)
    steps_per_epoch = len(train_split) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the training set ({len(train_split)} images)"
        )
    # SAM steps its base optimizer (they share param groups): the scheduler follows that one
    sched_opt = opt.base_optimizer if isinstance(opt, SAM) else opt
    sched = torch.optim.lr_scheduler.LambdaLR(sched_opt, _lr_lambda(cfg, steps_per_epoch))
    if out is not None:  # created only now that the run is known to start
        out.mkdir(parents=True, exist_ok=True)
    ckpt = _Checkpoint(out, cfg, sharded, writer=rank == 0) if out is not None else None
    history: list[dict[str, float]] = []
    start_epoch, elapsed = 0, 0.0
    if resume and ckpt is not None and ckpt.exists():
        history, start_epoch, elapsed = ckpt.load(model, opt, sched)
    diverged = bool(history and history[-1].get("diverged"))
    use_sam = isinstance(opt, SAM)
    one_pass = None
    if (
        use_sam
        and cfg.variant == "last-layer"
        and cfg.last_layer_fast
        and net is model
        and not sharded
    ):
        one_pass = LastLayerStep(model, opt)
    exact_mask = ds.test_exact[: len(test_split)] if ds.test_exact is not None else None
    test_inputs = eval_inputs(test_split, ds.name, flatten, cfg.device)
    end_epoch = cfg.epochs
    if stop_after_epochs is not None:
        end_epoch = min(cfg.epochs, start_epoch + stop_after_epochs)
    bar = None
    for epoch in range(start_epoch, end_epoch):
        if diverged:
            break
        t0 = time.perf_counter()
        it = epoch_batches(cfg, train_split, ds.name, epoch)
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                it, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False
            )
            it = bar
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.long)
        seen = 0
        for x, y in it:
            if world_size > 1:  # every worker sees the same global batch order; take a shard
                x, y = x[rank::world_size], y[rank::world_size]
            kept = {}

            def loss_fn(x=x, y=y, kept=kept):
                logits = net(x)
                kept.setdefault("logits", logits.detach())
                return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

            if one_pass is not None:
                loss, logits = one_pass.step(
                    x, y, lambda o, t: F.cross_entropy(o, t, label_smoothing=cfg.label_smoothing)
                )
                kept["logits"] = logits
            elif use_sam:
                loss = distributed.sam_passes(net, opt, loss_fn, cfg.perturbation_sync)
            else:
                loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            out_logits = kept["logits"]
            sched.step()
            loss_sum += loss.detach().cpu() * len(y)
            correct += (out_logits.argmax(1) == y).sum().cpu()
            seen += len(y)
        if world_size > 1:
            stats = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen))]).double()
            torch.distributed.all_reduce(stats)
            loss_sum, correct, seen = stats[0], stats[1].long(), int(stats[2].item())
        train_loss = (loss_sum / max(seen, 1)).item()
        test_acc, test_loss, per_example = evaluate(model, *test_inputs)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": correct.item() / max(seen, 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
        }
        if exact_mask is not None and exact_mask.any():
            record["test_acc_exact"] = per_example[exact_mask].float().mean().item()
        chance = 1.0 / ds.num_classes
        if (
            not (math.isfinite(train_loss) and math.isfinite(test_loss))
            or test_acc <= chance + 0.01
        ):
            record["diverged"] = True
            diverged = True
        history.append(record)
        elapsed += time.perf_counter() - t0
        if ckpt is not None:
            ckpt.save(model, opt, sched, history, epoch, elapsed)
        if log is not None:
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f} acc {record['train_acc']:.4f}"
                f" | test loss {test_loss:.4f} acc {test_acc:.4f}"
                + (" | diverged" if diverged else "")
            )
    if bar is not None:
        bar.close()
    result = summarize(cfg, history, elapsed)
    finished = diverged or len(history) >= cfg.epochs
    if out is not None and rank == 0:
        tmp = out / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out / "result.json")
    if ckpt is not None and finished and not keep_checkpoint:
        ckpt.delete()
    return result


CHECKPOINT_MAGIC = b"mupp-checkpoint sha256="


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read: corrupt, truncated, or unsafe to load."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` (tensors and plain data only) atomically, with a SHA-256 checksum of
    its bytes in a one-line header, so that :func:`load_checkpoint` detects corruption."""
    import hashlib
    import io

    buf = io.BytesIO()
    torch.save(dict(state), buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(CHECKPOINT_MAGIC + digest + b"\n")
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`: verify its checksum, then load it
    with ``torch.load(weights_only=True)``, which never runs code from the file.  A checkpoint
    of an older mupp (no checksum) loads when it holds only tensors and plain data.  Anything
    else raises :class:`CheckpointError` saying what to do."""
    import hashlib
    import io
    import pickle

    path = Path(path)
    data = path.read_bytes()
    remedy = (
        f"delete {path.parent} (or rerun with --restart) to start the run over, or resume "
        "from a copy you trust"
    )
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


class _Checkpoint:
    """A run's checkpoint: ``checkpoint.pt`` (one file, written by rank 0), or for sharded
    runs a ``checkpoint/`` directory of ``torch.distributed.checkpoint`` shards (every rank
    writes its own) with the run's record in ``checkpoint/mupp.json``.  Both are replaced
    atomically: a killed run resumes from the last complete epoch."""

    def __init__(self, out: Path, cfg: TrainConfig, sharded: bool, writer: bool):
        self.out, self.cfg, self.sharded, self.writer = out, cfg, sharded, writer
        self.path = out / ("checkpoint" if sharded else "checkpoint.pt")

    def exists(self) -> bool:
        return (self.path / "mupp.json").is_file() if self.sharded else self.path.is_file()

    def _check_config(self, stored: Mapping[str, Any]) -> None:
        if stored != self.cfg.to_dict():
            raise ValueError(
                f"{self.path} belongs to a different configuration; use another output directory"
            )

    def save(self, model, opt, sched, history, epoch: int, elapsed: float) -> None:
        meta = {
            "config": self.cfg.to_dict(),
            "scheduler": sched.state_dict(),
            "history": history,
            "epoch": epoch,
            "elapsed": elapsed,
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
        import shutil

        tmp = self.out / "checkpoint.tmp"
        if self.writer and tmp.exists():
            shutil.rmtree(tmp)
        torch.distributed.barrier()
        distributed.save_sharded(tmp, model, opt, {"rng": torch.get_rng_state()})
        torch.distributed.barrier()
        if self.writer:
            (tmp / "mupp.json").write_text(json.dumps(meta))
            old = self.out / "checkpoint.old"
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def load(self, model, opt, sched) -> tuple[list, int, float]:
        if not self.sharded:
            state = load_checkpoint(self.path)
            self._check_config(state["config"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            meta = state
        else:
            meta = json.loads((self.path / "mupp.json").read_text())
            self._check_config(meta["config"])
            extra = distributed.load_sharded(self.path, model, opt, {"rng": torch.get_rng_state()})
            torch.set_rng_state(extra["rng"])
        sched.load_state_dict(meta["scheduler"])
        return meta["history"], meta["epoch"] + 1, meta["elapsed"]

    def delete(self) -> None:
        if not self.writer:
            return
        if self.sharded:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


def summarize(cfg: TrainConfig, history: list[dict[str, float]], elapsed: float) -> dict[str, Any]:
    finite = [h for h in history if math.isfinite(h["test_acc"])]
    best = max(finite, key=lambda h: h["test_acc"]) if finite else None
    return {
        "config": cfg.to_dict(),
        "history": history,
        "best_test_acc": best["test_acc"] if best else 0.0,
        "best_epoch": best["epoch"] if best else 0,
        "test_acc_exact": best.get("test_acc_exact") if best else None,
        "final_test_acc": history[-1]["test_acc"] if history else 0.0,
        "diverged": any(h.get("diverged") for h in history),
        "wall_time": elapsed,
    }
