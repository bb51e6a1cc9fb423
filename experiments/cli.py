"""The ``autogrow`` command: LightningCLI (``fit``/``validate``/``test``, ``--config``, ``--print_config``).

Any LightningModule, DataModule or callback is chosen by class path in the config. After ``fit`` the
command prints the growth events and a summary (size before/after, validation and test accuracy)
and says how to open the TensorBoard logs. With ``--compare_fixed true`` it also trains the network of
the final size from scratch, for the same epochs with the same LR schedule, and prints both accuracies:
did growth pay?

    autogrow fit --config experiments/configs/quickstart.yaml
"""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
from autogrow.callbacks import AutoGrow
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI

from autogrow import num_params
from autogrow.checkpoint import set_history
from autogrow.lr import GrowthLR

__all__ = ["AutogrowCLI", "cli", "main"]


class AutogrowCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--compare_fixed", type=bool, default=False,
                            help="after fit, train the final-size network from scratch the same way and compare")

    def before_fit(self) -> None:
        self._params_before = num_params(self.model)

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if not trainer.is_global_zero:
            return
        grows = [cb for cb in trainer.callbacks if isinstance(cb, AutoGrow)]
        print("\n== autogrow summary ==")
        for cb in grows:
            for e in cb.events:
                what = ", ".join(f"{c.target} {c.old}->{c.new}" for c in e.changes) or e.reason.value
                print(f"  event {e.index}: epoch {e.epoch:>3}, {cb.monitor}={e.value:.4f} ({e.reason.value}): {what} "
                      f"(params {e.params_before:,} -> {e.params_after:,})")
            if cb.stopped:
                print(f"  growth stopped: {cb.stop_message}")
        print(f"  parameters: {self._params_before:,} -> {num_params(model):,}")
        for key in ("val_loss", "val_acc"):
            if key in trainer.callback_metrics:
                print(f"  final {key}: {float(trainer.callback_metrics[key]):.4f}")
        grown = self._test(trainer, model)
        if grown is not None:
            print(f"  test accuracy: {grown:.4f}")
        if self.config[self.subcommand].get("compare_fixed") and grown is not None:
            fixed, fixed_flops = self._train_fixed(model, grows)
            flops = getattr(model, "train_flops", None)
            cost = f" with {flops / fixed_flops:.0%} of its training FLOPs" if flops and fixed_flops else ""
            verdict = f"growth paid: as accurate or better{cost}" if grown >= fixed else "growth did not pay here"
            print(f"  the same network trained at its final size from the start ({num_params(model):,} parameters, "
                  f"same epochs and LR schedule): test accuracy {fixed:.4f}\n  -> {verdict}")
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"  TensorBoard: tensorboard --logdir {trainer.logger.log_dir}")

    def _test(self, trainer: pl.Trainer, model: LightningModule) -> float | None:
        dm = self.datamodule
        if dm is None or not hasattr(dm, "test_dataloader") or not hasattr(model, "test_step"):
            return None
        result = trainer.test(model, datamodule=dm, verbose=False)
        return float(result[0]["test_acc"]) if result and "test_acc" in result[0] else None

    def _train_fixed(self, model: LightningModule, grows: list[AutoGrow]) -> tuple[float, float | None]:
        """The grown architecture, freshly initialised, trained like the grown run (its LR multiplier, no growth)."""
        pl.seed_everything(self.config[self.subcommand].get("seed_everything") or 0, verbose=False)
        fixed = copy.deepcopy(model)
        set_history(fixed, [])
        for m in fixed.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        lr = grows[0].schedule.lr if grows else None
        fields = ("decay", "final", "rewarm", "rewarm_start", "width_scaling")
        same_lr = GrowthLR(**{f: getattr(lr, f) for f in fields}) if lr is not None else None
        trainer = pl.Trainer(max_epochs=self.trainer.max_epochs, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             deterministic=True, callbacks=[AutoGrow(max_params=num_params(fixed), lr=same_lr)])
        if hasattr(fixed, "train_flops"):
            fixed.train_flops = 0.0
        trainer.fit(fixed, datamodule=self.datamodule)
        return self._test(trainer, fixed) or 0.0, getattr(fixed, "train_flops", None)


def cli(args: list[str] | None = None) -> AutogrowCLI:
    """Run the CLI and return it (trainer, model and data module stay inspectable)."""
    return AutogrowCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       save_config_kwargs={"overwrite": True}, args=args)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``autogrow`` console script (returns None: the wrapper exits with it)."""
    cli(args)


if __name__ == "__main__":
    main()
