"""Run by tests/test_ddp.py as a script: Lightning's 'ddp' launcher re-executes it for rank 1.

Usage: python tests/ddp_run.py OUT_DIR [gradmax]  -> OUT_DIR/rank{0,1}.pt with each rank's final parameters
(``gradmax``: ``Widen(gradmax=True)``, whose fresh rows come from the gradients all-reduced over the ranks).
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
from autogrow.callbacks import AutoGrow
from autogrow.experiments.data import DigitsDataModule
from autogrow.experiments.models import MLP, Classifier

from autogrow.actions import Widen
from autogrow.plateau import EveryN


class Record(pl.Callback):
    def __init__(self) -> None:
        self.steps_after_growth = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.callbacks[0].events:
            self.steps_after_growth += 1


def main(out: str, gradmax: bool) -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, [3, 3]), lr=0.1)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=2, policy="round_robin", grow=Widen(gradmax=gradmax))
    rec = Record()
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=4, callbacks=[grow, rec],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, seed=0))
    torch.save({"state_dict": model.state_dict(), "events": [e.to_dict() for e in grow.events],
                "steps_after_growth": rec.steps_after_growth, "gradmax_applied": grow._gradmax.applied,
                "ddp_params": [id(p) for p in trainer.strategy.model.parameters()] ==
                [id(p) for p in model.parameters()]},
               f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["gradmax"])
