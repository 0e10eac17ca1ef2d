"""μP-ready models: the paper's MLP, CIFAR ResNets and a ViT (App. G), and a GPT."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..choices import MODEL_NAMES, ModelName, check_choice
from ._base import count_params
from .gpt import GPT, GPTConfig
from .mlp import MLP
from .resnet import RESNET_STEM, ResNet, ResNet8, ResNet10, ResNet18
from .vit import ViT

MODELS = MODEL_NAMES

# What ``width`` counts in each model; every model's ``width`` is a whole number.
WIDTH_UNITS = {
    "mlp": "hidden units",
    "resnet8": "channels of the first stage",
    "resnet10": "channels of the first stage",
    "resnet18": "channels of the first stage",
    "vit": "embedding dimensions",
    "gpt": "embedding dimensions",
}


def build(name: ModelName, width: int, base_width: int | None = None, **kw: Any) -> nn.Module:
    """Build a built-in model by name, with base shapes set at ``base_width`` (``None``:
    standard shapes, no μP, for every model; the ResNet factories' own default base, 32
    channels as in Table G.1, applies only when they are called directly).

    ``width`` is the model's width in its own units (:data:`WIDTH_UNITS`): the MLP's hidden
    units, the ViT's embedding dimension, a ResNet's first-stage channel count (64 at the
    paper's width multiplier 1, App. G: ``width_mult = width / 64``).  ``kw`` goes to the
    model's class."""
    check_choice("name", name, MODEL_NAMES)
    for arg, value in (("width", width), ("base_width", base_width)):
        if value is not None and not float(value).is_integer():
            hint = ""
            if name.startswith("resnet"):
                hint = (
                    f" (a ResNet's width is its first stage's channel count: width_mult "
                    f"{value:g} is width {value * RESNET_STEM:g})"
                )
            raise ValueError(
                f"{arg} of the {name} is a number of {WIDTH_UNITS[name]}, a whole number; "
                f"got {value!r}{hint}"
            )
    if name == "mlp":
        return MLP(int(width), base_width=int(base_width) if base_width else None, **kw)
    if name == "vit":
        return ViT(width=int(width), base_width=int(base_width) if base_width else None, **kw)
    if name == "gpt":
        return GPT(width=int(width), base_width=int(base_width) if base_width else None, **kw)
    fn = {"resnet18": ResNet18, "resnet10": ResNet10, "resnet8": ResNet8}[name]
    kw["base_width_mult"] = None if base_width is None else base_width / RESNET_STEM
    return fn(width_mult=width / RESNET_STEM, **kw)


__all__ = [
    "MLP",
    "ResNet",
    "ResNet18",
    "ResNet10",
    "ResNet8",
    "ViT",
    "GPT",
    "GPTConfig",
    "build",
    "count_params",
    "MODELS",
    "WIDTH_UNITS",
]
