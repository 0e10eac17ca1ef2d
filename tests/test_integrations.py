"""Frameworks: Hugging Face Trainer (SAMTrainer) and Lightning (automatic and manual
optimization) reproduce a hand-written SAM loop on the same batches."""

import copy
import warnings

import pytest
import torch
from builders import tiny_llama

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mupp.set_base_shapes(model, base, delta=delta)
    # GPT-2's layouts are all known (no role is a guess); what it lacks is said once
    assert [str(w.message).split(":")[1].strip() for w in caught] == [
        "lm_head is tied to an embedding and has no 1/width output multiplier"
    ]
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


def run_trainer(model, tmp_path, steps, accumulation=1, max_grad_norm=0.0, plan=None):
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
    opt = mupp.SAM(model.parameters(), torch.optim.SGD, **SAM_KW, **(plan or {}))
    trainer = Recording(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == steps
    return seen


PLANS = {
    "two-pass": {},
    "momentum": dict(ascent="momentum"),
    "looksam": dict(every=2, reuse="looksam"),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_samtrainer_equals_a_hand_written_sam_loop(tmp_path, plan):
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    mupp.reattach(ref)
    batches = run_trainer(model, tmp_path, steps=3, plan=PLANS[plan])
    assert len(batches) == 3
    opt = mupp.SAM(ref.parameters(), torch.optim.SGD, **SAM_KW, **PLANS[plan])
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


# --------------------------------------------------------------------------------------------
# prepare / restore: a Hugging Face language model made μP
# --------------------------------------------------------------------------------------------

from mupp.integrations import huggingface as hf  # noqa: E402


def llama(width, tie=False):
    return tiny_llama(width, positions=16, tie=tie)


def prepared(make, width=64, base=16, zero_init=True):
    torch.manual_seed(0)
    model = make(width)
    with torch.device("meta"):
        b, d = make(base), make(2 * base)
    return hf.prepare(model, b, d, zero_init=zero_init)


FAMILIES = {"gpt2": gpt2, "llama": llama, "llama-tied": lambda w: llama(w, tie=True)}


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_scales_attention_to_one_over_d_head_equal_at_base(family):
    make = FAMILIES[family]
    model = prepared(make, 64, 16)
    with torch.device("meta"):
        own_base = make(16)
    for name, attn in hf._attention_modules(model).items():
        base_attn = dict(own_base.named_modules())[name]
        # 1/d_head, written so that it is the model's own 1/sqrt(d_head) at base width
        assert attn.scaling == pytest.approx(base_attn.scaling * base_attn.head_dim / attn.head_dim)
        assert attn.scaling == pytest.approx(base_attn.head_dim**0.5 / attn.head_dim)
    assert hf._attention_modules(model)  # found some


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_readout_multiplier_roles_and_zero_init(family):
    model = prepared(FAMILIES[family], 64, 16)
    head = model.get_output_embeddings()
    assert head._mupp_output_mult == pytest.approx(16 / 64)
    tied = head.weight is model.get_input_embeddings().weight
    info = mupp.get_info(head.weight)
    if tied:  # mup's MuSharedReadout: the embedding's input-like role, no recorded multiplier
        assert info.role == "input" and info.multiplier == 0.0 and tied == (family != "llama")
        assert head.weight.abs().sum() > 0  # the embedding is not zeroed
    else:  # output-like with the 1/m multiplier recorded (Lemma F.12)
        assert info.role == "output" and info.multiplier == 1.0
        assert head.weight.abs().sum() == 0
    for attn in hf._attention_modules(model).values():
        for t in hf._query_weights(attn, ""):
            assert t.abs().sum() == 0
    # the logits carry the multiplier: the head's output is 1/m of its linear map
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        h = model.model(x).last_hidden_state if family != "gpt2" else model.transformer(x)[0]
        assert torch.allclose(model(x).logits, torch.nn.functional.linear(h, head.weight) / 4)


def test_prepare_rescales_the_init_like_mup():
    torch.manual_seed(0)
    stock = llama(128)
    model = prepared(llama, 128, 32, zero_init=False)
    w = dict(model.named_parameters())
    # hidden: the model's own std 0.02 at base width, times sqrt(base_fan_in / fan_in)
    assert w["model.layers.0.mlp.down_proj.weight"].std().item() == pytest.approx(
        0.02 * (64 / 256) ** 0.5, rel=0.05
    )
    assert w["model.layers.0.self_attn.o_proj.weight"].std().item() == pytest.approx(0.01, rel=0.05)
    # input-like (embedding) and the multiplied readout keep the base's std
    assert w["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert w["lm_head.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert stock.model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_sam_reads_the_recorded_multiplier_lr_and_exponents():
    model = prepared(llama, 64, 16)
    opt = mupp.SAM(model.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.05)
    assert opt.weight_multipliers == {"output": 1.0}
    assert opt.exponents == mupp.theory.variant_exponents(
        "sam", "mupp", weight_multipliers={"output": 1.0}
    )  # Lemma F.12 (b): d = d_1 = d_{L+1} = -1/2, hidden 1/2
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr[id(model.lm_head.weight)] == pytest.approx(1e-3)  # Adam: (1/m) m^a = 1
    assert lr[id(model.model.layers[0].mlp.down_proj.weight)] == pytest.approx(1e-3 / 4)


def test_prepare_records_the_settings_and_restore_reapplies_them(tmp_path):
    model = prepared(gpt2, 64, 16)
    x = torch.randint(0, 64, (2, 8))
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.mupp["readout"] == "lm_head" and loaded.config.mupp["tied"]
    with torch.no_grad():
        assert not torch.allclose(loaded(x).logits, model(x).logits)  # not μP until restored
        hf.restore(loaded)
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert [r["role"] for r in mupp.describe(loaded)] == [r["role"] for r in mupp.describe(model)]
    # state_dict round trip: no extra keys, the same outputs
    fresh = prepared(gpt2, 64, 16)
    assert set(fresh.state_dict()) == set(transformers.GPT2LMHeadModel(model.config).state_dict())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="was not prepared"):
        hf.restore(gpt2(64))
    with pytest.raises(ValueError, match="already prepared"):
        hf.prepare(loaded, gpt2(16))


def test_prepare_keeps_working_under_torch_compile():
    model = prepared(llama, 64, 16, zero_init=False)
    x = torch.randint(0, 64, (2, 8))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x).logits, model(x).logits, atol=1e-6)
    opt = mupp.SAM(compiled.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.05, model=compiled)

    def closure():
        loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure)) and opt.skipped_steps == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: hf.prepare(gpt2(32), gpt2(32)), "no parameter has a dimension that grows"),
        (lambda: hf.prepare(gpt2(32), llama(16)), "base is a LlamaForCausalLM"),
        (
            lambda: hf.prepare(torch.nn.Linear(2, 2), gpt2(16)),
            "must be a transformers.PreTrainedModel",
        ),
        (
            lambda: hf.prepare(
                transformers.GPT2Model(gpt2(32).config), transformers.GPT2Model(gpt2(16).config)
            ),
            "has no output embeddings",
        ),
    ],
)
def test_prepare_refuses_bad_input_and_leaves_the_model_untouched(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bad()


def test_prepare_names_a_missing_attention_scaling_and_changes_nothing():
    model = gpt2(32)
    for m in model.modules():  # an architecture whose attention keeps no scaling attribute
        if hasattr(m, "scaling"):
            del m.scaling
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no attention modules with a scaling attribute"):
        hf.prepare(model, gpt2(16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not getattr(model, "_mupp_shapes", None) and not getattr(model.config, "mupp", None)
    assert not model.lm_head._forward_hooks
