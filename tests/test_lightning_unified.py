"""AutoGrow under the unified ``lightning`` package (``import lightning.pytorch as pl``), not ``pytorch_lightning``."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as lpl  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from autogrow.callbacks import AutoGrow  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from autogrow.actions import Widen  # noqa: E402
from autogrow.optim import optimizer_holds_model
from autogrow.plateau import EveryN  # noqa: E402


class TinyMLP(lpl.LightningModule):
    """8 -> hidden -> 3, SGD with momentum (state the growth must carry), ``val_loss`` logged."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class AfterGrowth(lpl.Callback):
    """The training steps taken after the last growth, and whether the first layer moved during them."""

    def __init__(self, grow: AutoGrow) -> None:
        self.grow, self.seen, self.steps_after, self.weight_at_growth = grow, 0, 0, None

    def on_train_batch_start(self, trainer: lpl.Trainer, pl_module: TinyMLP, batch: object, batch_idx: int) -> None:
        if len(self.grow.events) > self.seen:  # a growth since the last step: restart the count there
            self.seen, self.steps_after = len(self.grow.events), 0
            self.weight_at_growth = pl_module.net[0].weight.detach().clone()
        self.steps_after += self.weight_at_growth is not None


def loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16)


def test_autogrow_grows_under_lightning_pytorch(tmp_path):
    lpl.seed_everything(0, verbose=False)
    model = TinyMLP()
    grow = AutoGrow(trigger=EveryN(every=1), grow=Widen(), max_events=2, deadline=None)
    after = AfterGrowth(grow)
    trainer = lpl.Trainer(max_epochs=5, callbacks=[grow, after], logger=False, default_root_dir=tmp_path,
                          accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader(0), val_dataloaders=loader(1))

    width = model.net[0].out_features
    assert len(grow.events) == 2 and width > 4 and model.net[2].in_features == width
    assert all(e.preservation_error is None or e.preservation_error < 1e-5 for e in grow.events)
    opt = trainer.optimizers[0]
    assert optimizer_holds_model(opt, model)
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())
    assert after.steps_after > 0 and trainer.global_step == 5 * 4  # training went on after the growth ...
    assert after.weight_at_growth.shape == model.net[0].weight.shape  # taken after the last growth
    assert not torch.equal(after.weight_at_growth, model.net[0].weight)  # ... and training moved the grown layer
