"""Whole-model probes (App. H.1): gradient norm, Hessian top eigenvalue and trace, feature rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def grad_norm(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> float:
    """``||∇L||_F`` over all trainable parameters."""
    params = _params(model)
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()


def _hvp(params, loss_fn):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(vs):
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, params, retain_graph=True)

    return hvp


def hessian_top_eigenvalue(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], iters: int = 20, seed: int = 0
) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration on Hessian-vector products."""
    params = _params(model)
    hvp = _hvp(params, loss_fn)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p) for p in params]
    eig = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((x**2).sum() for x in v))
        v = [x / norm for x in v]
        hv = hvp(v)
        eig = sum((a * b).sum() for a, b in zip(hv, v)).item()
        v = [x.detach() for x in hv]
    return eig


def hessian_trace(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], samples: int = 20, seed: int = 0
) -> float:
    """Hutchinson's estimator ``E[z^T H z]`` with Rademacher ``z``."""
    params = _params(model)
    hvp = _hvp(params, loss_fn)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples):
        z = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in params]
        hz = hvp(z)
        total += sum((a * b).sum() for a, b in zip(hz, z)).item()
    return total / samples


def feature_rank(features: torch.Tensor, threshold: float = 0.99) -> int:
    """Effective rank: how many singular values of the centered (N, d) features cover
    ``threshold`` of the variance."""
    f = features.detach().float().reshape(features.shape[0], -1)
    f = f - f.mean(0, keepdim=True)
    s = torch.linalg.svdvals(f) ** 2
    if s.sum() == 0:
        return 0
    cum = torch.cumsum(s, 0) / s.sum()
    return int((cum < threshold).sum().item()) + 1
