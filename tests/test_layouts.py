"""Roles on layouts mupp did not build: timm-style token parameters, Hugging Face Conv1D,
embeddings prepared by microsoft/mup, transposed convolutions; guesses are announced."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import mupp
from mupp.shapes import get_info


class TimmStyleViT(nn.Module):
    """timm's VisionTransformer layout in plain modules (timm itself needs torchvision)."""

    def __init__(self, d, patches=16, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 8, stride=8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, d))
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)


def rows(model):
    return {r["name"]: r for r in mupp.describe(model)}


def test_token_parameters_are_input_like_and_announced_as_guesses():
    with pytest.warns(UserWarning, match=r"cls_token: input \(shape \(1, 1, 64\)\)") as rec:
        m = mupp.set_base_shapes(TimmStyleViT(64), TimmStyleViT(16))
    msg = str(rec[0].message)
    assert "pos_embed: input" in msg and "overrides={'cls_token': 'input'}" in msg
    r = rows(m)
    assert r["cls_token"]["role"] == "input" and r["cls_token"]["source"] == "guess"
    assert (r["cls_token"]["fan_in"], r["cls_token"]["fan_out"]) == (1, 64)
    assert r["pos_embed"]["role"] == "input" and r["pos_embed"]["fan_in"] == 17
    assert r["pos_embed"]["width_mult"] == 4
    assert r["head.weight"]["role"] == "output" and r["head.weight"]["source"] == "layer"
    assert r["qkv.weight"]["role"] == "hidden" and r["patch_embed.weight"]["role"] == "input"
    # declared: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m2 = mupp.set_base_shapes(
            TimmStyleViT(64),
            TimmStyleViT(16),
            overrides={"cls_token": "input", "pos_embed": "input"},
        )
    assert rows(m2)["cls_token"]["source"] == "override"


def test_token_parameters_get_the_input_learning_rate_under_adam():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mupp.set_base_shapes(TimmStyleViT(64), TimmStyleViT(16))
    opt = mupp.MuAdamW(m.parameters(), lr=1e-3)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr[id(m.cls_token)] == pytest.approx(1e-3)  # input-like: unscaled (not 1/m)
    assert lr[id(m.pos_embed)] == pytest.approx(1e-3)
    assert lr[id(m.head.weight)] == pytest.approx(1e-3 / 4)  # the readout: 1/fan_in


class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout (transformers.pytorch_utils): weight is (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class GPT2Block(nn.Module):
    def __init__(self, n, vocab=50):
        super().__init__()
        self.wte = nn.Embedding(vocab, n)
        self.c_attn = Conv1D(3 * n, n)
        self.c_proj = Conv1D(n, n)
        self.c_fc_in = Conv1D(n, 7)  # an input-like Conv1D: only fan_out grows
        self.lm_head = nn.Linear(n, vocab, bias=False)


def test_hf_conv1d_fans_are_not_swapped():
    m = mupp.set_base_shapes(GPT2Block(64), GPT2Block(16))
    r = rows(m)
    assert (r["c_attn.weight"]["fan_in"], r["c_attn.weight"]["fan_out"]) == (64, 192)
    assert r["c_attn.weight"]["role"] == "hidden" and r["c_attn.weight"]["source"] == "layer"
    assert r["c_fc_in.weight"]["role"] == "input" and r["c_fc_in.weight"]["fan_in"] == 7
    assert r["wte.weight"]["role"] == "input" and r["lm_head.weight"]["role"] == "output"


def test_real_hf_conv1d_if_installed():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class Net(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.c_attn = pytorch_utils.Conv1D(3 * n, n)

    m = mupp.set_base_shapes(Net(64), Net(16))
    info = get_info(m.c_attn.weight)
    assert (info.fan_in, info.fan_out, info.role) == (64, 192, "hidden")


def test_transposed_convolution_layout():
    def net(c):
        return nn.Sequential(nn.Conv2d(3, c, 3), nn.ConvTranspose2d(c, 5, 3))

    m = mupp.set_base_shapes(net(32), net(8))
    info = get_info(m[1].weight)  # (in = c, out = 5, 3, 3)
    assert (info.fan_in, info.fan_out, info.role) == (32 * 9, 5, "output")


def test_a_second_readout_is_announced():
    class TwoHeads(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.body = nn.Linear(8, d)
            self.aux = nn.Linear(d, 3)
            self.head = nn.Linear(d, 10)

    with pytest.warns(UserWarning, match=r"aux.weight: output, but it is not the last readout"):
        mupp.set_base_shapes(TwoHeads(32), TwoHeads(8))


def test_mup_prepared_embedding_is_input_like_without_reattach():
    mup = pytest.importorskip("mup", reason="pip install --no-deps mup==1.0.0")

    def net(d):
        return nn.Sequential(nn.Embedding(40, d), nn.Linear(d, d), mup.MuReadout(d, 5))

    model = net(64)
    mup.set_base_shapes(model, net(16), delta=net(32))
    info = get_info(model[0].weight)  # no mupp.reattach: mup's infshape alone
    assert (info.role, info.fan_in, info.fan_out, info.width_mult) == ("input", 40, 64, 4)
    assert info.source == "mup"
    assert get_info(model[1].weight).role == "hidden"
    # with the modules known, the embedding is declared by its layer type
    mupp.reattach(model)
    assert get_info(model[0].weight).role == "input"
    assert get_info(model[0].weight).source == "layer"


def test_a_copied_parameter_keeps_its_exact_record():
    m = mupp.set_base_shapes(GPT2Block(64), GPT2Block(16))
    # no reattach: the view on the parameter (p.infshape) carries the record, so the readout
    # is not mistaken for an embedding by mup's shape convention
    head, attn = pickle.loads(pickle.dumps((m.lm_head.weight, m.c_attn.weight)))
    assert get_info(head).role == "output" and get_info(head).source == "layer"
    assert get_info(attn).fan_in == 64
    twin = mupp.reattach(copy.deepcopy(m))
    assert get_info(twin.lm_head.weight).role == "output"


def test_unknown_override_role_names_parameter_and_roles():
    with pytest.raises(ValueError, match=r"overrides\['cls_token'\]: role must be one of"):
        mupp.set_base_shapes(TimmStyleViT(64), TimmStyleViT(16), overrides={"cls_token": "token"})
