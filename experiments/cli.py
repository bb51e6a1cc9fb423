"""The ``autogrow`` command: LightningCLI (``fit``/``validate``/``test``, ``--config``, ``--print_config``).

Any LightningModule, DataModule or callback is chosen by class path in the config. After ``fit`` the
command prints the growth events and a summary (size before/after, validation and test accuracy)
and says how to open the TensorBoard logs.

    autogrow fit --config experiments/configs/quickstart.yaml
"""

from __future__ import annotations

from autogrow.callbacks import AutoGrow
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI

from autogrow import num_params


class AutogrowCLI(LightningCLI):
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
                print(f"  event {e.index}: epoch {e.epoch:>3}, {cb.monitor}={e.value:.4f}: {what} "
                      f"(params {e.params_before:,} -> {e.params_after:,})")
            if cb.stopped:
                print(f"  growth stopped: {cb.stop_message}")
        print(f"  parameters: {self._params_before:,} -> {num_params(model):,}")
        for key in ("val_loss", "val_acc"):
            if key in trainer.callback_metrics:
                print(f"  final {key}: {float(trainer.callback_metrics[key]):.4f}")
        dm = self.datamodule
        if dm is not None and hasattr(dm, "test_dataloader") and hasattr(model, "test_step"):
            result = trainer.test(model, datamodule=dm, verbose=False)
            if result and "test_acc" in result[0]:
                print(f"  test accuracy: {result[0]['test_acc']:.4f}")
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"  TensorBoard: tensorboard --logdir {trainer.logger.log_dir}")


def cli(args: list[str] | None = None) -> AutogrowCLI:
    """Run the CLI and return it (trainer, model and data module stay inspectable)."""
    return AutogrowCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       save_config_kwargs={"overwrite": True}, args=args)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``autogrow`` console script (returns None: the wrapper exits with it)."""
    cli(args)


if __name__ == "__main__":
    main()
