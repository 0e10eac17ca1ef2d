"""Train K configurations of one MLP at once (batched weights, batched GEMMs).

Configurations of a group differ only in ``lr``, ``rho`` and ``seed``: same model, width,
parameterization, variant and rule.  Each seed has its own initialization and data order,
exactly as its sequential run; configurations that share a seed share every data batch.  Each configuration's
SAM norms are its own.  The per-parameter factors (μP learning rates, perturbation numerator and
denominator) are read from a :class:`mupp.SAM` built on the template model, so the scaling is
decided in one place.  The update replicates ``torch.optim.SGD`` (momentum, dampening 0,
Nesterov, coupled weight decay) and ``LambdaLR``; a configuration whose gradient is non-finite
skips that step, as :class:`mupp.SAM` does.  The SAM scales come from
:func:`mupp.optim.perturbation.scales`, the function :class:`mupp.SAM` uses.

The first layer, whose input the configurations of one seed share, is where the cost lies
(d_in = 3072 on CIFAR).  Its gradient ``g_k = δ_k^T x`` (``δ_k = ∂L_k/∂(x W_k^T)``) has rank ≤ batch size, so
SAM's ascent never materializes it: ``||g_k||² = <δ_k, G δ_k>`` and the perturbed product
``x (W_k + s_k g_k)^T = x W_k^T + s_k G δ_k`` follow from the batch's Gram matrix ``G = x x^T``.
Per step that leaves two GEMMs over the stacked first-layer weights (forward, and the descent
gradient accumulated straight into the momentum buffer) where sequential SAM runs do four, and
no parameter-sized ε at all for that layer (with several seeds, ``x``, ``G`` and the products
are per configuration: batched GEMMs).  The training split lives on the group's device and a
step synchronizes nothing with the host on CUDA (the per-epoch records do).  Results equal
sequential :func:`mupp.lab.train.train` runs to float tolerance (batched matmuls sum in
another order).  No checkpoints: a killed group re-runs from the start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..optim import SAM
from ..optim.perturbation import scales
from . import data as data_mod
from .config import TrainConfig, make_model
from .train import epoch_batches, epoch_record, lr_lambda, splits, steps_per_epoch, summarize

VARYING = ("lr", "rho", "seed")
DIRECTION_VARIANTS = ("sam", "last-layer", "first-layer", "sam-on")


def supports(cfg: TrainConfig) -> bool:
    """Whether a configuration can join a vectorized group: the MLP with SGD and a variant
    whose ascent direction is the gradient (:data:`DIRECTION_VARIANTS`), two passes every step
    (not the cheap options ``ascent``/``every``)."""
    two_pass = cfg.ascent == "gradient" and cfg.every == 1
    return (
        cfg.model == "mlp"
        and cfg.optimizer == "sgd"
        and cfg.variant in DIRECTION_VARIANTS
        and two_pass
    )


def group_key(cfg: TrainConfig) -> str:
    """Configurations with equal keys can train together (they differ only in :data:`VARYING`)."""
    return json.dumps(
        {k: v for k, v in sorted(cfg.to_dict().items()) if k not in VARYING},
        sort_keys=True,
        default=str,
    )


class _Group:
    """K copies of one MLP's parameters, stacked along dim 0, with their SGD state.

    The per-parameter factors (μP learning rate, weight decay, perturbation numerator and
    denominator, whether perturbed) are read from a :class:`mupp.SAM` built on the template
    model with ``lr = 1``: the scaling is decided in one place."""

    def __init__(self, cfgs: list[TrainConfig], model: torch.nn.Module, dev: torch.device) -> None:
        self.cfg, self.model, self.K, self.dev = cfgs[0], model, len(cfgs), dev
        self.names = [n for n, _ in model.named_parameters()]
        if self.names[0] != "layers.0.weight":  # the only parameter that sees the shared input
            raise ValueError(f"unexpected MLP parameter order: {self.names}")
        self.first, self.rest = self.names[0], self.names[1:]
        template = SAM(
            model.parameters(),
            torch.optim.SGD,
            lr=1.0,
            rho=1.0,
            parameterization=self.cfg.parameterization,
            rule=self.cfg.rule,
            variant=self.cfg.variant,
            weight_decay=self.cfg.weight_decay,
        )
        group_of = {id(p): g for g in template.param_groups for p in g["params"]}
        fac = {n: group_of[id(p)] for n, p in model.named_parameters()}
        self.lr_fac = {n: fac[n]["lr"] for n in self.names}  # lr=1: the μP factor
        self.wd = {n: fac[n]["weight_decay"] for n in self.names}
        self.pert_names = [n for n in self.names if fac[n]["perturb"]]
        self.num = torch.tensor([fac[n]["pert_num"] for n in self.pert_names], device=dev)
        self.den = torch.tensor([fac[n]["pert_den"] for n in self.pert_names], device=dev)
        # every configuration starts from its own seed's initialization
        inits = {}
        for c in cfgs:
            if c.seed not in inits:
                torch.manual_seed(c.seed)
                inits[c.seed] = dict(make_model(c, model_outputs(model)).named_parameters())
        self.theta = {
            n: torch.stack([inits[c.seed][n].detach().to(dev) for c in cfgs]).clone()
            for n in self.names
        }
        self.seeds = sorted(inits)
        # which seed's batch each configuration reads (None: one seed, one shared batch)
        self.batch_index = (
            None
            if len(self.seeds) == 1
            else torch.tensor([self.seeds.index(c.seed) for c in cfgs], device=dev)
        )
        self.sync_free = dev.type == "cuda"  # on CUDA no step may wait for the host
        self.bufs: dict[str, torch.Tensor | None] = {n: None for n in self.names}
        self.lrs = torch.tensor([c.lr for c in cfgs], device=dev)
        self.rhos = torch.tensor([c.rho for c in cfgs], device=dev)
        self.use_sam = self.rhos > 0
        self.any_sam = any(c.rho > 0 for c in cfgs)  # known on the host: no sync to test it

    def shaped(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A per-configuration vector ``v`` (K,) viewed to broadcast against ``t`` (K, ...)."""
        return v.view(self.K, *([1] * (t.ndim - 1)))

    def first_layer(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """``x W_k^T`` for every configuration: a shared batch (B, d_in) as one GEMM, or one
        batch per configuration (K, B, d_in) as a batched GEMM -> (K, B, n)."""
        w = self.theta[self.first] if w is None else w
        if x.ndim == 3:
            return torch.bmm(x, w.transpose(1, 2))
        return (x @ w.reshape(-1, w.shape[-1]).T).view(x.shape[0], self.K, -1).transpose(0, 1)

    def gather(self, by_seed: list[tuple[torch.Tensor, torch.Tensor]]):
        """The step's ``(x, y)``: the shared batch, or every configuration's seed's batch
        stacked (K, B, ...)."""
        if self.batch_index is None:
            return by_seed[0]
        x = torch.stack([b[0] for b in by_seed]).index_select(0, self.batch_index)
        y = torch.stack([b[1] for b in by_seed]).index_select(0, self.batch_index)
        return x, y

    def head(self, params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """The MLP's forward from the first layer's product ``z = x W_1^T``: -> (K, B, d_out)."""
        model, h = self.model, z
        if model.layers[0].bias is not None:
            h = h + params["layers.0.bias"].unsqueeze(1)
        h = h * model.input_mult
        for i in range(1, len(model.layers)):
            h = torch.bmm(model.act(h), params[f"layers.{i}.weight"].transpose(1, 2))
            if model.layers[i].bias is not None:
                h = h + params[f"layers.{i}.bias"].unsqueeze(1)
        return h * model.output_mult

    def grads(self, params: dict[str, torch.Tensor], z: torch.Tensor, y: torch.Tensor):
        """Gradients of every configuration's loss (they are independent, so the gradient of
        the summed loss is each one's own) with respect to the parameters after the first
        layer and to ``z``; the first layer's weight gradient is ``δ_k^T x`` with ``δ = ∂L/∂z``.
        Returns ``(δ, {name: grad}, losses (K,), logits)``."""
        leaves = {n: params[n].detach().requires_grad_(True) for n in self.rest}
        z = z.detach().requires_grad_(True)
        logits = self.head(leaves, z)
        losses = (
            F.cross_entropy(
                logits.flatten(0, 1),
                y.flatten() if y.ndim == 2 else y.repeat(self.K),
                label_smoothing=self.cfg.label_smoothing,
                reduction="none",
            )
            .view(self.K, -1)
            .mean(1)
        )  # each configuration's mean loss, in one kernel
        grads = torch.autograd.grad(losses.sum(), [z] + [leaves[n] for n in self.rest])
        return grads[0], dict(zip(self.rest, grads[1:])), losses.detach(), logits.detach()

    def ascent(self, x, y, z, delta, g1):
        """SAM's second gradient at ``W + ε`` for every configuration (``rho = 0`` gives
        ``ε = 0``: its second gradient is its first) and which configurations may step.

        The first layer never materializes its gradient δ^T x (K copies of n x d_in):
        ``||δ_k^T x||_F^2 = <δ_k, G δ_k>`` and ``x (W_k + s_k δ_k^T x)^T = z_k + s_k G δ_k``,
        with the batch's Gram matrix ``G = x x^T`` shared by all configurations."""
        gram_delta = torch.matmul(torch.matmul(x, x.transpose(-1, -2)), delta)
        sq = {self.first: (delta * gram_delta).sum((1, 2))}
        sq.update({n: g1[n].pow(2).flatten(1).sum(1) for n in self.rest})
        finite1 = torch.isfinite(torch.stack(list(sq.values()))).all(0)
        norms = torch.stack([sq[n] for n in self.pert_names]).sqrt()
        s, _ = scales(
            self.cfg.rule,
            norms,
            self.num.unsqueeze(1),
            self.den.unsqueeze(1),
            self.rhos.unsqueeze(0),
        )
        s = dict(zip(self.pert_names, s))
        z2 = z + self.shaped(s[self.first], z) * gram_delta if self.first in s else z
        perturbed = {
            n: self.theta[n] + self.shaped(s[n], g1[n]) * g1[n] if n in s else self.theta[n]
            for n in self.rest
        }
        delta, g, _, _ = self.grads(perturbed, z2, y)
        finite2 = torch.stack(
            [torch.isfinite(delta).flatten(1).all(1)]
            + [torch.isfinite(g[n]).flatten(1).all(1) for n in self.rest]
        ).all(0)
        # SAM skips non-finite steps; the plain base optimizer (rho = 0) does not
        ok = torch.where(self.use_sam, finite1 & finite2, torch.ones_like(finite1))
        return delta, g, ok

    def update(self, x, delta, g, ok, lr_scale: float) -> None:
        """``torch.optim.SGD``'s step (momentum, dampening 0, Nesterov, coupled weight decay)
        for every configuration whose ``ok`` is set, at learning rate ``lr · lr_scale``."""
        # the common case updates in place, without masks; on CUDA the mask is always applied
        # (asking whether every configuration may step would wait for the device)
        cfg = self.cfg
        all_ok = False if self.sync_free else bool(ok.all())
        for n in self.names:
            theta = self.theta[n]
            step_lr = self.shaped(self.lrs * (self.lr_fac[n] * lr_scale), theta)
            if n == self.first and cfg.momentum and not cfg.nesterov and all_ok and x.ndim == 2:
                # the momentum step with the gradient GEMM accumulating straight into the
                # buffer: buf = μ buf + δ^T x (+ wd W); W -= lr buf
                if self.bufs[n] is None:
                    self.bufs[n] = torch.zeros_like(theta)
                self.bufs[n].view(-1, theta.shape[-1]).addmm_(
                    delta.transpose(1, 2).reshape(-1, x.shape[0]), x, beta=cfg.momentum
                )
                if self.wd[n]:
                    self.bufs[n].add_(theta, alpha=self.wd[n])
                theta.addcmul_(self.bufs[n], step_lr, value=-1.0)
                continue
            d_p = torch.matmul(delta.transpose(1, 2), x) if n == self.first else g[n]
            if self.wd[n]:
                d_p = d_p.add(theta, alpha=self.wd[n])
            if cfg.momentum:
                # torch.optim.SGD: the buffer starts as a copy of d_p; a zero buffer for a
                # configuration that skipped its first step gives exactly that later
                if self.bufs[n] is None:
                    self.bufs[n] = torch.zeros_like(d_p)
                if all_ok:
                    self.bufs[n].mul_(cfg.momentum).add_(d_p)
                else:
                    new_buf = self.bufs[n] * cfg.momentum + d_p
                    self.bufs[n] = torch.where(self.shaped(ok, new_buf), new_buf, self.bufs[n])
                d_p = d_p.add(self.bufs[n], alpha=cfg.momentum) if cfg.nesterov else self.bufs[n]
            if all_ok:
                theta.addcmul_(d_p, step_lr, value=-1.0)
            else:
                self.theta[n] = torch.where(self.shaped(ok, d_p), theta - step_lr * d_p, theta)

    @torch.no_grad()
    def evaluate(self, split: data_mod.Split, name: str):
        """``(test loss (K,), per-example correctness (K, N))`` on ``split``."""
        outs = [
            self.head(self.theta, self.first_layer(xb))
            for xb, _ in data_mod.batches(
                split, 500, shuffle=False, name=name, flatten=True, device=self.dev
            )
        ]
        logits = torch.cat(outs, 1)
        yt = split.y.to(self.dev)
        loss = torch.stack([F.cross_entropy(logits[k], yt) for k in range(self.K)])
        return loss, logits.argmax(-1) == yt


def model_outputs(model: torch.nn.Module) -> int:
    """The MLP's number of outputs (its readout's ``out_features``)."""
    return model.layers[-1].out_features


def _check_group(cfgs: list[TrainConfig]) -> None:
    if not cfgs:
        raise ValueError("configs is empty")
    if len({group_key(c) for c in cfgs}) != 1:
        raise ValueError(f"configs must differ only in {VARYING}")
    if not all(supports(c) for c in cfgs):
        raise ValueError(
            "vectorized training supports the MLP with SGD and variants " + str(DIRECTION_VARIANTS)
        )


def train_group(
    configs: Sequence[TrainConfig],
    dataset: data_mod.Dataset | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train the configurations together; returns one result record per configuration
    (:func:`mupp.lab.train.summarize`; ``wall_time`` is the group's, divided by K)."""
    cfgs = list(configs)
    _check_group(cfgs)
    cfg = cfgs[0]
    ds = dataset if dataset is not None else data_mod.load(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    train_split, test_split = splits(cfg, ds)
    steps = steps_per_epoch(cfg, len(train_split))
    dev = torch.device(cfg.device)
    train_split = data_mod.Split(train_split.x.to(dev), train_split.y.to(dev))  # once, not per step
    test_split = data_mod.Split(test_split.x.to(dev), test_split.y.to(dev))
    torch.manual_seed(cfg.seed)
    group = _Group(cfgs, make_model(cfg, ds.num_classes).to(dev), dev)
    by_seed = {s: next(c for c in cfgs if c.seed == s) for s in group.seeds}
    K, lam = group.K, lr_lambda(cfg, steps)
    histories: list[list[dict[str, Any]]] = [[] for _ in range(K)]
    alive = [True] * K
    exact_mask = ds.test_exact[: len(test_split)] if ds.test_exact is not None else None
    step, t_start = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        if not any(alive):
            break
        loss_sum = torch.zeros(K, device=dev)
        correct = torch.zeros(K, device=dev)
        seen = 0
        streams = [epoch_batches(by_seed[s], train_split, ds.name, epoch) for s in group.seeds]
        for batches in zip(*streams):
            x, y = group.gather(list(batches))
            z = group.first_layer(x)
            delta, g, loss, logits = group.grads(group.theta, z, y)
            loss_sum += loss * y.shape[-1]
            correct += (logits.argmax(-1) == y).sum(-1).float()
            seen += y.shape[-1]
            ok = torch.ones(K, dtype=torch.bool, device=dev)  # plain SGD does not skip
            if group.any_sam:
                delta, g, ok = group.ascent(x, y, z, delta, g)
            group.update(x, delta, g, ok, lam(step))
            step += 1
        test_loss, per_example = group.evaluate(test_split, ds.name)
        train_loss = loss_sum / max(seen, 1)
        for k in range(K):
            if not alive[k]:
                continue
            rec = epoch_record(
                epoch + 1,
                train_loss=train_loss[k].item(),
                train_acc=(correct[k] / max(seen, 1)).item(),
                test_loss=test_loss[k].item(),
                test_acc=per_example[k].float().mean().item(),
                per_example=per_example[k],
                exact_mask=exact_mask,
                num_classes=ds.num_classes,
            )
            alive[k] = not rec.get("diverged")
            histories[k].append(rec)
    elapsed = (time.perf_counter() - t_start) / K  # amortized
    return [summarize(c, h, elapsed) for c, h in zip(cfgs, histories)]
