"""SAM under ``torch.distributed`` (DistributedDataParallel), with two perturbation modes.

- ``"sync"``: the ascent gradient is averaged across workers as usual, so every worker
  computes the same global ε (SAM on the global batch).
- ``"local"``: the ascent backward runs under ``DDP.no_sync()``: each worker perturbs with its
  own gradient (μP² norms per worker), as in the original SAM's m-sharpness with
  m = per-worker batch.  Cheaper (no all-reduce in the ascent pass) and often generalizes
  better; the perturbation then depends on the number of workers.

The descent gradient is always synchronized.  Non-finite checks are all-reduced inside
:class:`mupp.SAM`, so every worker skips or takes the same step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .optim import SAM, frozen_bn_stats

MODES = ("sync", "local")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Initialize the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``):
    gloo on CPU, NCCL on CUDA.  Returns ``(rank, world_size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def sam_passes(
    model: nn.Module,
    opt: SAM,
    loss_fn: Callable[[], torch.Tensor],
    mode: str = "sync",
) -> torch.Tensor:
    """One SAM step on a (possibly DDP-wrapped) model: ascent pass, perturbation, descent
    pass with BatchNorm statistics frozen, restore and base step.  Returns the first loss."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
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
