"""mupp.diagnostics.verify: μP models pass (mupp's MLP, ResNet, ViT, GPT; Hugging Face GPT-2
and Llama after prepare), stock transformers fail with the cause named, bad input is refused,
and ``mupp verify`` exits 0 / 1."""

import pytest
import torch
from builders import tiny_llama

import mupp
from mupp.diagnostics import verify
from mupp.lab import data as data_mod
from mupp.lab.checks import infinite_batches, token_batches
from mupp.models import build


def tokens(vocab=64, seq_len=16, as_dict=False):
    def batches(seed):
        for x, y in token_batches(vocab, 8, seq_len, torch.Generator().manual_seed(seed)):
            yield ({"input_ids": x} if as_dict else x), y

    return batches


def images(flat, dataset="synthetic", data_dir=None):
    ds = data_mod.load(dataset, data_dir)
    return lambda seed: infinite_batches(ds, 32, torch.Generator().manual_seed(seed), flat)


def adamw_sam(model):
    return mupp.SAM(
        model.parameters(), torch.optim.AdamW, lr=3e-3, rho=0.05, rule="DP", weight_decay=0.0
    )


def sgd_sam(model):
    return mupp.SAM(model.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, rule="DP")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mupps_gpt_passes(tie):
    def make(w):
        return build(
            "gpt", w, 64, n_layer=2, n_head=4, block_size=16, vocab_size=64, tie_readout=tie
        )

    report = verify(make, [64, 128, 256], adamw_sam, tokens())
    assert report.ok, report.problems
    assert "attention logits 0" in report.data["outputs"]["values"]  # measured through SDPA
    assert "verdict: μP" in str(report)


def test_mlp_and_vit_pass():
    report = verify(lambda w: build("mlp", w, 64), [64, 128, 256], sgd_sam, images(True))
    assert report.ok, report.problems

    def vit(w):
        return build("vit", w, 32, depth=2, heads=2, num_classes=10, patch=8)

    report = verify(vit, [32, 64, 128], adamw_sam, images(False))
    assert report.ok, report.problems


def test_resnet_passes_under_dp_and_lp_names_its_denominator(datasets_dir):
    if datasets_dir is None:
        pytest.skip("the ResNet's check needs CIFAR-10 (../shared/datasets)")
    batches = images(False, "cifar10", datasets_dir)

    def make(w):
        return build("resnet8", w, 16, num_classes=10)

    assert verify(make, [16, 32, 64], sgd_sam, batches, steps=10, seeds=2).ok
    lp = verify(
        make,
        [16, 32, 64],
        lambda m: mupp.SAM(m.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, rule="LP"),
        batches,
        steps=10,
        seeds=1,
    )
    # at 16 channels LP's joint norm is still dominated by the shrinking hidden/readout terms
    assert any(p.startswith("denominator") and "rule='DP'" in p for p in lp.problems)


transformers = pytest.importorskip("transformers", reason="pip install -e '.[integrations]'")
from mupp.integrations.huggingface import prepare  # noqa: E402


def gpt2(w):
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0, n_embd=w, n_layer=2,
        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def llama(w):
    return tiny_llama(w, layers=2)


def factory(make, how):
    def f(w):
        model = make(int(w))
        with torch.device("meta"):
            base, delta = make(32), make(64)
        if how == "prepare":
            return prepare(model, base, delta)
        return mupp.set_base_shapes(model, base, delta)

    return f


WIDTHS = [64, 128, 256]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prepared_hf_models_pass(family):
    make = {"gpt2": gpt2, "llama": llama}[family]
    report = verify(factory(make, "prepare"), WIDTHS, adamw_sam, tokens(as_dict=True))
    assert report.ok, report.problems
    if family == "llama":  # separate query/key projections: measured, and said why they decay
        assert any("q_proj" in n and "1/sqrt(d_head)" in n for n in report.notes)


def test_stock_gpt2_fails_with_the_causes_named():
    report = verify(factory(gpt2, "set_base_shapes"), WIDTHS, adamw_sam, tokens())
    assert not report.ok
    text = "\n".join(report.problems)
    assert "logits at init: grow like width^+0." in text
    assert "tied embeddings? use mupp.integrations.huggingface.prepare" in text
    assert "attention logits 0: grow like width^+" in text and "1/sqrt(d_head)" in text
    assert "transformer.h.0.attn.c_proj: output change grows like width^+" in text


def test_stock_llama_fails_on_its_attention_output():
    report = verify(factory(llama, "set_base_shapes"), WIDTHS, adamw_sam, tokens())
    lines = [
        p for p in report.problems if p.startswith("model.layers.0.self_attn.o_proj: output change")
    ]
    assert not report.ok and lines and "1/d_head" in lines[0]
    exponent = float(lines[0].split("width^")[1].split(",")[0])
    assert exponent > 0.5


def test_mupp_verify_sp_checks_the_standard_gpt_and_names_why_it_is_not_mup(capsys):
    from mupp.lab.cli import main

    args = ["verify", "--model", "gpt", "--widths", "64,128,256", "--seeds", "1", "--no-progress"]
    assert main([*args, "--parameterization", "sp", "--rho", "0.2"]) == 1
    out = capsys.readouterr().out
    # the standard network: 1/sqrt(d_head) attention and no 1/width multiplier on the logits
    assert "logits: change grows like width^+" in out
    assert "attention logits 0: grow like width^+" in out and "1/sqrt(d_head)" in out
    assert "(mupp verify: adamw lr=0.003, rho=0.2, sp/sam/DP" in out


def test_verify_refuses_bad_input():
    with pytest.raises(ValueError, match="at least 3 entries"):
        verify(lambda w: build("mlp", w, 64), [64, 128], sgd_sam, images(True))
    with pytest.raises(ValueError, match="without base shapes .*set_base_shapes"):
        verify(lambda w: torch.nn.Linear(3072, int(w)), [8, 16, 32], sgd_sam, images(True))
    with pytest.raises(TypeError, match="returned dict, not an nn.Module"):
        verify(lambda w: {}, [8, 16, 32], sgd_sam, images(True))


def test_mupp_verify_cli_exits_0_on_a_pass_and_1_on_a_fail(tmp_path, capsys, monkeypatch):
    from mupp.lab.cli import main

    (tmp_path / "stockmodels.py").write_text(
        "import torch, transformers, mupp\n"
        "def make(w):\n"
        "    cfg = lambda n: transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=n,\n"
        "        n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0)\n"
        "    m = transformers.GPT2LMHeadModel(cfg(int(w)))\n"
        "    with torch.device('meta'):\n"
        "        b, d = transformers.GPT2LMHeadModel(cfg(32)), transformers.GPT2LMHeadModel(cfg(64))\n"
        "    return mupp.set_base_shapes(m, b, d)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["verify", "--widths", "64,128,256", "--seeds", "1", "--no-progress"]
    assert main([*args, "--model", "gpt"]) == 0
    assert "verdict: μP" in capsys.readouterr().out
    assert main([*args, "--model", "stockmodels:make", "--json", str(tmp_path / "v.json")]) == 1
    out = capsys.readouterr().out
    assert "problem(s)" in out and "attention logits" in out
    assert (tmp_path / "v.json").exists()
    assert main(["verify", "--widths", "64,128"]) == 2
    assert "--widths needs at least 3 widths" in capsys.readouterr().err
