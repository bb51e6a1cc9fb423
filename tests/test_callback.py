"""AutoGrow inside real Trainer.fit runs (CPU, tiny MLPs on the real digits data, seconds each)."""

from __future__ import annotations

import glob
import math
import os
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from autogrow.callbacks import AutoGrow, load_grown
from autogrow.experiments.data import DigitsDataModule
from autogrow.experiments.models import MLP, Classifier
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import autogrow
from autogrow.actions import Deepen, Widen
from autogrow.events import Reason, StopReason
from autogrow.lr import GrowthLR
from autogrow.plateau import EveryN, Plateau


def trainer(tmp_path, callbacks, max_epochs=10, logger=False, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      deterministic=True, **kw)


def tiny(hidden=(2,), **kw) -> Classifier:
    pl.seed_everything(0, verbose=False)
    return Classifier(MLP(64, list(hidden)), **{"lr": 0.1, **kw})


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, seed=0)


class Watch(Callback):
    """Checks, after AutoGrow's epoch-end hook, what growth must guarantee."""

    def __init__(self, grow: AutoGrow) -> None:
        self.grow, self.checked, self.modes_ok = grow, 0, True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes_ok &= all(m.training for m in pl_module.modules())  # new modules train too

    def on_train_epoch_end(self, trainer, pl_module):
        ev = self.grow.events
        if ev and ev[-1].epoch == trainer.current_epoch:
            # Function preserved: the validation loss of the grown model equals the one logged just before.
            pl_module.eval()
            val = list(trainer.datamodule.val_dataloader())
            with torch.no_grad():
                losses = [F.cross_entropy(pl_module(x), y, reduction="sum") for x, y in val]
            pl_module.train()
            n = sum(len(b[1]) for b in val)
            now = float(sum(losses) / n)
            logged = float(trainer.callback_metrics["val_loss"])
            assert abs(now - logged) <= 1e-5 * max(1.0, logged), (now, logged)
            # The optimizer holds exactly the model's parameters.
            held = [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]
            assert sorted(held) == sorted(id(p) for p in pl_module.parameters())
            self.checked += 1


def test_grows_at_the_plateau_and_keeps_the_function(tmp_path, dm):
    model = tiny()
    grow = AutoGrow(monitor="val_loss", trigger=Plateau(patience=2, warmup=3, cooldown=1))
    watch = Watch(grow)
    trainer(tmp_path, [grow, watch], max_epochs=25).fit(model, datamodule=dm)
    assert len(grow.events) >= 2 and watch.checked == len(grow.events) and watch.modes_ok
    assert grow.events[0].epoch >= 3  # not before warmup (3 evaluations)
    epochs = [e.epoch for e in grow.events]
    assert all(b - a >= 1 + 2 for a, b in zip(epochs, epochs[1:]))  # cooldown 1, then patience 2
    assert model.model.fc1.out_features == 2 * 2 ** len(grow.events)
    assert all(e.preservation_error < 1e-4 for e in grow.events)
    torch.save(model, tmp_path / "whole.pt")  # no callback leftovers on the module after fit


def test_fixed_schedule_respects_warmup_and_cooldown(tmp_path, dm):
    model = tiny()
    grow = AutoGrow(trigger=EveryN(every=1, warmup=2, cooldown=2), grow=Widen(factor=1.5))
    trainer(tmp_path, [grow], max_epochs=9).fit(model, datamodule=dm)
    assert [e.epoch for e in grow.events] == [2, 5, 8]


class StopAfter(Callback):
    """Interrupts a run after ``epochs`` epochs (its schedule still planned for the whole run)."""

    def __init__(self, epochs: int | None) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if self.epochs is not None and trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.mark.parametrize("fresh_steps", [False, True])
