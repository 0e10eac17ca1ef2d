"""Hugging Face ``transformers``: μP models (:func:`prepare`, :func:`restore`) and SAM in the
``Trainer`` (:class:`SAMTrainer`).

**prepare.** ``mupp.set_base_shapes`` alone does not make a transformer μP: a stock GPT-2 or
Llama keeps its ``1/sqrt(d_head)`` attention, a readout without the ``1/m`` output multiplier
(and, tied to the embedding, classified as input-like with nothing said) and a fixed init std,
so its logits grow with width.  :func:`prepare` does the rest
through transformers' own extension points, with no model code copied: the attention modules'
``scaling`` attribute (what they pass to every registered attention function), a forward hook
on the output embeddings, and the model's own init rescaled.

**SAMTrainer.** The stock Trainer runs one forward/backward per micro-batch and then
``optimizer.step()``; SAM needs a second pass at the perturbed weights ``W + ε`` (paper Sec. 1).
``SAMTrainer`` runs both passes in ``training_step``:

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

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from .. import shapes
from ..init import mup_init_
from ..optim import SAM

__all__ = ["SAMTrainer", "prepare", "restore"]

# ---------------------------------------------------------------------------------------------
# prepare / restore
# ---------------------------------------------------------------------------------------------

_CONFIG_KEY = "mupp"  # model.config.mupp: what restore() needs after from_pretrained


@dataclass
class _Plan:
    """Everything :func:`prepare` will change, computed before anything is changed."""

    records: dict[str, shapes.WidthInfo]
    scaling: dict[str, float]  # attention module name -> its μP scaling
    readout: str  # the output embeddings' module name
    tied: bool
    output_mult: float


def _output_mult_hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """The readout's μP output multiplier ``1/m`` (mup's ``MuReadout``), as a forward hook."""
    return output * module._mupp_output_mult


def _check_model(model: Any, what: str) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"{what} must be a transformers.PreTrainedModel (e.g. GPT2LMHeadModel, "
            f"LlamaForCausalLM); got {type(model).__name__}"
        )


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules: those with a numeric ``scaling`` and ``head_dim`` (the scaling
    they pass to transformers' attention functions)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, "scaling", None), (int, float))
        and isinstance(getattr(mod, "head_dim", None), int)
    }


def _readout_name(model: transformers.PreTrainedModel) -> tuple[str, bool]:
    """``(name of the output embeddings, whether their weight is the input embedding's)``."""
    out = model.get_output_embeddings()
    if out is None or not isinstance(getattr(out, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is "
            "None): prepare needs a language model with a readout (…ForCausalLM, …LMHeadModel)"
        )
    name = next(n for n, m in model.named_modules() if m is out)
    inp = model.get_input_embeddings()
    return name, inp is not None and out.weight is inp.weight


def _query_weights(attn: nn.Module, name: str) -> list[torch.Tensor]:
    """Views of one attention module's query weights (and biases), to be zeroed (App. G)."""
    if isinstance(getattr(attn, "q_proj", None), nn.Linear):  # Llama, Mistral, Qwen2, ...
        q = attn.q_proj
        return [q.weight] + ([q.bias] if q.bias is not None else [])
    c_attn = getattr(attn, "c_attn", None)
    if c_attn is not None and shapes._is_hf_conv1d(c_attn):  # GPT-2: Conv1D (in, 3 * embed)
        if getattr(attn, "is_cross_attention", False):
            return [attn.q_attn.weight, attn.q_attn.bias]
        return [c_attn.weight[:, : attn.split_size], c_attn.bias[: attn.split_size]]
    raise ValueError(
        f"{name}: no query projection found (q_proj, or GPT-2's c_attn): pass zero_init=False "
        "to keep the model's query init"
    )


def _plan(model: Any, base: Any, delta: Any, zero_init: bool) -> _Plan:
    _check_model(model, "model")
    for what, other in (("base", base), ("delta", delta)):
        if other is None and what == "delta":
            continue
        _check_model(other, what)
        if type(other) is not type(model):
            raise ValueError(
                f"{what} is a {type(other).__name__} and the model a {type(model).__name__}: "
                f"build {what} with the model's class and config at another width (on the meta "
                "device: free)"
            )
    if getattr(model.config, _CONFIG_KEY, None):
        raise ValueError(
            "the model is already prepared (model.config.mupp is set); after from_pretrained "
            "call mupp.integrations.huggingface.restore(model)"
        )
    readout, tied = _readout_name(model)
    overrides = None if tied else {f"{readout}.weight": {"multiplier": 1.0}}
    records = shapes.infer_base_shapes(model, base, delta, overrides)
    attn, base_attn = _attention_modules(model), _attention_modules(base)
    if not attn:
        raise ValueError(
            f"{type(model).__name__}: no attention modules with a scaling attribute (and "
            "head_dim) found; prepare supports transformers' GPT-2 and Llama families (and "
            "models whose attention modules pass self.scaling to their attention function)"
        )
    if set(attn) != set(base_attn):
        raise ValueError(
            "base has other attention modules than the model: build it with the same depth"
        )
    scaling = {
        n: base_attn[n].scaling * base_attn[n].head_dim / m.head_dim for n, m in attn.items()
    }
    if zero_init:
        for n, m in attn.items():
            _query_weights(m, n)  # raises before anything changes
    # the readout's width multiplier: from its own record or, tied, from the embedding's
    head = model.get_output_embeddings().weight
    info = next(records[shapes.strip_prefixes(n)] for n, p in model.named_parameters() if p is head)
    return _Plan(records, scaling, readout, tied, 1.0 / info.width_mult)


def _apply(model: nn.Module, plan: _Plan) -> None:
    """Attach the base shapes, the attention scaling and the readout multiplier."""
    shapes.attach_base_shapes(model, plan.records)
    modules = dict(model.named_modules())
    for name, s in plan.scaling.items():
        modules[name].scaling = s
    head = modules[plan.readout]
    head._mupp_output_mult = plan.output_mult
    if not any(h is _output_mult_hook for h in head._forward_hooks.values()):
        head.register_forward_hook(_output_mult_hook)


def prepare(
    model: transformers.PreTrainedModel,
    base: transformers.PreTrainedModel,
    delta: transformers.PreTrainedModel | None = None,
    *,
    zero_init: bool = True,
) -> transformers.PreTrainedModel:
    """Make a Hugging Face language model μP, and μP²-ready for :class:`mupp.SAM` (App. F.5-F.7,
    App. G).  Supports the GPT-2 and Llama families (Llama covers the
    Mistral/Qwen2 layouts: grouped-query attention, SwiGLU, RMSNorm, tied or untied head).

    ``base`` and ``delta`` are the same class at other widths (as in
    :func:`mupp.set_base_shapes`; build them on ``torch.device("meta")``).  ``prepare``:

    - sets the base shapes;
    - sets every attention module's ``scaling`` to ``1/d_head``, written as
      ``base_scaling · base_d_head / d_head`` so that it is the model's own at base width;
    - multiplies the output embeddings' output by ``1/m`` (a forward hook; mup's
      ``MuReadout``).  An untied readout is output-like with the weight multiplier ``a = 1``
      recorded, so its Adam learning rate is width-independent, its init stays the base's
      std and its μP² exponent is Lemma F.12 (b)'s.  A readout tied to the input embedding
      (mup's ``MuSharedReadout``) keeps the embedding's input-like role, learning rate and
      exponent: with the ``1/m`` multiplier the gradients of both uses scale alike;
    - rescales the model's init to μP (hidden weights' variance ``∝ 1/fan_in``, equal to the
      model's own at base width: :func:`mupp.mup_init_` without a default-init assumption);
    - with ``zero_init``, zeroes the untied readout and the query projections (App. G).

    Nothing is changed when an error is raised.  The settings are recorded in
    ``model.config.mupp``, which ``save_pretrained`` writes; after ``from_pretrained`` call
    :func:`restore`.  Returns ``model``.
    """
    plan = _plan(model, base, delta, zero_init)
    _apply(model, plan)
    with torch.no_grad():
        mup_init_(model, readout_zero=zero_init, assume_default_init=False)
        if zero_init:
            for name, attn in _attention_modules(model).items():
                for t in _query_weights(attn, name):
                    t.zero_()
    setattr(
        model.config,
        _CONFIG_KEY,
        {
            "base_shapes": shapes.base_shapes_table(model),
            "readout": plan.readout,
            "tied": plan.tied,
            "output_mult": plan.output_mult,
            "attention_scaling": plan.scaling,
            "zero_init": zero_init,
        },
    )
    return model


def restore(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Re-apply what :func:`prepare` recorded in ``model.config.mupp`` (base shapes, attention
    scaling, readout multiplier) to a model loaded with ``from_pretrained``, or to a fresh
    model built from a prepared model's config; the weights are left as they are.  Returns
    ``model``."""
    _check_model(model, "model")
    rec = getattr(model.config, _CONFIG_KEY, None)
    keys = {"base_shapes", "readout", "tied", "output_mult", "attention_scaling"}
    if not isinstance(rec, dict) or not keys <= set(rec):
        raise ValueError(
            "model.config has no complete mupp record: this model was not prepared; call "
            "mupp.integrations.huggingface.prepare(model, base) instead"
        )
    readout, tied = _readout_name(model)
    attn = _attention_modules(model)
    if (
        readout != rec["readout"]
        or tied != rec["tied"]
        or set(attn) != set(rec["attention_scaling"])
    ):
        raise ValueError(
            "model.config.mupp does not match this model (its readout or attention modules "
            "differ): was the config copied from another architecture?"
        )
    overrides = None if tied else {f"{readout}.weight": {"multiplier": 1.0}}
    base = {k: tuple(v) for k, v in rec["base_shapes"].items()}
    records = shapes.infer_base_shapes(model, base, None, overrides)
    _apply(model, _Plan(records, dict(rec["attention_scaling"]), readout, tied, rec["output_mult"]))
    return model


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
        if not sam.needs_ascent_gradient:  # Momentum-SAM, or between full steps: one pass
            sam.first_step()
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            except BaseException:
                sam.restore()
                raise
            if not self.accelerator.sync_gradients:
                sam.restore()  # the next micro-batch perturbs W afresh
            return loss
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
