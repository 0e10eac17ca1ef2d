"""Width bookkeeping: roles, fans, metadata survival, .bsh files, mup interop, μP factors."""

import copy
import io
import pickle

import pytest
import torch
from builders import mlp, prepared_mlp
from torch import nn

import mupp
from mupp import scaling
from mupp.shapes import get_info, load_base_shapes


def roles(model):
    return {r["name"]: r["role"] for r in mupp.describe(model)}


def test_mlp_roles_and_fans():
    m = prepared_mlp(32, 8, bias=True)
    r = {row["name"]: row for row in mupp.describe(m)}
    assert r["0.weight"]["role"] == "input" and r["0.weight"]["fan_in"] == 12
    assert r["0.bias"]["role"] == "input"
    assert r["2.weight"]["role"] == "hidden" and r["2.weight"]["width_mult"] == 4
    assert r["4.weight"]["role"] == "output" and r["4.weight"]["fan_in"] == 32
    assert r["4.bias"]["role"] == "fixed"
    table = str(mupp.describe(m))
    assert table.splitlines()[0].split() == [
        "name",
        "shape",
        "role",
        "source",
        "fan_in",
        "fan_out",
        "width_mult",
    ]
    assert r["0.weight"]["source"] == "layer" and r["0.bias"]["source"] == "vector"
    assert "32x12" in table


class TinyCNN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3)
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, 2 * c, 3, bias=False)
        self.gn = nn.GroupNorm(2, 2 * c)
        self.fc = nn.Linear(2 * c, 10)


class TinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 50, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_cnn_roles_and_conv_fan_in():
    m = mupp.set_base_shapes(TinyCNN(16), TinyCNN(4))
    r = roles(m)
    assert r == {
        "stem.weight": "input",
        "stem.bias": "input",
        "bn.weight": "input",
        "bn.bias": "input",
        "conv.weight": "hidden",
        "gn.weight": "input",
        "gn.bias": "input",
        "fc.weight": "output",
        "fc.bias": "fixed",
    }
    info = get_info(m.conv.weight)
    assert info.fan_in == 16 * 9 and info.base_fan_in == 4 * 9 and info.fan_out == 32
    assert info.width_dims == (True, True, False, False)
    assert get_info(m.bn.weight).is_norm and not get_info(m.conv.weight).is_norm


def test_transformer_block_roles_fused_qkv_and_tying():
    m = mupp.set_base_shapes(TinyBlock(64), TinyBlock(16))
    r = roles(m)
    assert r["emb.weight"] == "input"  # embedding: fan_out = embedding dim; tied head shares it
    assert "head.weight" not in r
    assert (
        r["ln.weight"] == "input" and r["qkv.weight"] == "hidden" and r["proj.weight"] == "hidden"
    )
    assert r["qkv.bias"] == "input"
    assert get_info(m.qkv.weight).fan_out == 192


def test_delta_tells_width_dims_at_base_width():
    m = mupp.set_base_shapes(mlp(8), mlp(8), delta=mlp(16))
    assert [r["role"] for r in mupp.describe(m)] == ["input", "hidden", "output"]
    assert all(r["width_mult"] == 1 for r in mupp.describe(m))
    with pytest.raises(ValueError, match="no parameter has a dimension that grows with width"):
        mupp.set_base_shapes(mlp(8), mlp(8))  # no delta: nothing can be told to scale


def test_override_and_idempotence():
    m = prepared_mlp()
    mupp.set_base_shapes(m, mlp(8), delta=mlp(16), overrides={"4.*": "hidden"})
    assert roles(m)["4.weight"] == "hidden"
    mupp.set_base_shapes(m, mlp(8), delta=mlp(16))
    mupp.set_base_shapes(m, mlp(8), delta=mlp(16))
    assert roles(m)["4.weight"] == "output"
    with pytest.raises(ValueError, match=r"overrides\['4.weight'\]: role must be one of"):
        mupp.set_base_shapes(m, mlp(8), overrides={"4.weight": "readout"})


def test_mismatched_base_is_rejected():
    with pytest.raises(ValueError, match="base does not match model"):
        mupp.set_base_shapes(mlp(8), nn.Sequential(nn.Linear(12, 8)))
    with pytest.raises(TypeError, match="base must be"):
        mupp.set_base_shapes(mlp(8), 3)


