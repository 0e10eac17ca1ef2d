"""μP² SAM in Lightning, both ways: automatic optimization (return ``mupp.SAM`` from
``configure_optimizers``; Lightning's closure runs both passes) and manual optimization
(``first_step``, then the LightningOptimizer's ``step()``, which completes SAM's step and
advances ``trainer.global_step``).

    pip install torch==2.13.0 -e ".[integrations]"
    python examples/lightning_sam.py
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

import mupp
from mupp.models import MLP


class Automatic(L.LightningModule):
    def __init__(self, width: int = 256):
        super().__init__()
        self.net = MLP(width=width, base_width=64)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return mupp.SAM(self.net.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, momentum=0.9)


class Manual(Automatic):
    def __init__(self, width: int = 256):
        super().__init__(width)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.optimizer.first_step(zero_grad=True)  # W <- W + ε
        loss = F.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        opt.step()  # restore W, base step; counts as a step for max_steps and checkpoints
        opt.zero_grad()
        self.log("loss", loss)
        return loss


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(256, 3072), torch.randint(0, 10, (256,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    for module in (Automatic(), Manual()):
        trainer = L.Trainer(
            max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, data)
        print(f"{type(module).__name__}: {trainer.global_step} steps")


if __name__ == "__main__":
    main()
