"""The paper's MLP (Sec. 3, Def. 4, App. G): ``depth`` weight matrices, ReLU, no biases."""

from __future__ import annotations

import torch
from torch import nn

from ..init import spectral_normal_
from ._base import OutputMultMixin, Readout, with_base_shapes

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(OutputMultMixin, nn.Module):
    """``f(ξ) = output_mult · W_{L+1} φ(... φ(input_mult · W_1 ξ))``.

    ``base_width`` sets base shapes (spectral μP relative to it, readout variance ``∝ 1/n²``).
    ``exact_bcd=True`` follows Def. 4 literally: base width 1 (multipliers are the width ``n``
    itself), init variances ``2/d_in`` (input; the paper's width-independent He constant),
    ``2/n`` (hidden) and ``1/n²`` (readout).  ``readout_zero`` zero-initializes the readout.
    """

    def __init__(
        self,
        width: int,
        base_width: int | None = None,
        depth: int = 3,
        d_in: int = 3072,
        d_out: int = 10,
        bias: bool = False,
        activation: str = "relu",
        exact_bcd: bool = False,
        input_mult: float = 1.0,
        output_mult: float = 1.0,
        readout_zero: bool = False,
        _init: bool = True,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 2:
            raise ValueError(f"width must be >= 1 and depth >= 2; got width={width}, depth={depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")
        dims = [d_in] + [width] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-2], dims[1:-1])
        )
        self.layers.append(Readout(dims[-2], dims[-1], bias=bias, output_mult=output_mult))
        self.act = ACTIVATIONS[activation]()
        self.input_mult = input_mult
        self.width = width
        if exact_bcd:
            base_width = 1
        if base_width is not None:
            kw = dict(
                depth=depth, d_in=d_in, d_out=d_out, bias=bias, activation=activation, _init=False
            )
            with_base_shapes(self, lambda w: MLP(int(w), **kw), base_width)
        if _init:
            self.reset_parameters(exact_bcd, readout_zero, base_width is not None)

    @torch.no_grad()
    def reset_parameters(
        self, exact_bcd: bool = False, readout_zero: bool = False, mup: bool = True
    ) -> None:
        """Re-initialize: μP (``mup``; spectral init relative to base width, App. G) or
        standard He init with a ``1/fan_in`` readout; ``exact_bcd`` uses the exact
        bcd-parameterization variances of the theory; ``readout_zero`` zeros the readout."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            gain = 1.0 if i == last else 2**0.5
            if exact_bcd:
                fan_in = layer.in_features
                std = (2 / fan_in) ** 0.5 if i < last else 1.0 / fan_in
                layer.weight.normal_(0.0, std)
            elif mup:
                spectral_normal_(layer.weight, gain)
            else:
                layer.weight.normal_(0.0, gain / layer.in_features**0.5)
            if layer.bias is not None:
                layer.bias.zero_()
        if readout_zero:
            self.layers[-1].weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, d_in) -> (batch, d_out)`` logits."""
        x = x.flatten(1)
        h = self.layers[0](x) * self.input_mult
        for layer in self.layers[1:]:
            h = layer(self.act(h))
        return h  # the readout applies output_mult

    def _readout(self) -> Readout:
        return self.layers[-1]
