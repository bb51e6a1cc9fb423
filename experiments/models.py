"""Networks and the classifier LightningModule used by the experiments and the README's main job."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from autogrow.callbacks import GrowableMixin
from pytorch_lightning import LightningModule
from torch.utils.flop_counter import FlopCounterMode

from autogrow import num_params
from autogrow.shapes import eval_mode

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """``in_features -> hidden[0] -> ... -> classes`` with an activation after every hidden layer.

    Layers are named ``fc1, act1, fc2, ...``; the output layer is ``out``.

        >>> MLP(64, [16, 8]).fc2
        Linear(in_features=16, out_features=8, bias=True)
    """

    def __init__(self, in_features: int = 64, hidden: list[int] | None = None, classes: int = 10,
                 activation: str = "relu") -> None:
        hidden = [16] if hidden is None else list(hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: {activation!r} is not one of {tuple(ACTIVATIONS)}")
        layers: dict[str, nn.Module] = {}
        width = in_features
        for i, h in enumerate(hidden, 1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"act{i}"] = ACTIVATIONS[activation]()
            width = h
        layers["out"] = nn.Linear(width, classes)
        super().__init__(OrderedDict(layers))


class SeedCNN(nn.Module):
    """The keras Net2Net example's teacher: conv(64, 3x3) - pool - conv(64, 3x3) - pool - fc(64) - fc(10).

    ReLU follows each conv here (the keras example has none there; with ReLU, Net2DeeperNet's
    identity insertion after a conv is the paper's construction rather than a product of linear maps).

        >>> SeedCNN(channels=8, hidden=16)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, hidden: int = 64, classes: int = 10,
                 image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * (image_size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class ConvNet(nn.Sequential):
    """A width-scalable CNN: two conv-BN-ReLU stages of ``channels`` and ``2 * channels``, global average pooling.

        >>> ConvNet(4)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: int = 16, in_channels: int = 1, classes: int = 10) -> None:
        c = channels
        layers: dict[str, nn.Module] = {}
        for i, (cin, cout) in enumerate([(in_channels, c), (c, c), (c, 2 * c), (2 * c, 2 * c)], 1):
            layers[f"conv{i}"] = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(cout)
            layers[f"act{i}"] = nn.ReLU()
            if i in (2, 4):
                layers[f"pool{i // 2}"] = nn.MaxPool2d(2)
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flat"] = nn.Flatten()
        layers["out"] = nn.Linear(2 * c, classes)
        super().__init__(OrderedDict(layers))


class Classifier(GrowableMixin, LightningModule):
    """Wraps any ``nn.Module`` classifier: cross-entropy, torchmetrics accuracy, counted FLOPs.

    Logs ``train_loss``, ``val_loss``, ``val_acc``, ``test_acc`` and ``train_flops`` (cumulative
    training FLOPs, counted with ``torch.utils.flop_counter`` and recounted whenever the model grows;
    a training step is counted as 3x its forward pass).

    Args:
        model: the network. Not saved in hyper-parameters; pass it again to ``load_grown``.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr, momentum, weight_decay: optimizer settings.
        scheduler: ``None``, ``"cosine"`` (over ``max_epochs``), ``"step"`` (x0.1 every ``step_size``) or
            ``"wsd"`` (hold, then decay linearly to zero over the last ``decay`` fraction of the run's steps:
            the schedule a from-scratch baseline gets to match AutoGrow's default LR).
        decay: the decay fraction of ``"wsd"``.
    """

    def __init__(self, model: nn.Module, optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0, scheduler: str | None = None, max_epochs: int = 10,
                 step_size: int = 10, num_classes: int = 10, decay: float = 0.4) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer: {optimizer!r} is not one of ('sgd', 'adam')")
        if scheduler not in (None, "cosine", "step", "wsd"):
            raise ValueError(f"scheduler: {scheduler!r} is not one of (None, 'cosine', 'step', 'wsd')")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes)
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes)
        self.train_flops = 0.0
        self._flops_key: tuple[int, tuple[int, ...]] | None = None
        self._flops_per_sample = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def count_flops(self, x: torch.Tensor) -> float:
        """Forward FLOPs for one sample of ``x``'s shape (cached until the parameter count changes)."""
        key = (num_params(self), tuple(x.shape[1:]))
        if key != self._flops_key:
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad(), eval_mode(self.model):  # eval: no BatchNorm statistics move
                self.model(x[:1])
            self._flops_key, self._flops_per_sample = key, float(counter.get_total_flops())
        return self._flops_per_sample

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.train_flops += 3 * self.count_flops(x) * len(x)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_flops", self.train_flops)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> object:
        h = self.hparams
        if h.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        if h.scheduler is None:
            return opt
        if h.scheduler == "wsd":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            hold = (1 - h.decay) * total
            wsd = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t: 1.0 if t < hold else max(0.0, (total - t) / (total - hold)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": wsd, "interval": "step"}}
        if h.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=h.max_epochs)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=h.step_size, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_flops"] = self.train_flops

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.train_flops = float(checkpoint.get("train_flops", 0.0))
