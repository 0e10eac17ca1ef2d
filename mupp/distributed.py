"""SAM under ``torch.distributed``: DistributedDataParallel (two perturbation modes) and FSDP2.

- ``"sync"``: the ascent gradient is averaged across workers as usual, so every worker
  computes the same global ε (SAM on the global batch).
- ``"local"``: the ascent backward runs under ``DDP.no_sync()``: each worker perturbs with its
  own gradient (μP² norms per worker), as in the original SAM's m-sharpness with
  m = per-worker batch.  Cheaper (no all-reduce in the ascent pass) and often generalizes
  better; the perturbation then depends on the number of workers.

The descent gradient is always synchronized.  Non-finite checks are all-reduced inside
:class:`mupp.SAM`, so every worker skips or takes the same step.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every gradient is reduce-scattered in
backward, so the ascent gradient is the global one ("sync"); :class:`mupp.SAM` takes the norms
of whole tensors from the local shards (one all-reduce of the per-tensor squared norms) and
perturbs and restores the shards in place.  Checkpoints of sharded runs go through
``torch.distributed.checkpoint`` (:func:`save_sharded`, :func:`load_sharded`), which also
loads them on another number of ranks.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from .choices import PERTURBATION_SYNCS, PerturbationSync, check_choice
from .optim import SAM, frozen_bn_stats
from .shapes import reattach


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2's ``fully_shard``."""
    return hasattr(model, "set_requires_gradient_sync") and hasattr(model, "reshard")


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` every submodule that owns parameters, then the root; the width
    metadata is re-attached to the sharded parameters (roles and fans keep the global shapes).
    A parameter owned by several modules (a readout tied to the input embedding) is left to
    the root's group, which holds it for both uses.  Build the optimizer after this call:
    sharding replaces the parameters."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if name and own and all(owners[id(p)] == 1 for p in own):
            fully_shard(module)
    fully_shard(model)
    return reattach(model)


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Initialize the process group when launched by ``torchrun`` (it sets ``WORLD_SIZE``,
    also for one process): gloo on CPU, NCCL on CUDA.  Returns ``(rank, world_size)``."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[tuple[int, int]]:
    """:func:`init_from_env` for the length of a ``with`` block, yielding ``(rank,
    world_size)``; a group this call created is destroyed on the way out.

    Models sharded by FSDP2 and DDP wrappers hold the group (through their device mesh or
    reducer), often in reference cycles: left to interpreter shutdown, the group's worker
    threads are torn down after Python and the process aborts ("terminate called without an
    active exception").  So on the way out garbage is collected first, then the group is
    destroyed while the interpreter is whole.  Objects created inside the block should not
    outlive it (run the work in a function called inside the block)."""
    created = not (dist.is_available() and dist.is_initialized())
    ranks = init_from_env(device)
    try:
        yield ranks
    finally:
        if created and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def sam_passes(
    model: nn.Module,
    opt: SAM,
    loss_fn: Callable[[], torch.Tensor],
    mode: PerturbationSync = "sync",
) -> torch.Tensor:
    """One SAM step on a (possibly DDP-wrapped) model: ascent pass, perturbation, descent
    pass with BatchNorm statistics frozen, restore and base step.  Returns the first loss.
    A step that needs no ascent gradient (``ascent="momentum"``, the steps between the full
    steps of ``every=k``: :attr:`mupp.SAM.needs_ascent_gradient`) takes one pass, after
    :meth:`~mupp.SAM.first_step`, and returns its loss."""
    check_choice("mode", mode, PERTURBATION_SYNCS)
    if mode == "local" and is_fsdp(model):
        raise ValueError(
            "perturbation_sync='local' is not available under FSDP2: fully_shard reduce-"
            "scatters every gradient in backward, and without that sync each rank would hold an "
            "unsharded local gradient that does not match its parameter shards; use 'sync' "
            "(SAM on the global batch) or DistributedDataParallel for m-sharpness"
        )
    if not opt.needs_ascent_gradient:
        opt.first_step(zero_grad=True)
        try:
            loss = loss_fn()
            loss.backward()
        except BaseException:
            opt.restore()
            raise
        opt.second_step(zero_grad=True)
        return loss
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    local = mode == "local" and is_ddp
    # outside DDP, unperturbed parameters skip their ascent gradients (last-layer SAM: Remark 3)
    ctx = model.no_sync() if local else contextlib.nullcontext() if is_ddp else opt.ascent_pass()
    with ctx:
        loss = loss_fn()
        loss.backward()
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        loss_fn().backward()
    opt.second_step(zero_grad=True)
    return loss


def save_sharded(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> None:
    """Save a sharded model and its optimizer with ``torch.distributed.checkpoint`` into the
    directory ``path`` (every rank writes its shards; call on every rank).  ``extra`` holds
    tensors saved beside them (replicated: e.g. the RNG state).  For :class:`mupp.SAM` the
    base optimizer's state and the shared param groups (with SAM's keys) are saved."""
    opt = getattr(optimizer, "base_optimizer", optimizer)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, **extra}, checkpoint_id=str(path))


def load_sharded(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> dict:
    """Load what :func:`save_sharded` wrote, resharding to this run's ranks; fills ``extra``
    (a dict of tensors of the right shapes) in place and returns it."""
    opt = getattr(optimizer, "base_optimizer", optimizer)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, **extra}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for k in extra:
        extra[k] = state[k]
    return extra
