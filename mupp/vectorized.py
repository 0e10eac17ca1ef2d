"""Train K configurations of one MLP at once, sharing every data batch (batched weights).

Configurations of a group differ only in ``lr`` and ``rho``: same model, width, seed (so the
same initialization and data order), parameterization, variant and rule.  Each configuration's
SAM norms are its own.  The per-parameter factors (μP learning rates, perturbation numerator and
denominator) are read from a :class:`mupp.SAM` built on the template model, so the scaling is
decided in one place.  The update replicates ``torch.optim.SGD`` (momentum, dampening 0,
Nesterov, coupled weight decay) and ``LambdaLR``; a configuration whose gradient is non-finite
skips that step, as :class:`mupp.SAM` does.  The SAM scales come from
:func:`mupp.optim.perturbation.scales`, the function :class:`mupp.SAM` uses.

The first layer, whose input all configurations share, is where the cost lies (d_in = 3072 on
CIFAR).  Its gradient ``g_k = δ_k^T x`` (``δ_k = ∂L_k/∂(x W_k^T)``) has rank ≤ batch size, so
SAM's ascent never materializes it: ``||g_k||² = <δ_k, G δ_k>`` and the perturbed product
``x (W_k + s_k g_k)^T = x W_k^T + s_k G δ_k`` follow from the batch's Gram matrix ``G = x x^T``.
Per step that leaves two GEMMs over the stacked first-layer weights (forward, and the descent
gradient accumulated straight into the momentum buffer) where sequential SAM runs do four, and
no parameter-sized ε at all for that layer.  Results equal sequential :func:`mupp.train.train`
runs to float tolerance (batched matmuls sum in another order).  No checkpoints: a killed group
re-runs from the start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import data as data_mod
from .optim import SAM
from .optim.perturbation import scales
from .train import TrainConfig, _lr_lambda, _make_model, epoch_batches, splits, summarize

VARYING = ("lr", "rho")
_DIRECTION_VARIANTS = ("sam", "last-layer", "first-layer", "sam-on")


def supports(cfg: TrainConfig | dict) -> bool:
    """Whether a configuration can join a vectorized group."""
    c = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    return c.model == "mlp" and c.optimizer == "sgd" and c.variant in _DIRECTION_VARIANTS


def group_key(cfg: dict[str, Any]) -> str:
    """Configurations with equal keys can train together."""
    import json

    return json.dumps(
        {k: v for k, v in sorted(cfg.items()) if k not in VARYING}, sort_keys=True, default=str
    )


def train_group(
    configs: Sequence[TrainConfig | dict],
    dataset: data_mod.Dataset | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train the configurations together; returns one result record per configuration."""
    cfgs = [c if isinstance(c, TrainConfig) else TrainConfig.from_dict(c) for c in configs]
    if not cfgs:
        raise ValueError("configs is empty")
    keys = {group_key(c.to_dict()) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"configs must differ only in {VARYING}")
    if not all(supports(c) for c in cfgs):
        raise ValueError(
            "vectorized training supports the MLP with SGD and variants " + str(_DIRECTION_VARIANTS)
        )
    cfg0 = cfgs[0]
    K = len(cfgs)
    ds = (
        dataset
        if dataset is not None
        else data_mod.load(cfg0.dataset, cfg0.data_dir, seed=cfg0.seed)
    )
    train_split, test_split = splits(cfg0, ds)
    dev = torch.device(cfg0.device)
    torch.manual_seed(cfg0.seed)
    model = _make_model(cfg0, ds.num_classes).to(dev)
    names = [n for n, _ in model.named_parameters()]
    # per-parameter factors from the one place that decides them
    template = SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=1.0,
        rho=1.0,
        parameterization=cfg0.parameterization,
        rule=cfg0.rule,
        variant=cfg0.variant,
        weight_decay=cfg0.weight_decay,
    )
    info = {}
    for g in template.param_groups:
        for p in g["params"]:
            info[id(p)] = g
    fac = {n: info[id(p)] for n, p in model.named_parameters()}
    lr_fac = {n: fac[n]["lr"] for n in names}  # lr=1: the μP factor
    wd = {n: fac[n]["weight_decay"] for n in names}
    num = {n: fac[n]["pert_num"] for n in names}
    den = {n: fac[n]["pert_den"] for n in names}
    pert = {n: bool(fac[n]["perturb"]) for n in names}
    del template
    theta = {
        n: p.detach().unsqueeze(0).repeat(K, *([1] * p.ndim)).clone()
        for n, p in model.named_parameters()
    }
    bufs: dict[str, torch.Tensor | None] = {n: None for n in names}
    lrs = torch.tensor([c.lr for c in cfgs], device=dev)
    rhos = torch.tensor([c.rho for c in cfgs], device=dev)
    use_sam = rhos > 0

    first = names[0]  # "layers.0.weight": the only parameter that sees the shared input
    if first != "layers.0.weight":
        raise ValueError(f"unexpected MLP parameter order: {names}")
    rest = names[1:]
    d_in = theta[first].shape[-1]
    pert_rest = [n for n in rest if pert[n]]
    pert_names = ([first] if pert[first] else []) + pert_rest
    num_t = torch.tensor([num[n] for n in pert_names], device=dev).unsqueeze(1)
    den_t = torch.tensor([den[n] for n in pert_names], device=dev).unsqueeze(1)

    def first_layer(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x W_k^T`` for every configuration, as one GEMM: (B, d_in) -> (K, B, n)."""
        return (x @ w.reshape(-1, w.shape[-1]).T).view(x.shape[0], K, -1).transpose(0, 1)

    def head(params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """The MLP's forward from the first layer's product ``z = x W_1^T``: -> (K, B, d_out)."""
        h = z
        if model.layers[0].bias is not None:
            h = h + params["layers.0.bias"].unsqueeze(1)
        h = h * model.input_mult
        for i in range(1, len(model.layers)):
            h = torch.bmm(model.act(h), params[f"layers.{i}.weight"].transpose(1, 2))
            if model.layers[i].bias is not None:
                h = h + params[f"layers.{i}.bias"].unsqueeze(1)
        return h * model.output_mult

    def vgrad(params, z, y):
        """Gradients of every configuration's loss (they are independent, so the gradient of
        the summed loss is each one's own) with respect to the parameters after the first
        layer and to ``z``; the first layer's weight gradient is ``δ_k^T x`` with ``δ = ∂L/∂z``."""
        leaves = {n: params[n].detach().requires_grad_(True) for n in rest}
        z = z.detach().requires_grad_(True)
        logits = head(leaves, z)
        losses = (
            F.cross_entropy(
                logits.flatten(0, 1),
                y.repeat(K),
                label_smoothing=cfg0.label_smoothing,
                reduction="none",
            )
            .view(K, -1)
            .mean(1)
        )  # each configuration's mean loss, in one kernel
        grads = torch.autograd.grad(losses.sum(), [z] + [leaves[n] for n in rest])
        return grads[0], dict(zip(rest, grads[1:])), losses.detach(), logits.detach()

    steps_per_epoch = len(train_split) // cfg0.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size {cfg0.batch_size} exceeds the training set ({len(train_split)} images)"
        )
    lam = _lr_lambda(cfg0, steps_per_epoch)
    histories: list[list[dict[str, float]]] = [[] for _ in range(K)]
    alive = torch.ones(K, dtype=torch.bool, device=dev)
    step = 0
    t_start = time.perf_counter()
    exact_mask = ds.test_exact[: len(test_split)] if ds.test_exact is not None else None
    fused_first = bool(cfg0.momentum) and not cfg0.nesterov

    def shaped(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v.view(K, *([1] * (t.ndim - 1)))

    for epoch in range(cfg0.epochs):
        if not alive.any():
            break
        it = epoch_batches(cfg0, train_split, ds.name, epoch)
        loss_sum = torch.zeros(K, device=dev)
        correct = torch.zeros(K, device=dev)
        seen = 0
        for x, y in it:
            z = first_layer(theta[first], x)
            delta, g1, loss, logits = vgrad(theta, z, y)
            loss_sum += loss * len(y)
            correct += (logits.argmax(-1) == y).sum(-1).float()
            seen += len(y)
            # The first layer never materializes its gradient δ^T x (K copies of n x d_in):
            # ||δ_k^T x||_F^2 = <δ_k, G δ_k> and x (W_k + s_k δ_k^T x)^T = z_k + s_k G δ_k,
            # with the batch's Gram matrix G = x x^T shared by all configurations.
            gram_delta = torch.matmul(x @ x.T, delta)
            sq = {first: (delta * gram_delta).sum((1, 2))}
            sq.update({n: g1[n].pow(2).flatten(1).sum(1) for n in rest})
            finite1 = torch.isfinite(torch.stack(list(sq.values()))).all(0)
            if use_sam.any():
                norms = torch.stack([sq[n] for n in pert_names]).sqrt()
                s, _ = scales(cfg0.rule, norms, num_t, den_t, rhos.unsqueeze(0), 1e-12)
                s = dict(zip(pert_names, s))
                # rho = 0 gives s = 0, so its second gradient is its first
                z2 = z + shaped(s[first], z) * gram_delta if first in s else z
                perturbed = {
                    n: theta[n] + shaped(s[n], g1[n]) * g1[n] if n in s else theta[n] for n in rest
                }
                delta, g, _, _ = vgrad(perturbed, z2, y)
                finite2 = torch.stack(
                    [torch.isfinite(delta).flatten(1).all(1)]
                    + [torch.isfinite(g[n]).flatten(1).all(1) for n in rest]
                ).all(0)
                # SAM skips non-finite steps; the plain base optimizer (rho = 0) does not
                ok = torch.where(use_sam, finite1 & finite2, torch.ones_like(finite1))
            else:
                g = g1
                ok = torch.ones(K, dtype=torch.bool, device=dev)  # plain SGD does not skip
            all_ok = bool(ok.all())  # the common case updates in place, without masks
            factor = lam(step)
            for n in names:
                step_lr = shaped(lrs * (lr_fac[n] * factor), theta[n])
                if n == first and fused_first and all_ok:
                    # torch.optim.SGD's momentum step with the gradient GEMM accumulating
                    # straight into the buffer: buf = μ buf + δ^T x (+ wd W); W -= lr buf
                    if bufs[n] is None:
                        bufs[n] = torch.zeros_like(theta[n])
                    bufs[n].view(-1, d_in).addmm_(
                        delta.transpose(1, 2).reshape(-1, x.shape[0]), x, beta=cfg0.momentum
                    )
                    if wd[n]:
                        bufs[n].add_(theta[n], alpha=wd[n])
                    theta[n].addcmul_(bufs[n], step_lr, value=-1.0)
                    continue
                d_p = torch.matmul(delta.transpose(1, 2), x) if n == first else g[n]
                if wd[n]:
                    d_p = d_p.add(theta[n], alpha=wd[n])
                if cfg0.momentum:
                    # torch.optim.SGD: the buffer starts as a copy of d_p; a zero buffer for a
                    # configuration that skipped its first step gives exactly that later
                    if bufs[n] is None:
                        bufs[n] = torch.zeros_like(d_p)
                    if all_ok:
                        bufs[n].mul_(cfg0.momentum).add_(d_p)
                    else:
                        new_buf = bufs[n] * cfg0.momentum + d_p
                        bufs[n] = torch.where(shaped(ok, new_buf), new_buf, bufs[n])
                    d_p = d_p.add(bufs[n], alpha=cfg0.momentum) if cfg0.nesterov else bufs[n]
                if all_ok:
                    theta[n].addcmul_(d_p, step_lr, value=-1.0)
                else:
                    theta[n] = torch.where(shaped(ok, d_p), theta[n] - step_lr * d_p, theta[n])
            step += 1
        # evaluation, one record per configuration
        with torch.no_grad():
            outs = [
                head(theta, first_layer(theta[first], xb))
                for xb, _ in data_mod.batches(
                    test_split, 500, shuffle=False, name=ds.name, flatten=True, device=dev
                )
            ]
        logits = torch.cat(outs, 1)
        yt = test_split.y.to(dev)
        test_loss = torch.stack([F.cross_entropy(logits[k], yt).detach() for k in range(K)])
        per_example = logits.argmax(-1) == yt
        test_acc = per_example.float().mean(1)
        train_loss = loss_sum / max(seen, 1)
        chance = 1.0 / ds.num_classes
        for k in range(K):
            if not alive[k]:
                continue
            rec = {
                "epoch": epoch + 1,
                "train_loss": train_loss[k].item(),
                "train_acc": (correct[k] / max(seen, 1)).item(),
                "test_loss": test_loss[k].item(),
                "test_acc": test_acc[k].item(),
            }
            if exact_mask is not None and exact_mask.any():
                rec["test_acc_exact"] = per_example[k][exact_mask.to(dev)].float().mean().item()
            if (
                not (math.isfinite(rec["train_loss"]) and math.isfinite(rec["test_loss"]))
                or rec["test_acc"] <= chance + 0.01
            ):
                rec["diverged"] = True
                alive[k] = False
            histories[k].append(rec)
    elapsed = (time.perf_counter() - t_start) / K  # amortized
    return [summarize(c, h, elapsed) for c, h in zip(cfgs, histories)]
