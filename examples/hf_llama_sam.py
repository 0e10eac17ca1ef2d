"""μP² SAM on a Llama-family model (grouped-query attention, SwiGLU, RMSNorm, untied head): the
stock model fails ``verify``, the prepared one passes, then a few SAM steps in a plain loop.

    pip install torch==2.13.0 -e ".[integrations]"
    python examples/hf_llama_sam.py
"""

from __future__ import annotations

import torch
import transformers

import mupp
from mupp.diagnostics import verify
from mupp.integrations.huggingface import prepare

VOCAB = 128


def llama(width: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def stock(width: int) -> transformers.LlamaForCausalLM:
    with torch.device("meta"):
        base, delta = llama(32), llama(64)
    return mupp.set_base_shapes(llama(width), base, delta)


def prepared(width: int) -> transformers.LlamaForCausalLM:
    with torch.device("meta"):
        base, delta = llama(32), llama(64)
    return prepare(llama(width), base, delta)


def batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, VOCAB, (8, 17), generator=gen)
        yield ids[:, :-1], ids[:, 1:]


def sam(model: torch.nn.Module) -> mupp.SAM:
    # the untied head's 1/width multiplier is recorded by prepare: SAM picks it up (Lemma F.12)
    return mupp.SAM(
        model.parameters(), torch.optim.AdamW, lr=3e-3, rho=0.05, rule="DP", weight_decay=0.0
    )


def main() -> None:
    torch.manual_seed(0)
    for name, make in (("stock + set_base_shapes", stock), ("prepare", prepared)):
        report = verify(make, [64, 128, 256], sam, batches, seeds=1)
        print(f"{name}: {'μP' if report.ok else f'{len(report.problems)} problems'}")
        for line in report.problems[:2]:
            print("   ", line)
    model = prepared(128)
    opt = sam(model)
    print("weight multipliers:", opt.weight_multipliers)
    data = batches(0)
    for step in range(3):
        x, _ = next(data)

        def closure(x=x):
            loss = model(input_ids=x, labels=x).loss  # the model shifts the labels itself
            loss.backward()
            return loss

        loss = opt.step(closure)
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
