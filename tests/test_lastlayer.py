"""Last-layer SAM in one forward and one backward equals the two-pass step (Remark 3)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mupp
from mupp.lab.config import TrainConfig
from mupp.lab.train import train
from mupp.models import MLP
from mupp.optim.lastlayer import LastLayerStep, readout_module


def batches(n=4):
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(32, 3072, generator=g), torch.randint(0, 10, (32,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    ],
)
@pytest.mark.parametrize("parameterization", ["mup-global", "mupp"])
def test_one_pass_equals_two_passes(base, kw, parameterization):
    torch.manual_seed(0)
    model = MLP(256, base_width=64, output_mult=0.5)  # the multiplier lives in the readout
    ref = mupp.reattach(copy.deepcopy(model))

    def sam(m):
        return mupp.SAM(
            m.parameters(),
            base,
            rho=0.2,
            variant="last-layer",
            parameterization=parameterization,
            **kw,
        )

    opt, opt_ref = sam(model), sam(ref)
    fast = LastLayerStep(model, opt)
    assert readout_module(model)[0] == "layers.2"
    for x, y in batches():
        loss, out = fast.step(x, y, F.cross_entropy)
        assert fast.fast

        def closure(x=x, y=y):
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        loss_ref = opt_ref.step(closure)
        opt_ref.zero_grad()
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
        assert out.shape == (32, 10)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert p.grad is None


class Wrapped(nn.Module):
    """An operation follows the readout: the one-pass step cannot reuse its output."""

    def __init__(self):
        super().__init__()
        self.net = MLP(128, base_width=64)

    def forward(self, x):
        return torch.tanh(self.net(x))


def test_falls_back_when_an_operation_follows_the_readout():
    torch.manual_seed(0)
    model = Wrapped()
    ref = copy.deepcopy(model)
    mupp.reattach(ref.net)
    opt = mupp.SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.2, variant="last-layer")
    opt_ref = mupp.SAM(ref.parameters(), torch.optim.SGD, lr=0.1, rho=0.2, variant="last-layer")
    fast = LastLayerStep(model, opt)
    for x, y in batches(2):
        fast.step(x, y, F.cross_entropy)
        assert not fast.fast and "operation follows it" in fast.fallback_reason
        opt_ref.step(lambda x=x, y=y: F.cross_entropy(ref(x), y).backward())
        opt_ref.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_needs_last_layer_sam():
    model = MLP(128, base_width=64)
    with pytest.raises(ValueError, match="variant='last-layer'"):
        LastLayerStep(model, mupp.SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1))


def test_mupp_train_uses_it_and_can_turn_it_off():
    cfg = dict(dataset="synthetic", width=128, base_width=64, epochs=2, variant="last-layer")
    cfg.update(parameterization="mup-global", rho=0.2, lr=0.05)
    on = train(TrainConfig.from_dict(cfg), progress=False, log=None)
    off = train(TrainConfig.from_dict(dict(cfg, last_layer_fast=False)), progress=False, log=None)
    assert on["config"]["last_layer_fast"] and not off["config"]["last_layer_fast"]
    for a, b in zip(on["history"], off["history"]):
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=2e-3)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
