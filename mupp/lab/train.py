"""One training run (``mupp train``): SAM or its base optimizer on CIFAR/synthetic data.

Deterministic per seed: the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``, and each epoch's checkpoint stores model, optimizer, scheduler, history and the
global RNG state, so ``resume=True`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import distributed
from ..optim import SAM, mup_param_groups
from ..optim.lastlayer import LastLayerStep
from . import data as data_mod
from .checkpoint import RECORD_FILE, RunCheckpoint
from .config import TrainConfig, make_model

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """:class:`mupp.SAM` over SGD or AdamW when ``rho > 0``, else the base optimizer alone
    with μP learning rates (:func:`mupp.mup_param_groups`)."""
    base = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    kw: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kw.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.uses_sam:
        return SAM(
            model.parameters(),
            base,
            lr=cfg.lr,
            rho=cfg.rho,
            parameterization=cfg.parameterization,
            rule=cfg.rule,
            variant=cfg.variant,
            ascent=cfg.ascent,
            every=cfg.every,
            reuse=cfg.reuse,
            reuse_scale=cfg.reuse_scale,
            **kw,
        )
    kind = "sgd" if cfg.optimizer == "sgd" else "adam"
    par = "sp" if cfg.parameterization == "sp" else "mupp"
    groups = mup_param_groups(model.parameters(), cfg.lr, kind, par, kw.pop("weight_decay"))
    return base(groups, lr=cfg.lr, **kw)


def steps_per_epoch(cfg: TrainConfig, train_size: int) -> int:
    """Optimizer steps per epoch (the last partial batch is dropped); a batch larger than the
    training set raises ``ValueError``."""
    steps = train_size // cfg.batch_size
    if steps < 1:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the training set ({train_size} images)"
        )
    return steps


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor per step (``LambdaLR``): linear warmup, then constant or
    cosine decay to zero at the last step."""
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
    if data_mod.is_text(name):  # token windows
        return split.x.to(device), split.y.to(device)
    x = data_mod.normalize(split.x.to(device), name)
    return (x.reshape(len(x), -1) if flatten else x), split.y.to(device)


def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean loss, per-example correctness) of ``model`` on prepared inputs
    (:func:`eval_inputs`), in inference mode and in batches of ``batch_size``.  A language
    model's logits ``(N, T, vocab)`` count every position: next-character accuracy and the
    mean loss in nats per character."""
    was_training = model.training
    model.eval()
    correct, total_loss = [], 0.0
    with torch.inference_mode():
        for i in range(0, len(y), batch_size):
            out = model(x[i : i + batch_size])
            yb = y[i : i + batch_size]
            total_loss += F.cross_entropy(out.flatten(0, -2), yb.flatten(), reduction="sum").item()
            correct.append((out.argmax(-1) == yb).cpu())
    model.train(was_training)
    c = torch.cat(correct)
    return c.float().mean().item(), total_loss / c.numel(), c


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


def load_dataset(cfg: TrainConfig) -> data_mod.Dataset:
    """The configuration's dataset (a text corpus in windows of ``block_size``)."""
    return data_mod.load(
        cfg.dataset, cfg.data_dir, seed=cfg.seed, block_size=cfg.block_size, text_file=cfg.text_file
    )


def subset(split: data_mod.Split, n: int | None) -> data_mod.Split:
    """The first ``n`` examples of ``split`` (all of them for ``None``)."""
    return split if n is None or n >= len(split) else data_mod.Split(split.x[:n], split.y[:n])


def splits(cfg: TrainConfig, ds: data_mod.Dataset) -> tuple[data_mod.Split, data_mod.Split]:
    """The run's (train, test) splits: the first ``train_subset``/``test_subset`` images, with
    ``label_noise`` applied to the training labels (drawn with ``label_noise_seed``)."""
    train_split = subset(ds.train, cfg.train_subset)
    if cfg.label_noise:
        train_split = data_mod.with_label_noise(
            train_split, cfg.label_noise, ds.num_classes, cfg.label_noise_seed
        )
    return train_split, subset(ds.test, cfg.test_subset)


def epoch_record(
    epoch: int,
    *,
    train_loss: float,
    train_acc: float,
    test_loss: float,
    test_acc: float,
    per_example: torch.Tensor,
    exact_mask: torch.Tensor | None,
    num_classes: int,
) -> dict[str, Any]:
    """One epoch's entry of a run's history (``epoch`` counts from 1).  ``test_acc_exact`` is
    the accuracy on the exact CIFAR-10 test images where the dataset marks them; ``diverged``
    is set when a loss is not finite or test accuracy is at chance (at most 1/classes + 0.01)."""
    record = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
    }
    if exact_mask is not None and exact_mask.any():
        mask = exact_mask.to(per_example.device)
        record["test_acc_exact"] = per_example[mask].float().mean().item()
    if (
        not (math.isfinite(train_loss) and math.isfinite(test_loss))
        or test_acc <= 1.0 / num_classes + 0.01
    ):
        record["diverged"] = True
    return record


