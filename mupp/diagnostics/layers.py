"""Per-layer measurements through forward hooks (Def. 8, Fig. 2, App. H.1)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..shapes import get_info, reattach


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with a weight matrix (ndim >= 2) and width metadata: the layers we measure."""
    if getattr(model, "_mupp_shapes", None):
        reattach(model)
    out = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.ndim >= 2 and get_info(w) is not None:
            out.append((name, mod))
    return out


@contextmanager
def capture(layers: list[tuple[str, nn.Module]]):
    """Record each layer's input and output during forward passes in the block."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in layers:

        def hook(m, args, out, name=name):
            inputs[name] = args[0].detach()
            outputs[name] = out.detach()

        hooks.append(mod.register_forward_hook(hook))
    try:
        yield inputs, outputs
    finally:
        for h in hooks:
            h.remove()


def apply_weight(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear map with ``weight`` in place of its own, without bias: ``W x``."""
    if isinstance(mod, nn.Linear):
        return F.linear(x, weight)
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod._conv_forward(x, weight, None)
    if isinstance(mod, nn.Embedding):
        return F.embedding(x, weight)
    params = {n: torch.zeros_like(p) for n, p in mod.named_parameters(recurse=False)}
    params["weight"] = weight
    return torch.func.functional_call(mod, params, (x,))


def rms(t: torch.Tensor) -> float:
    """Root mean square of the entries of ``t``."""
    return t.float().pow(2).mean().sqrt().item()


def spectral_norm(
    w: torch.Tensor, iters: int = 30, generator: torch.Generator | None = None
) -> float:
    """Largest singular value of ``w`` viewed as (fan_out, fan_in), by power iteration."""
    m = w.detach().float().reshape(w.shape[0], -1)
    v = torch.randn(
        m.shape[1], generator=generator, device=m.device if generator is None else "cpu"
    ).to(m.device)
    v = v / v.norm().clamp_min(1e-30)
    s = 0.0
    for _ in range(iters):
        u = m @ v
        s = u.norm().item()
        if s == 0:
            return 0.0
        v = m.T @ (u / s)
        v = v / v.norm().clamp_min(1e-30)
    return (m @ v).norm().item()


def spectral_scale(mod: nn.Module) -> float:
    """``sqrt(fan_out/fan_in)`` relative to base: the spectral condition's scale (Eq. (*))."""
    info = get_info(mod.weight)
    return (info.fan_out_mult / info.fan_in_mult) ** 0.5