def _classifier(width: int, inputs: int = 3072, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )  # fmt: skip


def test_base_with_other_classes_is_refused_and_leaves_the_model_as_it_was():
    model = _classifier(256)
    with pytest.raises(ValueError) as err:
        mupp.set_base_shapes(model, _classifier(64, classes=100))
    message = str(err.value)
    assert "wider than the model in some dimensions and narrower in others" in message
    assert "4.weight dim 0: 10 in the model, 100 in base" in message
    assert "most width dimensions are x4" in message and "delta=" in message
    assert get_info(model[0].weight) is None  # nothing half-applied


def test_base_with_another_input_size_warns_and_names_the_dimension():
    with pytest.warns(UserWarning, match="most width dimensions are x4 the base's") as record:
        mupp.set_base_shapes(_classifier(256), _classifier(64, inputs=784))
    message = str(record[0].message)
    assert "0.weight dim 1: 3072 in the model, 784 in base" in message
    assert "build base with the model's input and output sizes" in message


def test_uniform_width_and_a_confirming_delta_pass_without_a_warning(recwarn):
    mupp.set_base_shapes(_classifier(256), _classifier(64))
    # a model that scales its input dimension too, confirmed by a delta: no warning
    mupp.set_base_shapes(
        _classifier(256, inputs=300),
        _classifier(64, inputs=100),
        delta=_classifier(128, inputs=200),
    )
    assert not [w for w in recwarn if "width dimensions" in str(w.message)]


def _info_tuple(model):
    return [(r["name"], r["role"], r["fan_in"], r["width_mult"]) for r in mupp.describe(model)]


def test_metadata_survives_copy_pickle_save_dtype_and_state_dict():
    m = prepared_mlp()
    ref = _info_tuple(m)
    d = copy.deepcopy(m)
    assert _info_tuple(mupp.reattach(d)) == ref
    assert get_info(d[2].weight).role == "hidden"
    p = pickle.loads(pickle.dumps(m))
    assert _info_tuple(p) == ref
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    s = torch.load(buf, weights_only=False)
    assert _info_tuple(s) == ref
    m.to(torch.float64)
    assert get_info(m[0].weight).role == "input"
    fresh = mlp(32)
    fresh._mupp_shapes = m._mupp_shapes
    fresh.load_state_dict(m.to(torch.float32).state_dict())
    assert _info_tuple(mupp.reattach(fresh)) == ref


def test_wrapper_prefixes_ddp_and_compile_names():
    m = prepared_mlp()
    wrapper = nn.Module()
    wrapper.module = m  # what DDP does
    wrapper._mupp_shapes = {}
    assert [r["name"] for r in mupp.describe(mupp.reattach(wrapper))] == [
        "0.weight",
        "2.weight",
        "4.weight",
    ]
    w2 = nn.Module()
    w2._orig_mod = mlp(32)
    mupp.set_base_shapes(
        w2, {"_orig_mod." + k: v for k, v in mupp.shapes.get_shapes(mlp(8)).items()}
    )
    assert roles(w2)["4.weight"] == "output"


def test_bsh_roundtrip(tmp_path):
    m = prepared_mlp()
    path = tmp_path / "base.bsh"
    mupp.save_base_shapes(m, path)
    loaded = load_base_shapes(path)
    assert (
        loaded["0.weight"] == (8, None)
        and loaded["2.weight"] == (8, 8)
        and loaded["4.weight"] == (None, 8)
    )
    m2 = mupp.set_base_shapes(
        mlp(8), str(path)
    )  # base width itself: roles still known from the file
    assert [r["role"] for r in mupp.describe(m2)] == ["input", "hidden", "output"]


def test_infshape_view_matches_mup_conventions():
    m = prepared_mlp(32, 8)
    inf = m[2].weight.infshape
    assert inf.ninf() == 2 and inf.width_mult() == 4 and inf.fanin_fanout_mult_ratio() == 1
    assert m[0].weight.infshape.ninf() == 1 and m[0].weight.infshape.width_mult() == 4
    assert m[0].weight.infshape.base_shape() == [8, None]