@dataclass
class _Run:
    """What one training run holds between epochs."""

    cfg: TrainConfig
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: Step
    steps_per_epoch: int
    rank: int
    world_size: int
    sharded: bool


def _prepare(cfg: TrainConfig, num_classes: int, train_size: int) -> _Run:
    """Build, shard or wrap (under torchrun) the model, the optimizer, the scheduler and the
    step function."""
    rank, world_size = distributed.world()
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
    steps = steps_per_epoch(cfg, train_size)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, num_classes).to(cfg.device)
    if sharded:
        distributed.shard_model(model)  # before the optimizer: sharding replaces parameters
    opt = make_optimizer(cfg, model)
    net = model
    if world_size > 1 and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(model)
    # SAM steps its base optimizer (they share param groups): the scheduler follows that one
    sched_opt = opt.base_optimizer if isinstance(opt, SAM) else opt
    sched = torch.optim.lr_scheduler.LambdaLR(sched_opt, lr_lambda(cfg, steps))
    step = _step_function(cfg, model, net, opt, sharded)
    return _Run(cfg, model, net, opt, sched, step, steps, rank, world_size, sharded)


def _step_function(
    cfg: TrainConfig,
    model: torch.nn.Module,
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sharded: bool,
) -> Step:
    """``step(x, y) -> (loss, logits)``: one optimizer step on a batch.  Last-layer SAM on one
    process takes one forward and one backward (:class:`~mupp.optim.lastlayer.LastLayerStep`);
    other SAM variants take two passes (:func:`mupp.distributed.sam_passes`); ``rho = 0`` one."""

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # (batch, classes), or a language model's (batch, tokens, vocab) against (batch, tokens)
        logits, y = logits.flatten(0, -2), y.flatten()
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    if not isinstance(opt, SAM):

        def plain_step(x, y):
            logits = net(x)
            loss = criterion(logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss, logits.detach()

        return plain_step
    two_pass = cfg.ascent == "gradient" and cfg.every == 1
    if (
        cfg.variant == "last-layer"
        and cfg.last_layer_fast
        and two_pass
        and net is model
        and not sharded
    ):
        one_pass = LastLayerStep(model, opt)
        return lambda x, y: one_pass.step(x, y, criterion)

    def sam_step(x, y):
        kept = {}

        def loss_fn():
            logits = net(x)
            kept.setdefault("logits", logits.detach())  # the first pass's, at W
            return criterion(logits, y)

        loss = distributed.sam_passes(net, opt, loss_fn, cfg.perturbation_sync)
        return loss, kept["logits"]

    return sam_step


class Preempted(Exception):
    """A run stopped by SIGTERM or SIGINT after finishing its current step; its checkpoint
    holds the position inside the epoch, and ``resume=True`` continues from there."""

    def __init__(self, epoch: int, step: int, signum: int) -> None:
        self.epoch, self.step, self.signum = epoch, step, signum
        super().__init__(f"stopped at epoch {epoch}, step {step}")


@contextlib.contextmanager
def _stop_requests(enabled: bool) -> Iterator[list[int] | None]:
    """While the block runs, SIGTERM and SIGINT are recorded (the list gets the signal's
    number) instead of killing the process, so that the training loop can finish its step
    and checkpoint.  Only in the main thread (where Python runs signal handlers); elsewhere,
    or not ``enabled``, it yields ``None`` and signals keep their handlers."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield None
        return
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in old:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class _EpochSums:
    """An epoch's running totals, saved in a mid-epoch checkpoint (``position``)."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0


def _train_epoch(
    run: _Run,
    split: data_mod.Split,
    name: str,
    epoch: int,
    progress: bool,
    sums: _EpochSums | None = None,
    stop: list[int] | None = None,
) -> tuple[float, float, _EpochSums | None]:
    """One pass over the training split, from step ``sums.step`` on (a resumed epoch skips
    the batches it already took: their order depends only on seed and epoch).  Returns
    ``(mean train loss, train accuracy, None)`` over every worker's examples, or, when a
    stop was requested (``stop`` non-empty on any rank: :func:`_agreed_stop`), this rank's
    totals so far after the current step."""
    cfg = run.cfg
    sums = sums or _EpochSums()
    batches = itertools.islice(epoch_batches(cfg, split, name, epoch), sums.step, None)
    if progress:
        batches = tqdm(
            batches,
            total=run.steps_per_epoch,
            initial=sums.step,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
        )
    loss_sum = torch.tensor(sums.loss_sum, dtype=torch.float32)
    correct = torch.tensor(sums.correct, dtype=torch.long)
    seen, step = sums.seen, sums.step
    for x, y in batches:
        if run.world_size > 1:  # every worker sees the same global batch order; take a shard
            x, y = x[run.rank :: run.world_size], y[run.rank :: run.world_size]
        loss, logits = run.step(x, y)
        run.sched.step()
        loss_sum += loss.detach().cpu() * y.numel()  # per example, or per character of text
        correct += (logits.argmax(-1) == y).sum().cpu()
        seen += y.numel()
        step += 1
        if stop is not None and step < run.steps_per_epoch and _agreed_stop(run, stop):
            if progress:
                batches.close()
            return math.nan, math.nan, _EpochSums(step, loss_sum.item(), int(correct), seen)
    if progress:
        batches.close()
    if run.world_size > 1:
        stats = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen))]).double()
        torch.distributed.all_reduce(stats)
        loss_sum, correct, seen = stats[0], stats[1].long(), int(stats[2].item())
    return (loss_sum / max(seen, 1)).item(), correct.item() / max(seen, 1), None