def test_resume_is_bit_identical(tmp_path, dm, fresh_steps):
    """Also the LR multiplier (re-warming after a growth, decaying over the last 40% of the run) resumes exactly, and
    with ``fresh_steps`` the fresh units' birth steps (their own Adam bias correction) do."""
    def run(epochs, ckpt=None, root="a"):
        model = tiny(hidden=(3, 3), optimizer="adam", lr=0.01, scheduler="cosine", max_epochs=8)
        grow = AutoGrow(trigger=EveryN(every=2), policy="round_robin", seed=3,
                        lr=GrowthLR(fresh_steps=fresh_steps))
        ckpt_cb = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1)
        stop = StopAfter(epochs if epochs < 8 else None)
        trainer(tmp_path, [grow, stop, ckpt_cb], max_epochs=8).fit(model, datamodule=dm, ckpt_path=ckpt)
        return model, grow

    full, grow_full = run(8, root="full")
    part, grow_part = run(4, root="part")
    assert len(grow_part.events) == 2
    assert bool(grow_part.schedule.lr.fresh.births) == fresh_steps  # young units at the interruption
    lr = grow_part.schedule.lr
    assert 0 <= lr.step_count - lr.last_growth < lr.rewarm_steps  # interrupted inside the re-warm after a growth
    resumed, grow_resumed = run(8, ckpt=tmp_path / "part" / "last.ckpt", root="resumed")
    assert len(grow_resumed.events) == len(grow_full.events) == 4
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_events_are_written(tmp_path, dm):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny()
    grow = AutoGrow(trigger=EveryN(every=2))
    logger = TensorBoardLogger(tmp_path, name="tb")
    lrs = LearningRateMonitor(logging_interval="step")
    tr = trainer(tmp_path, [grow, lrs], max_epochs=4, logger=logger, log_every_n_steps=1)
    tr.fit(model, datamodule=dm)
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"autogrow/params", "autogrow/event", "autogrow/width/model.fc1", "autogrow/preservation_error"} <= \
        set(scalars)
    assert [s.value for s in acc.Scalars("autogrow/width/model.fc1")] == [4, 8]
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("autogrow/events/text_summary")]
    assert len(texts) == 2 and "model.fc1" in texts[0] and "| 2 | 4 |" in texts[0]
    assert len(acc.Scalars("lr-SGD")) == tr.global_step  # the LR monitor follows the rebuilt optimizers
    params = acc.Scalars("autogrow/params")
    assert params[-1].value == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kw", [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 3}])
def test_mixed_precision_and_accumulation(tmp_path, dm, kw):
    model = tiny()
    grow = AutoGrow(trigger=EveryN(every=2), grow="widen")
    deeper = AutoGrow(trigger=EveryN(every=3), grow=Deepen(), targets=["model.fc1"])
    trainer(tmp_path, [grow, deeper], max_epochs=6, **kw).fit(model, datamodule=dm)
    assert len(grow.events) == 3 and len(deeper.events) == 2
    assert math.isfinite(float(trainer(tmp_path, [], max_epochs=1).validate(model, datamodule=dm,
                                                                           verbose=False)[0]["val_loss"]))


def test_mid_epoch_validation_grows_at_next_batch(tmp_path, dm):
    model = tiny()
    grow = AutoGrow(trigger=EveryN(every=1))
    trainer(tmp_path, [grow], max_epochs=1, val_check_interval=5).fit(model, datamodule=dm)
    n_batches = len(dm.train_dataloader())
    assert [e.step for e in grow.events] == list(range(5, n_batches, 5))