@pytest.mark.parametrize("mult", [1, 2, 4])
def test_lr_factors_match_spec_section_2(mult):
    m = prepared_mlp(8 * mult, 8)
    f = {r["name"]: get_info(p) for r, p in zip(mupp.describe(m), m.parameters())}
    sgd = [scaling.lr_factor(f[n], "sgd") for n in ("0.weight", "2.weight", "4.weight")]
    adam = [scaling.lr_factor(f[n], "adam") for n in ("0.weight", "2.weight", "4.weight")]
    assert sgd == pytest.approx([mult, 1, 1 / mult])  # fan_out/fan_in
    assert adam == pytest.approx([1, 1 / mult, 1 / mult])  # 1/fan_in
    init = [scaling.init_std_factor(f[n]) for n in ("0.weight", "2.weight", "4.weight")]
    # σ ∝ fan_in^-1/2 min(1, sqrt(fan_out/fan_in)), the min taken as width grows (b_1 = 0)
    assert init == pytest.approx([1, mult**-0.5, 1 / mult])


def test_musgd_and_muadamw_groups():
    m = prepared_mlp(32, 8)
    opt = mupp.MuSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.025, 0.1, 0.4])
    for g in opt.param_groups:
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.1 * 1e-4)
    base = prepared_mlp(8, 8)
    a1 = mupp.MuAdamW(base.parameters(), lr=1e-3, weight_decay=0.1)
    a2 = torch.optim.AdamW(base.parameters(), lr=1e-3, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in a1.param_groups] == [(1e-3, 0.1)]
    assert a2.defaults["lr"] == a1.param_groups[0]["lr"]


def test_at_width_mult_one_muadamw_is_exactly_adamw():
    torch.manual_seed(1)
    a = prepared_mlp(8, 8)
    b = copy.deepcopy(a)
    mupp.reattach(b)
    oa = mupp.MuAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(16, 12)
    for _ in range(3):
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_mup_prepared_model_is_accepted_and_lrs_match_mup():
    mup = pytest.importorskip(
        "mup", reason="microsoft/mup not installed (pip install --no-deps mup==1.0.0)"
    )

    def net(w):
        return nn.Sequential(
            nn.Linear(12, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), mup.MuReadout(w, 5)
        )

    model = net(64)
    mup.set_base_shapes(model, net(16), delta=net(32))
    for name, _kind, mupp_ctor, mup_ctor in (
        ("sgd", "sgd", mupp.MuSGD, mup.MuSGD),
        ("adamw", "adam", mupp.MuAdamW, mup.MuAdamW),
    ):
        ours = mupp_ctor(model.parameters(), lr=0.1, weight_multipliers={"output": 1.0})
        theirs = mup_ctor(model.parameters(), lr=0.1)

        def per_param(opt):
            return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}

        po, pt = per_param(ours), per_param(theirs)
        assert po.keys() == pt.keys()
        for k in po:
            assert po[k] == pytest.approx(pt[k]), name


def test_override_records_a_weight_multiplier_and_a_bsh_dict_round_trips():
    model = prepared_mlp_with_readout_multiplier()
    info = mupp.get_info(model[-1].weight)
    assert info.multiplier == 1.0 and info.role == "output"
    table = mupp.shapes.base_shapes_table(model)
    assert table["0.weight"] == [8, None]  # None: a finite dimension, as in a .bsh file
    again = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )
    mupp.set_base_shapes(again, table)
    assert [r["role"] for r in mupp.describe(again)] == [r["role"] for r in mupp.describe(model)]


def prepared_mlp_with_readout_multiplier():
    def make(w):
        return nn.Sequential(
            nn.Linear(12, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 5)
        )

    model = make(32)
    return mupp.set_base_shapes(model, make(8), overrides={"4.weight": {"multiplier": 1.0}})


def test_infer_base_shapes_changes_nothing_and_overrides_are_checked():
    model = nn.Sequential(nn.Linear(12, 32), nn.Linear(32, 5))
    records = mupp.shapes.infer_base_shapes(model, nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 5)))
    assert records["1.weight"].role == "output" and mupp.get_info(model[0].weight) is None
    with pytest.raises(ValueError, match="unknown keys \\['multplier'\\]"):
        mupp.set_base_shapes(model, nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 5)),
                             overrides={"1.weight": {"multplier": 1}})  # fmt: skip
    with pytest.raises(ValueError, match="multiplier must be a number"):
        mupp.set_base_shapes(model, nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 5)),
                             overrides={"1.weight": {"multiplier": "1"}})  # fmt: skip
    assert mupp.get_info(model[0].weight) is None  # a refused call attaches nothing