def _agreed_stop(run: _Run, stop: list[int]) -> bool:
    """Whether to stop after this step.  One process: a signal arrived.  Several: a signal
    arrived on any rank (torchrun forwards SIGTERM to every worker, but not at the same
    instant), so the ranks agree by an all-reduce after every step, stop after the same step,
    and each records the signal (the largest number any rank received)."""
    if run.world_size == 1:
        return bool(stop)
    flag = torch.tensor([stop[0] if stop else 0], device=run.cfg.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and not stop:
        stop.append(int(flag.item()))
    return bool(flag.item())


def _gather_position(run: _Run, sums: _EpochSums) -> dict[str, Any]:
    """The position a mid-epoch checkpoint stores: the step and this rank's running sums;
    under several ranks also every rank's sums (``ranks``), so that each resumes its own."""
    position = dataclasses.asdict(sums)
    if run.world_size > 1:
        ranks: list[dict | None] = [None] * run.world_size
        torch.distributed.all_gather_object(ranks, position)
        position["ranks"] = ranks
    return position


def _resumed_sums(run: _Run, position: Mapping[str, Any] | None) -> _EpochSums | None:
    """This rank's running sums at a mid-epoch checkpoint's position.  On another number of
    ranks than wrote it, rank 0 carries the sum of all (the totals are exact; the order of
    the additions, and so the last bits of the epoch's train loss, may differ)."""
    if not position:
        return None
    ranks = position.get("ranks") or [position]
    if len(ranks) == run.world_size:
        mine = ranks[run.rank]
    elif run.rank == 0:
        mine = {
            "step": position["step"],
            "loss_sum": sum(r["loss_sum"] for r in ranks),
            "correct": sum(r["correct"] for r in ranks),
            "seen": sum(r["seen"] for r in ranks),
        }
    else:
        mine = {"step": position["step"]}
    return _EpochSums(**{k: v for k, v in mine.items() if k != "ranks"})


def _epoch_line(record: Mapping[str, Any], epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} acc "
        f"{record['train_acc']:.4f} | test loss {record['test_loss']:.4f} acc "
        f"{record['test_acc']:.4f}" + (" | diverged" if record.get("diverged") else "")
    )


def _write_result(out: Path, result: Mapping[str, Any]) -> None:
    tmp = out / f"{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / RECORD_FILE)


def train(
    config: TrainConfig,
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

    The record has per-epoch ``history`` (:func:`epoch_record`: train/test accuracy and loss),
    ``best_test_acc``, ``final_test_acc``, ``test_acc_exact`` (first 1000 exact CIFAR-10 test
    images, at the best epoch, when known), ``wall_time`` and ``diverged``.

    Every epoch writes a checkpoint to ``out_dir`` (what ``resume=True`` continues from):
    ``checkpoint.pt``, or under ``parallel = "fsdp"`` a sharded ``checkpoint/`` directory
    (``torch.distributed.checkpoint``; it resumes on any number of ranks).  With
    ``keep_checkpoint=False`` a finished run deletes it and keeps only its record.
    ``stop_after_epochs`` ends this call after that many epochs (the run stays resumable).
    Under ``torchrun``, ``parallel`` picks DistributedDataParallel or FSDP2; rank 0 logs.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"train takes a TrainConfig, got {type(config).__name__}: build it with "
            "TrainConfig(...) or TrainConfig.from_dict(options)"
        )
    cfg = config
    cfg.validate()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file; expected a directory")
    # under torchrun the group lives for this call; the model, DDP wrapper and optimizer live
    # in _train's frame, so they are gone before the group is destroyed
    with distributed.process_group(cfg.device):
        return _train(cfg, out, resume, progress, dataset, log, keep_checkpoint, stop_after_epochs)


