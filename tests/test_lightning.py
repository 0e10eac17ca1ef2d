"""Lightning: automatic optimization runs SAM's two passes through the closure; the manual
recipe (first_step, then the LightningOptimizer's step) advances global_step, so max_steps
and step-based checkpoints fire.  Both equal a hand-written loop on the same batches."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mupp
from mupp.models import MLP

L = pytest.importorskip("lightning", reason="pip install -e '.[integrations]'")

X = torch.randn(48, 3072, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))
KW = dict(lr=0.1, rho=0.1, parameterization="mupp", momentum=0.9)


def loader():
    ds = torch.utils.data.TensorDataset(X, Y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


PLANS = {
    "two-pass": {},
    "momentum": dict(ascent="momentum"),
    "looksam": dict(every=2, reuse="looksam"),
}


class Automatic(L.LightningModule):
    def __init__(self, net, plan=None):
        super().__init__()
        self.net = net
        self.plan = plan or {}

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return mupp.SAM(self.net.parameters(), torch.optim.SGD, **KW, **self.plan)


class Manual(Automatic):
    def __init__(self, net, plan=None):
        super().__init__(net, plan)
        self.automatic_optimization = False

    def training_step(self, batch, _):
        x, y = batch
        opt = self.optimizers()
        if opt.optimizer.needs_ascent_gradient:  # a full step: the gradient at W first
            self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.optimizer.first_step(zero_grad=True)  # W <- W + ε
        loss = F.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        opt.step()  # completes SAM's step (restore + base step) and counts it
        opt.zero_grad()
        return loss


def hand_loop(net, steps, plan=None):
    opt = mupp.SAM(net.parameters(), torch.optim.SGD, **KW, **(plan or {}))
    for i, (x, y) in enumerate(loader()):
        if i == steps:
            break
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y).backward())
        opt.zero_grad()
    return net


def fit(module, steps, tmp_path):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader())
    return trainer


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("kind", ["automatic", "manual"])
def test_lightning_equals_hand_loop(kind, plan, tmp_path):
    torch.manual_seed(0)
    net = MLP(width=128, base_width=64)
    ref = mupp.reattach(copy.deepcopy(net))
    module = (Automatic if kind == "automatic" else Manual)(net, PLANS[plan])
    trainer = fit(module, 3, tmp_path)
    assert trainer.global_step == 3  # manual: opt.step() advanced it, max_steps stopped it
    hand_loop(ref, 3, PLANS[plan])
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
