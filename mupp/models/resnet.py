"""CIFAR ResNets (He et al. 2016) for μP / μP²: 3×3 stem, no max-pool, every channel count
scaled by ``width_mult`` (App. G, Table G.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..init import mup_init_
from ._base import OutputMultMixin, Readout, with_base_shapes

RESNET_STEM = 64  # first-stage channels at width_mult 1 (stages: 64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` images -> ``(batch, num_classes)`` logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(OutputMultMixin, nn.Module):
    """``stages``: blocks per stage; channels ``(64, 128, 256, 512)[:len(stages)] · width_mult``.

    ``base_width_mult`` sets base shapes (μP relative to it, Table G.1 uses 0.5) and applies
    the μP init (readout variance ``∝ 1/n²``); ``readout_zero`` zero-initializes the readout
    (the paper's μP ResNets); ``output_mult`` multiplies the logits.
    """

    def __init__(
        self,
        stages: tuple[int, ...] = (2, 2, 2, 2),
        width_mult: float = 1.0,
        base_width_mult: float | None = None,
        num_classes: int = 10,
        output_mult: float = 1.0,
        readout_zero: bool = False,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0; got {width_mult}")
        if not 1 <= len(stages) <= 4:
            raise ValueError(f"stages must list 1 to 4 block counts; got {stages}")
        chans = [max(1, round(RESNET_STEM * c * width_mult)) for c in (1, 2, 4, 8)[: len(stages)]]
        self.conv1 = nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        layers, c_in = [], chans[0]
        for i, (n_blocks, c) in enumerate(zip(stages, chans)):
            for j in range(n_blocks):
                layers.append(BasicBlock(c_in, c, 2 if (i > 0 and j == 0) else 1))
                c_in = c
        self.layers = nn.Sequential(*layers)
        self.linear = Readout(c_in, num_classes, output_mult=output_mult)
        if base_width_mult is not None:
            with_base_shapes(self, lambda w: ResNet(stages, w, None, num_classes), base_width_mult)
            mup_init_(self, readout_zero=readout_zero)
        elif readout_zero:
            with torch.no_grad():
                self.linear.weight.zero_()
                self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` images -> ``(batch, num_classes)`` logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)  # the readout applies output_mult

    def _readout(self) -> Readout:
        return self.linear


def ResNet18(width_mult: float = 1.0, base_width_mult: float | None = 0.5, **kw) -> ResNet:
    """ResNet-18 for CIFAR (11.17M parameters at ``width_mult=1``)."""
    return ResNet((2, 2, 2, 2), width_mult, base_width_mult, **kw)


def ResNet10(width_mult: float = 1.0, base_width_mult: float | None = 0.5, **kw) -> ResNet:
    """ResNet-10 for CIFAR: one block per stage, four stages."""
    return ResNet((1, 1, 1, 1), width_mult, base_width_mult, **kw)


def ResNet8(width_mult: float = 1.0, base_width_mult: float | None = 0.5, **kw) -> ResNet:
    """Three stages of one block each: a CPU-sized ResNet."""
    return ResNet((1, 1, 1), width_mult, base_width_mult, **kw)
