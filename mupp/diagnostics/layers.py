"""Per-layer measurements through forward hooks (Def. 8, Fig. 2, App. H.1)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
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
    """The layer's map with ``weight`` in place of its own and every other parameter of the
    layer zeroed (no bias): ``W x``, times whatever the layer's forward pass and its forward
    hooks multiply its output by (a readout's ``1/m`` output multiplier, App. F.6)."""
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


class _AttentionLogits(torch.overrides.TorchFunctionMode):
    """Records the RMS of ``scale · q kᵀ`` at every ``scaled_dot_product_attention`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rms: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k = args[0], args[1]
            scale = kwargs.get("scale")
            if scale is None:
                scale = q.shape[-1] ** -0.5
            if k.ndim == q.ndim >= 3 and k.shape[-3] != q.shape[-3]:  # grouped-query attention
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            with torch.no_grad():
                self.rms.append(rms((q @ k.transpose(-2, -1)) * scale))
        return func(*args, **kwargs)


@contextmanager
def attention_logits():
    """Within the block, ``rms`` (the yielded list) gets the RMS of the attention logits
    ``scale · q kᵀ`` of every ``torch.nn.functional.scaled_dot_product_attention`` call, in call
    order: the attention modules of mupp's GPT and ViT, and of transformers' models under their
    default ``sdpa`` implementation (an eager implementation is not seen)."""
    mode = _AttentionLogits()
    with mode:
        yield mode.rms
