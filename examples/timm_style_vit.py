"""A timm-style Vision Transformer (plain modules: timm itself needs torchvision) under μP²:
token parameters get their roles, SAM trains it, and the coordinate check runs on it.

    python examples/timm_style_vit.py
    mupp coordcheck --model examples.timm_style_vit:make --widths 32,64,128 --steps 3 --seeds 1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mupp


class Block(nn.Module):
    def __init__(self, d: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, -1).unbind(2)
        # μP attention: 1/d_head scaling (not 1/sqrt(d_head)), as mupp's own ViT
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0 / q.shape[-1]
        )
        h = h + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class TimmStyleViT(nn.Module):
    """timm's parameter names and shapes: ``cls_token`` 1×1×D, ``pos_embed`` 1×(N+1)×D."""

    def __init__(self, d: int, patch: int = 8, classes: int = 10):
        super().__init__()
        n = (32 // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


def make(width: float, base_width: int = 32) -> nn.Module:
    """The model at ``width`` with base shapes against ``base_width`` (the factory that
    ``mupp coordcheck --model examples.timm_style_vit:make`` calls)."""
    model = TimmStyleViT(int(width))
    with torch.device("meta"):
        base, delta = TimmStyleViT(base_width), TimmStyleViT(2 * base_width)
    # declared, so no "inferred from shapes" warning: the token parameters are embeddings
    overrides = {"cls_token": "input", "pos_embed": "input"}
    mupp.set_base_shapes(model, base, delta=delta, overrides=overrides)
    mupp.mup_init_(model)
    return model


def main() -> None:
    torch.manual_seed(0)
    model = make(128)
    print(mupp.describe(model))
    opt = mupp.SAM(model.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.05, rule="DP")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for step in range(3):
        loss = opt.step(closure)
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    from mupp.diagnostics import coord_data, format_tables

    result = coord_data(
        make,
        [32, 64, 128],
        lambda m: mupp.SAM(m.parameters(), torch.optim.SGD, lr=0.05, rho=0.05),
        [(x, y)],
        steps=2,
        seeds=1,
    )
    print(format_tables(result))


if __name__ == "__main__":
    main()
