"""μP-ready models: the paper's MLP, CIFAR ResNets and a ViT (App. G)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._base import count_params
from .mlp import MLP
from .resnet import ResNet, ResNet8, ResNet10, ResNet18
from .vit import ViT

MODELS = ("mlp", "resnet18", "resnet10", "resnet8", "vit")


def build(name: str, width: float, base_width: float | None = None, **kw: Any) -> nn.Module:
    """Build a model by name.  ``width``: hidden width for ``mlp``/``vit``, ``width_mult`` for
    the ResNets; ``base_width`` likewise (defaults: MLP 64, ResNets 0.5, ViT 384... or the
    model's own)."""
    if name == "mlp":
        return MLP(int(width), base_width=int(base_width) if base_width else None, **kw)
    if name in ("resnet18", "resnet10", "resnet8"):
        fn = {"resnet18": ResNet18, "resnet10": ResNet10, "resnet8": ResNet8}[name]
        return fn(width_mult=float(width), base_width_mult=base_width, **kw)
    if name == "vit":
        return ViT(width=int(width), base_width=int(base_width) if base_width else None, **kw)
    raise ValueError(f"model must be one of {MODELS}; got {name!r}")


__all__ = [
    "MLP",
    "ResNet",
    "ResNet18",
    "ResNet10",
    "ResNet8",
    "ViT",
    "build",
    "count_params",
    "MODELS",
]
