"""μP-ready models: shapes, roles, parameter counts, activation scale across widths."""

import pytest
import torch

import mupp
from mupp.models import GPT, MLP, GPTConfig, ResNet8, ResNet18, ViT, build, count_params


def roles(model):
    return {r["name"]: r["role"] for r in mupp.describe(model)}


def test_forward_shapes():
    x = torch.randn(2, 3, 32, 32)
    assert MLP(64, 32)(x).shape == (2, 10)
    assert ResNet8(0.25, 0.125)(x).shape == (2, 10)
    assert ViT(64, 32, depth=1, heads=2, num_classes=7)(x).shape == (2, 7)
    assert build("mlp", 64, 32, d_out=3)(x).shape == (2, 3)


def test_resnet18_standard_parameter_count():
    with torch.device("meta"):
        assert count_params(ResNet18(1.0, None)) == 11_173_962


def test_roles_resnet():
    r = roles(ResNet8(0.25, 0.125))
    assert r["conv1.weight"] == "input"  # stem
    assert r["bn1.weight"] == "input" and r["bn1.bias"] == "input"
    assert r["layers.0.conv1.weight"] == "hidden" and r["layers.1.shortcut.0.weight"] == "hidden"
    assert r["linear.weight"] == "output"
    assert r["linear.bias"] == "fixed"


def test_roles_vit_and_mlp():
    r = roles(ViT(64, 32, depth=1, heads=2))
    assert r["patch_embed.weight"] == "input" and r["patch_embed.bias"] == "input"
    assert r["cls_token"] == "input" and r["pos_embed"] == "input"
    assert r["blocks.0.norm1.weight"] == "input"
    assert r["blocks.0.attn.qkv.weight"] == "hidden" and r["blocks.0.fc2.weight"] == "hidden"
    assert r["head.weight"] == "output"
    r = roles(MLP(128, 64))
    assert list(r.values()) == ["input", "hidden", "output"]


def test_zero_inits():
    v = ViT(64, 32, depth=1, heads=2)
    assert v.head.weight.abs().max() == 0
    assert v.blocks[0].attn.qkv.weight[:64].abs().max() == 0
    assert v.blocks[0].attn.qkv.weight[64:].abs().max() > 0
    assert ResNet8(0.5, 0.25, readout_zero=True).linear.weight.abs().max() == 0


def test_exact_bcd_mlp_follows_definition_4():
    torch.manual_seed(0)
    m = MLP(512, exact_bcd=True)
    assert m.layers[2].weight.std().item() == pytest.approx(1 / 512, rel=0.05)  # variance n^-2
    assert m.layers[1].weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05)
    assert [r["width_mult"] for r in mupp.describe(m)] == [512, 512, 512]  # base width 1: m = n


def _hidden_rms(model, x):
    feats = []
    hooks = []
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            hooks.append(
                mod.register_forward_hook(
                    lambda m, i, o: feats.append(o.pow(2).mean().sqrt().item())
                )
            )
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return feats[:-1], out.pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    "make,widths",
    [
        (lambda w: MLP(w, 32), [32, 64, 128, 256]),
        (lambda w: ResNet8(w, 0.125), [0.125, 0.25, 0.5, 1.0]),
        (
            lambda w: ViT(
                w, 32, depth=2, heads=2, num_classes=10, readout_zero=False, zero_query=False
            ),
            [32, 64, 128, 256],
        ),
    ],
)
def test_activation_rms_stays_within_factor_2_across_widths(make, widths):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    per_width = []
    for w in widths:
        torch.manual_seed(1)
        feats, out = _hidden_rms(make(w), x)
        per_width.append(feats)
    for layer in range(len(per_width[0])):
        vals = [f[layer] for f in per_width]
        assert max(vals) / min(vals) < 2.0, (layer, vals)


def test_readout_output_shrinks_with_width_in_mup():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    outs = [_hidden_rms(MLP(w, 32), x)[1] for w in (32, 512)]
    assert outs[1] < outs[0] / 2  # f_0 -> 0 as width grows (readout variance 1/n^2)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        build("resnet50", 64)
    with pytest.raises(ValueError, match="divisible by heads"):
        ViT(65, None, heads=2)
    with pytest.raises(ValueError, match="width must be >= 1"):
        MLP(0)


def test_build_width_is_the_models_own_width_everywhere():
    """``build(name, width)``: MLP hidden units, ViT embedding size, ResNet first-stage channels
    (``width_mult = width / 64``, App. G); a fraction is refused with the unit named."""
    assert build("mlp", 96).layers[0].out_features == 96
    assert build("vit", 64, depth=1, heads=2).pos_embed.shape[-1] == 64
    resnet = build("resnet8", 16, 8)
    assert resnet.conv1.out_channels == 16
    assert mupp.get_info(resnet.conv1.weight).width_mult == 2  # base 8 channels
    assert count_params(build("resnet18", 64, None)) == count_params(ResNet18(1.0, None))
    with pytest.raises(ValueError, match="first stage, a whole number; got 0.25"):
        build("resnet8", 0.25)


