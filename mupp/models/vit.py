"""Vision Transformer for μP / μP² (App. G, Table G.2): pre-LayerNorm blocks, attention logits
scaled by ``1/d_head`` (μP; equal to ``1/sqrt(d_head)`` at base width), readout and query weights
zero-initialized, input and output multipliers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..init import mup_init_
from ._base import OutputMultMixin, Readout, with_base_shapes

# cls token and position embedding map "input 1" / a fixed position to the width: input-like
_OVERRIDES = {
    "cls_token": {"fan_in_dims": (), "fan_out_dims": (0,)},
    "pos_embed": {"fan_in_dims": (0,), "fan_out_dims": (1,)},
}


class Attention(nn.Module):
    """Multi-head self-attention with μP's ``1/d_head`` attention scaling (App. G)."""

    def __init__(self, width: int, heads: int, base_head_dim: int, zero_query: bool) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # μP: 1/d_head, written so that it is 1/sqrt(d_head) at base width
        self.scale = base_head_dim**0.5 / self.head_dim
        self.zero_query = zero_query

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, width) -> (batch, tokens, width)``."""
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """A pre-norm transformer block: attention and an MLP, each with a residual."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: int, base_head_dim: int, zero_query: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, base_head_dim, zero_query)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, width) -> (batch, tokens, width)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(OutputMultMixin, nn.Module):
    """ViT with patch embedding (a conv with kernel = stride = ``patch``), a cls token and a
    learned position embedding.  ``heads`` stays fixed as width grows (``d_head`` grows)."""

    def __init__(
        self,
        width: int = 384,
        base_width: int | None = 384,
        depth: int = 6,
        heads: int = 6,
        patch: int = 4,
        image_size: int = 32,
        num_classes: int = 100,
        mlp_ratio: int = 4,
        input_mult: float = 1.0,
        output_mult: float = 1.0,
        readout_zero: bool = True,
        zero_query: bool = True,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        n_tokens = (image_size // patch) ** 2 + 1
        base_head_dim = (base_width or width) // heads
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, base_head_dim, zero_query) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = Readout(width, num_classes, output_mult=output_mult)
        self.input_mult = input_mult
        if base_width is not None:
            kw = dict(
                depth=depth,
                heads=heads,
                patch=patch,
                image_size=image_size,
                num_classes=num_classes,
                mlp_ratio=mlp_ratio,
            )
            with_base_shapes(
                self, lambda w: ViT(int(w), None, **kw), base_width, overrides=_OVERRIDES
            )
            mup_init_(self, readout_zero=readout_zero)
        elif readout_zero:
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()
        if zero_query:
            with torch.no_grad():
                for blk in self.blocks:
                    blk.attn.qkv.weight[:width].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` images -> ``(batch, num_classes)`` logits."""
        b = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) * self.input_mult
        cls = self.cls_token.expand(b, 1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 0]))  # the readout applies output_mult

    def _readout(self) -> Readout:
        return self.head