def test_early_stopping_patience_is_reset_and_checkpoints_load(tmp_path, dm):
    class SeeReset(Callback):
        resets = 0

        def on_train_epoch_end(self, trainer, pl_module):
            es = trainer.early_stopping_callbacks[0]
            if grow.events and grow.events[-1].epoch == trainer.current_epoch:
                assert es.wait_count == 0 and es.best_score < math.inf
                SeeReset.resets += 1

    model = tiny()
    grow = AutoGrow(trigger=Plateau(patience=2, min_delta=0.01))
    es = EarlyStopping(monitor="val_loss", patience=3, min_delta=0.01)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [grow, SeeReset(), es, ckpt], max_epochs=30).fit(model, datamodule=dm)
    assert SeeReset.resets == len(grow.events) >= 1
    x = next(iter(dm.val_dataloader()))[0]
    files = sorted(glob.glob(os.path.join(tmp_path, "ckpt", "*.ckpt")),
                   key=lambda p: int(re.search(r"epoch=(\d+)", p).group(1)))
    for path in files[-1:] + files[:1]:
        net = load_grown(Classifier, path, model=MLP(64, [2]))
        also = Classifier.load_from_checkpoint(path, model=MLP(64, [2]))  # via GrowableMixin
        assert torch.equal(net(x), also.eval()(x))
    final = load_grown(Classifier, files[-1], model=MLP(64, [2]))
    assert torch.equal(final(x), model.eval()(x))


def test_policies_and_budgets(tmp_path, dm):
    model = tiny(hidden=(2, 3))
    grow = AutoGrow(trigger=EveryN(every=1), policy="round_robin", grow=Widen(units=1))
    trainer(tmp_path, [grow], max_epochs=4).fit(model, datamodule=dm)
    assert [e.changes[0].target for e in grow.events] == ["model.fc1", "model.fc2"] * 2

    model = tiny(hidden=(2, 3))
    grow = AutoGrow(trigger=EveryN(every=1), policy="smallest", grow=Widen(units=2), max_width=4)
    trainer(tmp_path, [grow], max_epochs=5).fit(model, datamodule=dm)
    assert model.model.fc1.out_features == 4 and model.model.fc2.out_features == 4
    assert grow.stopped is StopReason.BUDGET and "max_width" in grow.stop_message

    model = tiny(hidden=(2, 3))
    grow = AutoGrow(trigger=EveryN(every=1), policy="gradient")
    trainer(tmp_path, [grow], max_epochs=2).fit(model, datamodule=dm)
    assert len(grow.events) == 2 and all(len(e.changes) == 1 for e in grow.events)

    model = tiny(hidden=(2,))
    grow = AutoGrow(trigger=EveryN(every=1), max_params=700)
    trainer(tmp_path, [grow], max_epochs=5).fit(model, datamodule=dm)
    assert sum(p.numel() for p in model.parameters()) <= 700 and len(grow.events) == 2

    model = tiny(hidden=(2,))
    grow = AutoGrow(trigger=EveryN(every=1), max_events=1)
    trainer(tmp_path, [grow], max_epochs=3).fit(model, datamodule=dm)
    assert len(grow.events) == 1


def test_stop_and_rollback(tmp_path, dm):
    """Growth at a zero learning rate cannot improve validation: growth stops and rolls back."""
    model = tiny(hidden=(2,), lr=0.0)
    grow = AutoGrow(trigger=EveryN(every=3), stop_patience=2, rollback=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, [grow], max_epochs=7).fit(model, datamodule=dm)
    assert grow.stopped is StopReason.NO_PAYOFF and grow.events[-1].reason is Reason.ROLLBACK
    growths = [e for e in grow.events if e.reason is not Reason.ROLLBACK]
    assert len(growths) == 1  # no growth after the stop
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # back to the pre-growth model
    assert autogrow.checkpoint.history_of(model) == []