# --------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------


def small_gpt(width=64, base=16, **kw):
    return GPT(width=width, base_width=base, n_layer=1, n_head=2, block_size=8, vocab_size=11, **kw)


def test_gpt_shapes_roles_and_mup_attention():
    torch.manual_seed(0)
    model = small_gpt(64, 16)
    logits = model(torch.randint(0, 11, (3, 8)))
    assert logits.shape == (3, 8, 11)
    roles = {r["name"]: r["role"] for r in mupp.describe(model)}
    assert roles["wte.weight"] == "input" and "readout.weight" not in roles  # tied: one tensor
    assert roles["blocks.0.attn.qkv.weight"] == "hidden" and roles["ln_f.weight"] == "input"
    attn = model.blocks[0].attn
    assert attn.scaling == pytest.approx(8**0.5 / 32)  # 1/d_head, = 1/sqrt(8) at base width
    assert model.output_mult == pytest.approx(16 / 64)
    assert model.blocks[0].attn.qkv.weight[:64].abs().sum() == 0  # zero query (App. G)


def test_gpt_untied_readout_records_its_multiplier_and_trains_like_an_input_layer():
    model = small_gpt(64, 16, tie_readout=False)
    info = mupp.get_info(model.readout.weight)
    assert info.role == "output" and info.multiplier == 1.0
    assert model.readout.weight.abs().sum() == 0
    opt = mupp.MuAdamW(model.parameters(), lr=1e-3)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr[id(model.readout.weight)] == pytest.approx(1e-3)  # (1/m) m^a, a = 1
    assert lr[id(model.blocks[0].fc.weight)] == pytest.approx(1e-3 / 4)
    sam = mupp.SAM(model.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.1)
    assert sam.exponents == (-0.5, {"hidden": 0.5, "input": -0.5, "output": -0.5})  # F.12 (b)


def test_gpt_at_base_width_is_the_standard_model():
    torch.manual_seed(0)
    mu = small_gpt(16, 16, zero_init=False)
    torch.manual_seed(0)
    sp = GPT(
        width=16, base_width=None, n_layer=1, n_head=2, block_size=8, vocab_size=11, zero_init=False
    )
    x = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        assert torch.equal(mu(x), sp(x))
    assert sp.blocks[0].attn.scaling == pytest.approx(8**-0.5)


@pytest.mark.parametrize("zero_init", [True, False])
def test_gpt_mup_false_is_the_standard_network_with_its_base_shapes_recorded(zero_init):
    torch.manual_seed(0)
    kw = dict(zero_init=zero_init, tie_readout=False)  # the language-model study's layout
    std = small_gpt(64, 16, mup=False, **kw)
    torch.manual_seed(0)
    plain = small_gpt(64, None, **kw)  # no base shapes at all
    assert std.state_dict().keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(std.state_dict()[name], value), name  # PyTorch's init, unrescaled
    x = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        assert torch.equal(std(x), plain(x))
    assert std.blocks[0].attn.scaling == pytest.approx(32**-0.5)  # 1/sqrt(d_head)
    assert std.readout.output_mult == 1.0
    assert mupp.get_info(std.blocks[0].fc.weight).width_mult == 4  # the metadata is there
    assert mupp.get_info(std.readout.weight).role == "output"
    torch.manual_seed(0)
    mu = small_gpt(16, 16, **kw)
    torch.manual_seed(0)
    at_base = small_gpt(16, 16, mup=False, **kw)
    with torch.no_grad():  # at its base width the standard network is the μP one
        assert torch.equal(mu(x), at_base(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mup="no"), "GPTConfig.mup must be True or False; got 'no'"),
        (dict(width=30, n_head=4), "width \\(30\\) must be divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive whole number"),
        (dict(dropout=1.0), "dropout must be in"),
    ],
)
def test_gpt_config_refuses_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_gpt_refuses_a_sequence_longer_than_its_block():
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        small_gpt()(torch.zeros(1, 9, dtype=torch.long))


def test_gpt_is_a_built_in_model():
    assert isinstance(build("gpt", 128, 64), GPT)
    assert mupp.get_info(build("gpt", 128, 64).wte.weight).width_mult == 2


@pytest.mark.parametrize("name", ["mlp", "resnet8", "vit", "gpt"])
def test_base_width_none_means_standard_shapes_for_every_model(name):
    """One meaning of base_width=None in build (and TrainConfig): no base shapes, no μP."""
    from mupp.shapes import get_info

    width = 64 if name != "vit" else 96
    model = build(name, width, None)
    assert all(get_info(p) is None for p in model.parameters())
    assert any(get_info(p) is not None for p in build(name, width, width // 2).parameters())
