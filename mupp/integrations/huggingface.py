"""SAM in the Hugging Face ``transformers.Trainer``: :class:`SAMTrainer`.

The stock Trainer runs one forward/backward per micro-batch and then ``optimizer.step()``; SAM
needs a second pass at the perturbed weights ``W + ε`` (paper Sec. 1).  ``SAMTrainer`` runs both
passes in ``training_step``:

1. the ascent pass: the gradient of this micro-batch's loss at ``W``;
2. ``first_step``: ``W <- W + ε`` (μP² scaling per layer, as configured on the :class:`~mupp.SAM`);
3. the descent pass: the Trainer's own forward/backward at ``W + ε`` (its loss scaling for
   gradient accumulation included), added to the descent gradients of earlier micro-batches.

On the last micro-batch of an accumulation cycle the weights stay perturbed; the Trainer then
clips the descent gradient (``max_grad_norm``) and calls ``optimizer.step()``, which completes
SAM's step: exact restore of ``W``, then the base optimizer's step (skipped, weights restored,
when a gradient is non-finite).  Earlier micro-batches restore ``W`` right away.

Gradient accumulation therefore means m-sharpness: every micro-batch gets its own ε from its
own gradient (m = the micro-batch size), and the base step uses the accumulated descent
gradients.  The ascent gradient is never clipped (the normalized rules do not depend on its
size).  The logged training loss is the loss at ``W``, before the perturbation.
Under several processes the ascent pass of a micro-batch that does not synchronize
(accumulation) yields a per-worker ε; test your setup against one process.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from ..optim import SAM

__all__ = ["SAMTrainer"]


class SAMTrainer(transformers.Trainer):
    """A drop-in ``transformers.Trainer`` whose training step runs SAM's two passes.

    Pass the optimizer as usual, ``optimizers=(mupp.SAM(model.parameters(), torch.optim.AdamW,
    lr=..., rho=..., ...), None)``, or give ``sam_kwargs`` (``rho``, ``parameterization``,
    ``rule``, ``variant``, ...) and let the Trainer build ``mupp.SAM`` over ``torch.optim.AdamW``
    with ``learning_rate``, ``weight_decay`` and the Adam betas of its ``TrainingArguments``.
    """

    def __init__(self, *args: Any, sam_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        self.sam_kwargs = dict(sam_kwargs or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """``mupp.SAM`` over AdamW from ``TrainingArguments`` and ``sam_kwargs``, unless an
        optimizer was passed."""
        if self.optimizer is None:
            if "rho" not in self.sam_kwargs:
                raise ValueError(
                    "SAMTrainer needs a SAM: pass optimizers=(mupp.SAM(...), None) or "
                    "sam_kwargs={'rho': ..., ...}"
                )
            args = self.args
            self.optimizer = SAM(
                (model or self.model).parameters(),
                torch.optim.AdamW,
                lr=args.learning_rate,
                weight_decay=args.weight_decay,
                betas=(args.adam_beta1, args.adam_beta2),
                **self.sam_kwargs,
            )
        return self.optimizer

    @property
    def sam(self) -> SAM:
        """The :class:`mupp.SAM` behind the Trainer's (possibly wrapped) optimizer."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, SAM):
            opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise TypeError(
                f"SAMTrainer needs a mupp.SAM optimizer; got {type(self.optimizer).__name__}"
            )
        return opt

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Ascent pass, ``first_step``, then the Trainer's own forward/backward at ``W + ε``."""
        sam = self.sam
        params = [p for g in sam.param_groups for p in g["params"]]
        earlier = {p: p.grad for p in params if p.grad is not None}  # accumulated descent grads
        for p in earlier:
            p.grad = None
        model.train()
        ascent_inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss_at_w = self.compute_loss(model, ascent_inputs)
        if self.args.n_gpu > 1:
            loss_at_w = loss_at_w.mean()
        self.accelerator.backward(loss_at_w)
        sam.first_step(zero_grad=True)
        try:
            super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            sam.restore()
            raise
        with torch.no_grad():
            for p, g in earlier.items():
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        if not self.accelerator.sync_gradients:
            sam.restore()  # the next micro-batch perturbs W afresh (m-sharpness)
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return loss_at_w.detach() / (steps or self.args.gradient_accumulation_steps)
