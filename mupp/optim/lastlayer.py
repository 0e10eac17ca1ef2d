"""Last-layer SAM at the cost of SGD: one forward, one backward (paper Remark 3).

When only the readout is perturbed (``variant="last-layer"``; μP-global SAM becomes it at large
width, Prop. 2), the layers below the readout have the same weights in both SAM passes, so their
activations are the same and the second forward below the readout is wasted.  The step here:

1. one forward, capturing the readout's input ``h`` (a forward hook);
2. the readout's ascent gradient from ``h`` alone: ``autograd.grad`` of the loss with respect to
   the readout's parameters only, which never enters the network below ``h``;
3. ``ε`` by the optimizer's own rule (:meth:`mupp.SAM.first_step`);
4. the loss at ``W_L + ε`` on the same ``h``: the readout applied again, ``h`` still attached to
   the network's graph;
5. one backward through everything, then :meth:`mupp.SAM.second_step`.

It applies where the readout module's output is the model's output (mupp's models: the output
multiplier lives in the readout), which :class:`LastLayerStep` verifies at its first step; else
it falls back to the two-pass step.  Dropout and BatchNorm then see one forward per step, where
two-pass SAM runs two (BatchNorm statistics update once; dropout masks are shared by the passes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..shapes import get_info, reattach
from .sam import SAM


def readout_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The last module whose ``weight`` has the readout's role (``None`` when there is none)."""
    if getattr(model, "_mupp_shapes", None):
        reattach(model)
    found = None
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter):
            info = get_info(w)
            if info is not None and info.role == "output":
                found = (name, mod)
    return found


class LastLayerStep:
    """One last-layer SAM step with the first pass's features reused (see the module docstring).

    ``step(inputs, targets, loss_fn)`` takes a whole SAM step (gradients zeroed afterwards) and
    returns the loss at ``W`` (before the perturbation) and the model output.  ``fast`` tells whether the last call took the
    one-pass path; ``False`` after a fallback (the reason is in ``fallback_reason``).
    """

    def __init__(self, model: nn.Module, opt: SAM) -> None:
        if not isinstance(opt, SAM) or opt.variant != "last-layer":
            raise ValueError("LastLayerStep needs a mupp.SAM with variant='last-layer'")
        self.model, self.opt = model, opt
        found = readout_module(model)
        self.readout = found[1] if found else None
        self.fallback_reason = None if found else "the model has no readout with width metadata"
        self._verified = False
        self.fast = False

    def _two_pass(self, forward: Callable[[], torch.Tensor], loss_fn, targets) -> tuple:
        kept = {}

        def closure():
            out = forward()
            kept.setdefault("out", out.detach())
            loss = loss_fn(out, targets)
            loss.backward()
            return loss

        loss = self.opt.step(closure)
        self.opt.zero_grad()
        self.fast = False
        return loss, kept["out"]

    def step(
        self,
        inputs: Any,
        targets: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One last-layer SAM step on ``(inputs, targets)``: one forward to the readout's
        input, the readout's ascent gradient and ε from it, the loss at ``W_out + ε`` on the
        same features, one backward, the base step (Remark 3).  Falls back to two passes
        where the readout is not the model's last operation.  Returns ``(loss at W, logits
        at W)``."""

        def forward():
            return self.model(inputs)

        if self.readout is None:
            return self._two_pass(forward, loss_fn, targets)
        seen: dict[str, Any] = {}

        def hook(mod, args, out):
            seen["h"], seen["out"] = args[0], out

        handle = self.readout.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                out = self.model(inputs)
        finally:
            handle.remove()
        if not self._verified:
            if out is not seen.get("out") or len(seen) != 2:
                self.readout = None
                self.fallback_reason = (
                    "the readout's output is not the model's output (an operation follows it)"
                )
                self.opt.zero_grad()
                return self._two_pass(forward, loss_fn, targets)
            self._verified = True
        params = [p for p in self.readout.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = loss_fn(out, targets)
            grads = torch.autograd.grad(loss, params, retain_graph=False)
        for p, g in zip(params, grads):
            p.grad = g
        self.opt.first_step(zero_grad=True)  # perturbs the readout only (variant last-layer)
        try:
            with torch.enable_grad():
                loss_fn(self.readout(seen["h"]), targets).backward()
        except BaseException:
            self.opt.restore()
            raise
        self.opt.second_step(zero_grad=True)
        self.fast = True
        return loss.detach(), out.detach()