def _train(
    cfg: TrainConfig,
    out: Path | None,
    resume: bool,
    progress: bool,
    dataset: data_mod.Dataset | None,
    log: Callable[[str], None] | None,
    keep_checkpoint: bool,
    stop_after_epochs: int | None,
) -> dict[str, Any]:
    """The body of :func:`train`, inside the process group."""
    ds = dataset if dataset is not None else load_dataset(cfg)
    train_split, test_split = splits(cfg, ds)
    run = _prepare(cfg, ds.num_classes, len(train_split))
    if run.rank != 0:
        progress, log = False, None  # rank 0 logs and writes the record
    if out is not None:  # created only now that the run is known to start
        out.mkdir(parents=True, exist_ok=True)
    ckpt = RunCheckpoint(out, cfg, run.sharded, writer=run.rank == 0) if out is not None else None
    history: list[dict[str, Any]] = []
    start_epoch, elapsed, position = 0, 0.0, None
    if resume and ckpt is not None and ckpt.exists():
        history, start_epoch, elapsed, position = ckpt.load(run.model, run.opt, run.sched)
    exact_mask = ds.test_exact[: len(test_split)] if ds.test_exact is not None else None
    test_inputs = eval_inputs(test_split, ds.name, cfg.model == "mlp", cfg.device)
    end_epoch = (
        cfg.epochs
        if stop_after_epochs is None
        else min(cfg.epochs, start_epoch + stop_after_epochs)
    )
    with _stop_requests(ckpt is not None) as stop:
        history, elapsed = _epochs(
            run, ckpt, ds, (train_split, test_split, test_inputs, exact_mask), history,
            range(start_epoch, end_epoch), elapsed, position, progress, log, stop,
        )  # fmt: skip
    result = summarize(cfg, history, elapsed)
    if out is not None and run.rank == 0:
        _write_result(out, result)
    finished = result["diverged"] or len(history) >= cfg.epochs
    if ckpt is not None and finished and not keep_checkpoint:
        ckpt.delete()
    return result


def _epochs(run, ckpt, ds, data, history, epochs, elapsed, position, progress, log, stop):
    """The epochs of :func:`train`; returns ``(history, elapsed)``.  A stop request (SIGTERM,
    SIGINT) ends the current step, saves a checkpoint with the position inside the epoch
    and raises :class:`Preempted`."""
    cfg = run.cfg
    train_split, test_split, test_inputs, exact_mask = data
    sums = _resumed_sums(run, position)
    for epoch in epochs:
        if history and history[-1].get("diverged"):
            break
        t0 = time.perf_counter()
        train_loss, train_acc, stopped = _train_epoch(
            run, train_split, ds.name, epoch, progress, sums, stop
        )
        sums = None
        if stopped is not None:
            elapsed += time.perf_counter() - t0
            ckpt.save(
                run.model, run.opt, run.sched, history, epoch - 1, elapsed,
                _gather_position(run, stopped),
            )  # fmt: skip
            raise Preempted(epoch + 1, stopped.step, stop[0])
        test_acc, test_loss, per_example = evaluate(run.model, *test_inputs)
        record = epoch_record(
            epoch + 1,
            train_loss=train_loss,
            train_acc=train_acc,
            test_loss=test_loss,
            test_acc=test_acc,
            per_example=per_example,
            exact_mask=exact_mask,
            num_classes=ds.num_classes,
        )
        history.append(record)
        elapsed += time.perf_counter() - t0
        if ckpt is not None:
            ckpt.save(run.model, run.opt, run.sched, history, epoch, elapsed)
        if log is not None:
            log(_epoch_line(record, cfg.epochs))
    return history, elapsed


def summarize(cfg: TrainConfig, history: list[dict[str, float]], elapsed: float) -> dict[str, Any]:
    """A run's result record: its configuration and history, the best epoch's test accuracy
    (and the exact-1k accuracy at that epoch), the final accuracy, divergence and wall time."""
    finite = [h for h in history if math.isfinite(h["test_acc"])]
    best = max(finite, key=lambda h: h["test_acc"]) if finite else None
    losses = [h["test_loss"] for h in history if math.isfinite(h["test_loss"])]
    text = {}
    if data_mod.is_text(cfg.dataset):  # the language model's metric: validation loss
        best_loss = min(losses) if losses else math.inf
        text = {"best_test_loss": best_loss, "best_test_bpc": best_loss / math.log(2)}
    return {
        **text,
        "config": cfg.to_dict(),
        "history": history,
        "best_test_acc": best["test_acc"] if best else 0.0,
        "best_epoch": best["epoch"] if best else 0,
        "test_acc_exact": best.get("test_acc_exact") if best else None,
        "final_test_acc": history[-1]["test_acc"] if history else 0.0,
        "diverged": any(h.get("diverged") for h in history),
        "wall_time": elapsed,
    }
