"""Run by tests/test_ddp.py as a script: Lightning's 'ddp' launcher re-executes it for rank 1.

Usage: python tests/ddp_run.py OUT_DIR [gradmax|ramp|fade|heads]  -> OUT_DIR/rank{0,1}.pt with each rank's final
parameters (``gradmax``: ``Widen(gradmax=True)``, whose fresh rows come from the gradients all-reduced over the
ranks; ``ramp``: a LayerNorm over the widened units, which ramps the new ones in; ``fade``: ``Widen(init="fade")``,
the readers fading the new units in, on both ranks alike; ``heads``: timm-style attention whose heads are counted in
``self.num_heads``, which each growth rewrites on both ranks).
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.callbacks import AutoGrow
from autogrow.experiments.data import DigitsDataModule
from autogrow.experiments.models import MLP, Classifier

from autogrow.actions import Widen
from autogrow.checkpoint import history_of
from autogrow.plateau import EveryN
from autogrow.ramp import is_ramped


class Record(pl.Callback):
    def __init__(self) -> None:
        self.steps_after_growth = self.ramped_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.callbacks[0].events:
            self.steps_after_growth += 1
        self.ramped_steps += any(is_ramped(m) for m in pl_module.modules())


class DigitHeads(nn.Module):
    """A digit's 64 pixels as 8 tokens of 8, one timm-style attention block (2 heads of 4 in ``self.num_heads``)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj, self.out = 2, nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], 8, 8)
        q, k, v = self.qkv(h).reshape(x.shape[0], 8, 3, self.num_heads, 4).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], 8, -1)
        return self.out((h + self.proj(o)).flatten(1))


def main(out: str, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    net = {"ramp": lambda: nn.Sequential(nn.Linear(64, 3), nn.LayerNorm(3), nn.GELU(), nn.Linear(3, 10)),
           "heads": DigitHeads}.get(mode, lambda: MLP(64, [3, 3]))()
    model = Classifier(net, lr=0.1)
    widen = {"gradmax": Widen(gradmax=True), "ramp": Widen(ramp=30), "fade": Widen(init="fade", ramp=30)}.get(
        mode, Widen())
    grow = AutoGrow(trigger=EveryN(every=1), max_events=2, policy="round_robin", grow=widen)
    rec = Record()
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=4, callbacks=[grow, rec],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, seed=0))
    torch.save({"state_dict": model.state_dict(), "events": [e.to_dict() for e in grow.events],
                "steps_after_growth": rec.steps_after_growth, "gradmax_applied": grow._gradmax.applied,
                "ramped_steps": rec.ramped_steps, "inits": [h["options"]["init"] for h in history_of(model)],
                "num_heads": getattr(net, "num_heads", None),
                "ddp_params": [id(p) for p in trainer.strategy.model.parameters()] ==
                [id(p) for p in model.parameters()]},
               f"{out}/rank{trainer.global_rank}.pt")
    # leave the process group before the interpreter exits: gloo's threads torn down at exit have aborted a rank
    # ("terminate called without an active exception", exit -6) after a fit that had finished
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "default")