@pytest.mark.parametrize("build, message", [
    (lambda: AutoGrow(mode="up"), "mode: 'up' is not allowed"),
    (lambda: AutoGrow(trigger=Plateau(patience=0)), "patience: 0 is not allowed"),
    (lambda: AutoGrow(grow=Widen(factor=1.0)), "factor: 1.0 is not allowed; expected a number > 1"),
    (lambda: AutoGrow(trigger="sometimes"), "trigger: 'sometimes'"),
    (lambda: AutoGrow(policy="best"), "policy: 'best'"),
    (lambda: AutoGrow(grow="taller"), "grow: 'taller'"),
    (lambda: AutoGrow(optimizer_state="keep"), "optimizer_state: 'keep'"),
    (lambda: AutoGrow(grow=Widen(split=1.0)), r"split: 1.0 is not allowed; expected a number in \[0.0, 1.0\)"),
    (lambda: AutoGrow(max_params=0), "max_params: 0"),
    (lambda: AutoGrow(rollback=True), "rollback: True is not allowed; expected False unless stop_patience is set"),
    (lambda: AutoGrow(targets=[]), r"targets: \[\]"),
    (lambda: AutoGrow(trigger=autogrow.plateau.DynamicNodeCreation(window=0)), "window: 0"),
])
def test_bad_arguments_raise_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unsupported_setups_fail_in_setup(tmp_path, dm):
    spawn = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(MisconfigurationException, match="strategy DDPStrategy is not supported"):
        AutoGrow().setup(spawn, tiny(), "fit")

    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__(MLP(64, [2]))
            self.automatic_optimization = False

    with pytest.raises(MisconfigurationException, match="manual optimization"):
        trainer(tmp_path, [AutoGrow()], max_epochs=1).fit(Manual(), datamodule=dm)
    with pytest.raises(MisconfigurationException, match=r"targets: 'model.out' cannot widen.*model's output"):
        trainer(tmp_path, [AutoGrow(targets=["model.out"])], max_epochs=1).fit(tiny(), datamodule=dm)
    with pytest.raises(RuntimeError, match="monitor='val_los' was not logged"):
        trainer(tmp_path, [AutoGrow(monitor="val_los")], max_epochs=1).fit(tiny(), datamodule=dm)


def test_non_finite_metric_warns_and_does_not_grow(tmp_path, dm):
    class NanVal(Classifier):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", float("nan"))

    pl.seed_everything(0, verbose=False)
    model = NanVal(MLP(64, [2]))
    grow = AutoGrow(trigger=EveryN(every=1))
    with pytest.warns(UserWarning, match="non-finite metric"):
        trainer(tmp_path, [grow], max_epochs=2).fit(model, datamodule=dm)
    assert grow.events == []


def test_torch_compile_recompiles_after_growth(tmp_path, dm):
    model = tiny(hidden=(4,))
    model.model = torch.compile(model.model)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=1)
    trainer(tmp_path, [grow], max_epochs=2).fit(model, datamodule=dm)
    assert grow.events[0].changes[0].target == "model._orig_mod.fc1"
    assert grow.events[0].preservation_error < 1e-4
    x = next(iter(dm.val_dataloader()))[0]
    compiled, eager = model.model(x), model.model._orig_mod(x)  # the compiled graph follows the new shapes
    assert compiled.shape == eager.shape and torch.allclose(compiled, eager, atol=1e-5)


def test_resume_from_a_checkpoint_with_growth_pending(tmp_path, dm):
    """A checkpoint saved at validation end: the growth is decided there but not yet applied."""
    def run(epochs, ckpt=None, root="a"):
        model = tiny(hidden=(3,), optimizer="adam", lr=0.01)
        grow = AutoGrow(trigger=EveryN(every=2), seed=5)
        ckpt_cb = ModelCheckpoint(dirpath=tmp_path / root, monitor="val_loss", save_top_k=-1,
                                  filename="{epoch}", save_on_train_epoch_end=False)
        stop = StopAfter(epochs if epochs < 6 else None)
        trainer(tmp_path, [grow, stop, ckpt_cb], max_epochs=6).fit(model, datamodule=dm, ckpt_path=ckpt)
        return model, grow

    full, _ = run(6, root="full")
    run(4, root="part")
    pending = torch.load(tmp_path / "part" / "epoch=3.ckpt", weights_only=False)
    state = next(v for k, v in pending["callbacks"].items() if k.startswith("AutoGrow"))
    assert state["pending"] and len(pending["autogrow"]["history"]) == 1  # saved before the 2nd growth
    resumed, grow = run(6, ckpt=tmp_path / "part" / "epoch=3.ckpt", root="resumed")
    assert len(grow.events) == 3
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
