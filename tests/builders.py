"""Model builders and multi-process helpers shared by the tests.

A plain module, not ``conftest.py``: spawned test workers (DDP, FSDP2) import these by name,
which fixtures cannot serve.  Fixtures live in ``conftest.py``.
"""

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

import mupp

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_data_dir():
    """``../shared/datasets`` when it holds CIFAR-10, else None (tests fall back to synthetic)."""
    env = os.environ.get("MUPP_TEST_DATA")
    if env:
        return Path(env)
    return SHARED if (SHARED / "cifar10.npz").exists() else None


def mlp(width: int, d_in: int = 12, d_out: int = 5, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, width, bias=bias),
        nn.ReLU(),
        nn.Linear(width, width, bias=bias),
        nn.ReLU(),
        nn.Linear(width, d_out, bias=bias),
    )


def prepared_mlp(width: int = 32, base: int = 8, bias: bool = False) -> nn.Sequential:
    model = mlp(width, bias=bias)
    return mupp.set_base_shapes(model, mlp(base, bias=bias), delta=mlp(2 * base, bias=bias))


def step_data(step: int, rank: int | None = None):
    """The batch of ``step`` for the multi-process tests (16 examples), or ``rank``'s half."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    if rank is None:
        return x, y
    return x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]


@contextmanager
def gloo_group(rank: int, world: int, init_file: str) -> Iterator[None]:
    """A gloo process group for a spawned test worker, destroyed on the way out after a
    garbage collection (the way :func:`mupp.distributed.process_group` ends): a sharded model
    or DDP wrapper still holding the group at interpreter shutdown aborts the worker.  Build
    models in a function called inside the block, so none outlives it.  A rank waiting for a
    collective its peer never joins fails after 120 s instead of hanging the test run."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        yield
    finally:
        gc.collect()
        dist.destroy_process_group()


def tiny_llama(
    width: int, *, vocab: int = 64, layers: int = 1, heads: int = 4, kv_heads: int = 2,
    tie: bool = False, positions: int = 32,
):  # fmt: skip
    """A tiny Hugging Face ``LlamaForCausalLM`` (grouped-query attention when ``kv_heads <
    heads``, SwiGLU of ``2 * width``) at ``width``."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=positions, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)
