"""Frameworks: Hugging Face Trainer (SAMTrainer) and Lightning (automatic and manual
optimization) reproduce a hand-written SAM loop on the same batches."""

import copy
import warnings

import pytest
import torch

import mupp

transformers = pytest.importorskip("transformers", reason="pip install -e '.[integrations]'")


def gpt2(n_embd):
    cfg = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        n_embd=n_embd,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def tiny_gpt2():
    torch.manual_seed(0)
    model = gpt2(32)
    with torch.device("meta"):
        base, delta = gpt2(16), gpt2(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GPT-2's layouts are all known: no role is a guess
        mupp.set_base_shapes(model, base, delta=delta)
    return model


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, length=8):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        # the first label is ignored (-100): the Trainer divides the summed loss by the number
        # of labels, the model's own mean by the number of shifted targets; so they agree
        labels = self.ids[i].clone()
        labels[0] = -100
        return {"input_ids": self.ids[i], "labels": labels}


# SGD: linear in the gradient, so the comparison sees float rounding only (Adam's first step
# is sign-like and turns rounding in near-zero gradients into lr-sized differences)
SAM_KW = dict(lr=0.5, rho=0.05, parameterization="mupp", momentum=0.9)


def run_trainer(model, tmp_path, steps, accumulation=1, max_grad_norm=0.0):
    from mupp.integrations.huggingface import SAMTrainer

    seen = []

    class Recording(SAMTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=SAM_KW["lr"],
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
    )
    opt = mupp.SAM(model.parameters(), torch.optim.SGD, **SAM_KW)
    trainer = Recording(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == steps
    return seen


def test_samtrainer_equals_a_hand_written_sam_loop(tmp_path):
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    mupp.reattach(ref)
    batches = run_trainer(model, tmp_path, steps=3)
    assert len(batches) == 3
    opt = mupp.SAM(ref.parameters(), torch.optim.SGD, **SAM_KW)
    ref.train()
    for b in batches:

        def closure(b=b):
            loss = ref(**b).loss
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    moved = 0.0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (p - tiny_gpt2().state_dict()[name]).abs().max().item())
    assert moved > 1e-3  # it trained


def test_samtrainer_accumulation_is_m_sharpness(tmp_path):
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    mupp.reattach(ref)
    batches = run_trainer(model, tmp_path, steps=2, accumulation=2)
    assert len(batches) == 4
    opt = mupp.SAM(ref.parameters(), torch.optim.SGD, **SAM_KW)
    params = list(ref.parameters())
    for pair in (batches[:2], batches[2:]):
        acc = [torch.zeros_like(p) for p in params]
        for b in pair:  # the README's m-sharpness recipe
            opt.zero_grad()
            ref(**b).loss.backward()
            opt.first_step(zero_grad=True)
            (ref(**b).loss / 2).backward()
            opt.restore()
            for a, p in zip(acc, params):
                a += p.grad
        for a, p in zip(acc, params):
            p.grad = a
        opt.base_optimizer.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_samtrainer_clips_the_descent_gradient(tmp_path):
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    mupp.reattach(ref)
    batches = run_trainer(model, tmp_path, steps=2, max_grad_norm=0.05)
    opt = mupp.SAM(ref.parameters(), torch.optim.SGD, **SAM_KW)
    for b in batches:
        ref(**b).loss.backward()
        opt.first_step(zero_grad=True)
        ref(**b).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert norm > 0.05  # the clip is active
        opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_samtrainer_builds_sam_from_training_arguments(tmp_path):
    from mupp.integrations.huggingface import SAMTrainer

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no"
    )
    t = SAMTrainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(), sam_kwargs={"rho": 0.1})
    t.create_optimizer()
    assert isinstance(t.sam, mupp.SAM) and t.sam.param_groups[0]["rho"] == 0.1
    t2 = SAMTrainer(model=tiny_gpt2(), args=args, train_dataset=Tokens())
    with pytest.raises(ValueError, match="SAMTrainer needs a SAM"):
        t2.create_optimizer()


def test_plain_trainer_with_sam_fails_with_a_pointer_to_samtrainer(tmp_path):
    model = tiny_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no"
    )
    opt = mupp.SAM(model.parameters(), torch.optim.SGD, **SAM_KW)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None)
    )
    with pytest.raises(RuntimeError, match="SAMTrainer"):
        trainer.train()
