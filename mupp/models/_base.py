"""Shared helpers for mupp's models: building base/delta shapes on the meta device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..shapes import set_base_shapes


def with_base_shapes(
    model: nn.Module,
    make: Callable[[float], nn.Module],
    base_width: float,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Set ``model``'s base shapes from ``make(base_width)`` with a delta model
    ``make(2 * base_width)``, both built on the meta device (no memory, no init cost); the
    base and delta *models* then go to :func:`mupp.set_base_shapes` (App. F.5)."""
    with torch.device("meta"):
        base_model = make(base_width)
        delta_model = make(2 * base_width)
    return set_base_shapes(model, base_model, delta=delta_model, overrides=overrides)


class Readout(nn.Linear):
    """The readout ``output_mult · (W h + b)``: a ``Linear`` whose output multiplier lives inside
    it, so that its output is the model's output (what last-layer SAM's one-pass step needs,
    :mod:`mupp.optim.lastlayer`).  Parameter names and state dicts are those of ``nn.Linear``."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, output_mult: float = 1.0
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.output_mult = output_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The readout ``output_mult · (x W^T + b)``."""
        out = super().forward(x)
        return out if self.output_mult == 1.0 else out * self.output_mult


class OutputMultMixin:
    """``model.output_mult`` reads and writes the readout's multiplier (``self._readout``)."""

    @property
    def output_mult(self) -> float:
        """The readout's output multiplier (App. F.6)."""
        return self._readout().output_mult

    @output_mult.setter
    def output_mult(self, value: float) -> None:
        """Set the readout's output multiplier."""
        self._readout().output_mult = value


def count_params(model: nn.Module) -> int:
    """The number of parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters())
