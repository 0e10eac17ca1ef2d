"""μP² SAM in the Hugging Face Trainer: a stock GPT-2 made μP by ``prepare`` (base shapes from
narrower copies built on the meta device, 1/d_head attention, the tied readout's 1/width
multiplier, μP init), checked by ``mupp.diagnostics.verify``, then ``SAMTrainer`` running both
SAM passes per step.

    pip install torch==2.13.0 -e ".[integrations]"
    python examples/hf_gpt2_samtrainer.py
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import mupp
from mupp.diagnostics import verify
from mupp.integrations.huggingface import SAMTrainer, prepare


def gpt2(width: int) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(
        vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0, n_embd=width, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16):
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def prepared_gpt2(width: int) -> transformers.GPT2LMHeadModel:
    model = gpt2(width)
    with torch.device("meta"):
        base, delta = gpt2(32), gpt2(64)
    # set_base_shapes alone would leave GPT-2 SP in disguise (1/sqrt(d_head) attention, a tied
    # readout without 1/width, a fixed init std): prepare does all of it
    return prepare(model, base, delta)


def token_batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, 128, (8, 17), generator=gen)
        yield {"input_ids": ids[:, :-1]}, ids[:, 1:]


def main() -> None:
    torch.manual_seed(0)
    report = verify(
        prepared_gpt2,
        [64, 128, 256],
        lambda m: mupp.SAM(m.parameters(), torch.optim.AdamW, lr=3e-3, rho=0.05, rule="DP"),
        token_batches,
        seeds=1,
    )
    print(f"verify: {'μP' if report.ok else report.problems}")
    model = prepared_gpt2(128)
    table = mupp.describe(model)
    print("\n".join(str(table).splitlines()[:8]))
    opt = mupp.SAM(
        model.parameters(), torch.optim.AdamW, lr=3e-3, rho=0.05, rule="DP", weight_decay=0.0
    )
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=4, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, max_grad_norm=1.0, lr_scheduler_type="constant",
            logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
        )  # fmt: skip
        trainer = SAMTrainer(
            model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, None)
        )
        trainer.train()
    print(f"trained {trainer.state.global_step} SAM steps; skipped {opt.skipped_steps}")


if __name__ == "__main__":
    main()
