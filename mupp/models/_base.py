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
    base: float,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Set ``model``'s base shapes from ``make(base)`` with a delta model ``make(2 * base)``,
    both built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        base_model = make(base)
        delta_model = make(2 * base)
    return set_base_shapes(model, base_model, delta=delta_model, overrides=overrides)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
