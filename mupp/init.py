"""μP initialization of any model whose base shapes are set (paper App. F.5, F.7, App. G)."""

from __future__ import annotations

import torch
from torch import nn

from . import scaling
from .shapes import require_info


@torch.no_grad()
def mup_init_(
    model: nn.Module, readout_zero: bool = False, assume_default_init: bool = True
) -> nn.Module:
    """Rescale a model's weights to the spectral μP init, relative to base width.

    Every weight of ndim >= 2 is multiplied by ``init_std_factor`` (a weight multiplier
    recorded with the base shapes included, App. F.6.1).  With ``assume_default_init``
    (PyTorch's default ``1/sqrt(fan_in)`` init, as ``mup`` assumes) the factor is divided by
    ``sqrt(base_fan_in / fan_in)``: hidden and input layers keep PyTorch's init, the readout
    shrinks by an extra ``m^{-1/2}`` (variance ``1/n^2``, Sec. 3), and biases of Linear/Conv
    layers are multiplied by ``sqrt(fan_in mult)`` of their weight, undoing the width
    dependence of the default bias init.  Without it (a model whose own init has a fixed std,
    as Hugging Face models do) the std at base width is the model's own and biases are left
    as they are.  ``readout_zero`` zeroes output-like weights and their biases (App. G).  A
    tied weight is rescaled once.  At width multiplier 1 nothing changes unless
    ``readout_zero``.
    """
    seen: set[int] = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.ndim < 2 or id(w) in seen:
            continue
        seen.add(id(w))
        info = require_info(w, f"{type(module).__name__}.weight: ")
        if readout_zero and info.role == "output":
            w.zero_()
        else:
            factor = scaling.init_std_factor(info)
            if assume_default_init:
                factor /= info.fan_in_mult**-0.5
            w.mul_(factor)
        b = getattr(module, "bias", None)
        if isinstance(b, nn.Parameter) and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            if readout_zero and info.role == "output":
                b.zero_()
            elif assume_default_init:
                b.mul_(info.fan_in_mult**0.5)
    return model


@torch.no_grad()
def spectral_normal_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Fill ``weight`` with ``N(0, σ²)``, ``σ = gain / sqrt(base_fan_in) * init_std_factor``:
    the usual ``gain/sqrt(fan_in)`` at base width, scaled by the spectral μP rule (App. F.7)."""
    info = require_info(weight)
    std = gain / info.base_fan_in**0.5 * scaling.init_std_factor(info)
    return weight.normal_(0.0, std)
