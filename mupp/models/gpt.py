"""A small μP decoder-only transformer in the style of nanoGPT (pre-LayerNorm, causal attention).

μP as microsoft/mup and the paper's ViTs do it (App. G):

- attention logits scaled by ``1/d_head``, written as ``sqrt(base_d_head) / d_head`` so that they
  are exactly ``1/sqrt(d_head)`` at base width (the number of heads is fixed; ``d_head`` grows);
- the readout has the output multiplier ``1/m`` (mup's ``MuReadout``).  Untied, its weight is
  output-like with a recorded weight multiplier ``a = 1`` (App. F.6, Lemma F.12), so its Adam
  learning rate, init and μP² perturbation exponent follow from the base shapes.  Tied to the
  token embedding (``tie_readout``, mup's ``MuSharedReadout``) the weight keeps the embedding's
  input-like role: with the ``1/m`` multiplier both of its uses get gradients of the same
  width scaling (entries ``Θ(1/n)``), so the input layer's learning rate and perturbation
  exponent (``d_1 = -1/2`` under μP², Theorem 11 and Lemma F.12 (b) alike) serve both;
- hidden weights with variance ``∝ 1/fan_in`` (:func:`mupp.mup_init_`), embeddings with a
  fixed std of 0.02; readout (untied) and query weights zero-initialized (App. G).

``base_width=None`` builds the standard parameterization at this width (no base shapes,
``1/sqrt(d_head)``, no output multiplier): the same network as μP at its base width.
``mup=False`` builds that same standard network with its base shapes recorded all the same,
so that width-aware measurements (:mod:`mupp.diagnostics`) and optimizers see the layers'
roles and width multipliers: the honest standard-parameterization baseline of a width study.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..init import mup_init_
from ._base import OutputMultMixin, Readout, with_base_shapes


@dataclass(frozen=True)
class GPTConfig:
    """The GPT's shape; ``width`` is the embedding size ``n_embd`` (the width that grows)."""

    vocab_size: int = 65  # Tiny Shakespeare's characters
    block_size: int = 128  # the longest context
    width: int = 128
    base_width: int | None = 64  # None: standard parameterization, no base shapes
    n_layer: int = 4
    n_head: int = 4  # fixed as width grows: d_head = width / n_head grows
    mlp_ratio: int = 4
    tie_readout: bool = True
    bias: bool = False
    dropout: float = 0.0
    zero_init: bool = True  # zero readout (untied) and query weights (App. G)
    mup: bool = True  # False: the standard network, base shapes recorded (module docstring)

    @property
    def mup_base_width(self) -> int | None:
        """The base width that μP's multipliers scale against; ``None`` for the standard
        network (``base_width=None`` or ``mup=False``)."""
        return self.base_width if self.mup else None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "width", "n_layer", "n_head", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive whole number; got {v!r}")
        for name, w in (("width", self.width), ("base_width", self.base_width)):
            if w is not None and w % self.n_head:
                raise ValueError(
                    f"GPTConfig.{name} ({w}) must be divisible by n_head ({self.n_head})"
                )
        for name in ("tie_readout", "bias", "zero_init", "mup"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"GPTConfig.{name} must be True or False; got {getattr(self, name)!r}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1); got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with μP's ``1/d_head`` scaling."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.width // cfg.n_head
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
        base_head_dim = (cfg.mup_base_width or cfg.width) // cfg.n_head
        self.scaling = base_head_dim**0.5 / self.head_dim  # = 1/sqrt(d_head) at base width
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, width) -> (batch, tokens, width)``."""
        b, t, w = x.shape
        # (3, batch, heads, tokens, head_dim)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=p, scale=self.scaling
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, w))  # (batch, tokens, width)


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, bias=cfg.bias)
        self.fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, width) -> (batch, tokens, width)``."""
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln2(x)))))


class GPT(OutputMultMixin, nn.Module):
    """A μP GPT: ``GPT(GPTConfig(width=256, base_width=64))``, or keyword arguments of
    :class:`GPTConfig` (``GPT(width=256)``).  ``forward(idx)``: token ids ``(batch, tokens)``
    -> logits ``(batch, tokens, vocab_size)``."""

    def __init__(self, config: GPTConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = replace(config, **kwargs) if config is not None else GPTConfig(**kwargs)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.block_size, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.width, bias=cfg.bias)
        m = cfg.width / cfg.mup_base_width if cfg.mup_base_width else 1.0
        self.readout = Readout(cfg.width, cfg.vocab_size, bias=False, output_mult=1.0 / m)
        if cfg.tie_readout:
            self.readout.weight = self.wte.weight  # mup's MuSharedReadout: input-like role
        with torch.no_grad():
            nn.init.normal_(self.wpe.weight, std=0.02)
            nn.init.normal_(self.wte.weight, std=0.02)
        if cfg.base_width is not None:
            overrides = None if cfg.tie_readout else {"readout.weight": {"multiplier": 1.0}}
            with_base_shapes(
                self,
                lambda w: GPT(replace(cfg, width=int(w), base_width=None)),
                cfg.base_width,
                overrides=overrides,
            )
            if cfg.mup:
                mup_init_(self)  # hidden: 1/fan_in variance; untied readout: its base init
        if cfg.zero_init:
            with torch.no_grad():
                if not cfg.tie_readout:
                    self.readout.weight.zero_()
                for blk in self.blocks:
                    blk.attn.qkv.weight[: cfg.width].zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens)`` token ids -> ``(batch, tokens, vocab_size)`` logits."""
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(
                f"sequence length {t} exceeds block_size {self.config.block_size}: build the "
                "GPT with a larger block_size"
            )
        pos = torch.arange(t, device=idx.device)
        h = self.drop(self.wte(idx) + self.wpe(pos))  # (batch, tokens, width)
        for blk in self.blocks:
            h = blk(h)
        return self.readout(self.ln_f(h))  # the readout applies output_mult = 1/m

    def _readout(self) -> Readout:
        return self.readout
