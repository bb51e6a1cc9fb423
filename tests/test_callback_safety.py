"""The callback's safety net and the Lightning flows around a grown model (real Trainer, digits, CPU)."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from autogrow.callbacks import AutoGrow, load_grown
from autogrow.experiments.data import DigitsDataModule
from autogrow.experiments.models import MLP, Classifier
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import autogrow
from autogrow.actions import Widen
from autogrow.events import StopReason
from autogrow.plateau import EveryN
from tests.test_callback import trainer
from tests.test_safety import WidthDependent

autogrow.register_layer(WidthDependent, autogrow.LayerSpec({"weight": 0, "bias": 0}, {"weight": 1}, "out_features",
                                                           "in_features", -1, -1))


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, seed=0)


def lying() -> Classifier:
    pl.seed_everything(0, verbose=False)
    return Classifier(nn.Sequential(WidthDependent(64, 6), nn.ReLU(), nn.Linear(6, 10)), lr=0.1)


class Before(Callback):
    """Keeps the model and optimizer state as they are right before AutoGrow's epoch-end hook."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.params = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.opt = repr(trainer.optimizers[0].state_dict())


def test_a_growth_that_changes_the_function_stops_the_fit_with_everything_restored(tmp_path, dm):
    model, before = lying(), Before()
    grow = AutoGrow(trigger=EveryN(every=1), targets=["model.0"])
    tr = trainer(tmp_path, [before, grow], max_epochs=3)
    with pytest.raises(autogrow.AutogrowError, match=r"growing 'model.0' failed and was undone.*changed the model"):
        tr.fit(model, datamodule=dm)
    after = model.state_dict()
    assert list(after) == list(before.params) and all(torch.equal(after[k], before.params[k]) for k in after)
    assert repr(tr.optimizers[0].state_dict()) == before.opt and grow.events == []


def test_on_error_skip_warns_and_trains_on(tmp_path, dm):
    model = lying()
    grow = AutoGrow(trigger=EveryN(every=1), targets=["model.0"], on_error="skip")
    with pytest.warns(UserWarning, match=r"'model.0' will not grow any more.*changed the model"):
        trainer(tmp_path, [grow], max_epochs=3).fit(model, datamodule=dm)
    assert model.model[0].out_features == 6 and grow.events == []
    assert grow.stopped is StopReason.REFUSED


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.optim.LBFGS(p), "LBFGS keeps its history"),
    (lambda p: torch.optim.Adafactor(p), "Adafactor keeps factored second moments"),
])
def test_optimizers_that_cannot_follow_fail_before_training(tmp_path, dm, make, message):
    class WithOptimizer(Classifier):
        def configure_optimizers(self):
            return make(self.parameters())

    pl.seed_everything(0, verbose=False)
    model = WithOptimizer(MLP(64, [4]))
    tr = trainer(tmp_path, [AutoGrow()], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=message):
        tr.fit(model, datamodule=dm)
    assert tr.global_step == 0


def test_best_checkpoint_from_before_the_last_growth_loads(tmp_path, dm):
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, [3]), lr=0.1)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=2)
    # mode="max" on the loss: the "best" checkpoint is the worst one, from the first epoch, before any growth.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", mode="max", save_top_k=1)
    tr = trainer(tmp_path, [grow, ckpt], max_epochs=4)
    tr.fit(model, datamodule=dm)
    assert model.model.fc1.out_features == 12
    best = torch.load(ckpt.best_model_path, weights_only=False)
    assert len(best["autogrow"]["history"]) < 2
    result = tr.test(model, datamodule=dm, ckpt_path="best", verbose=False)
    assert 0 <= result[0]["test_acc"] <= 1
    reference = load_grown(Classifier, ckpt.best_model_path, model=MLP(64, [3]))
    x = next(iter(dm.test_dataloader()))[0]
    assert model.model.fc1.out_features == reference.model.fc1.out_features
    assert torch.equal(model.eval()(x), reference(x))


class NoMixin(Classifier):
    """A module that knows nothing of autogrow when loading checkpoints."""

    def on_load_checkpoint(self, checkpoint):
        pl.LightningModule.on_load_checkpoint(self, checkpoint)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_validate_test_predict_from_a_grown_checkpoint_without_the_mixin(tmp_path, dm):
    pl.seed_everything(0, verbose=False)
    model = NoMixin(MLP(64, [3]), lr=0.1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [AutoGrow(trigger=EveryN(every=1), max_events=2), ckpt], max_epochs=3).fit(model, datamodule=dm)
    x = next(iter(dm.test_dataloader()))[0]
    expected = model.eval()(x)
    for run in ("validate", "test", "predict"):
        fresh = NoMixin(MLP(64, [3]))
        out = getattr(trainer(tmp_path, [AutoGrow()]), run)(fresh, datamodule=dm, ckpt_path=ckpt.last_model_path)
        assert out and fresh.model.fc1.out_features == 12
        assert torch.equal(fresh.eval()(x), expected)


def test_bad_inputs_fail_early_with_clear_messages(tmp_path, dm):
    for build, message in ((lambda: Widen(factor=float("inf")), r"factor: inf is not allowed"),
                           (lambda: Widen(noise=float("nan")), r"noise: nan is not allowed"),
                           (lambda: AutoGrow(seed=2**70), r"seed: .* is not allowed; expected an int >= 0"),
                           (lambda: AutoGrow(on_error="ignore"), r"on_error: 'ignore' is not allowed")):
        with pytest.raises(ValueError, match=message):
            build()
    with pytest.warns(UserWarning, match="mode='max' for monitor='val_loss'"):
        AutoGrow(mode="max")
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [AutoGrow(targets=["model.nope"])], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"targets: 'model.nope' is not allowed; expected names of"):
        tr.fit(Classifier(MLP(64, [3])), datamodule=dm)
    tr = trainer(tmp_path, [AutoGrow(monitor="val_los")], max_epochs=1)  # sanity check: before any training
    with pytest.raises(RuntimeError, match=r"monitor='val_los' was not logged.*'val_loss'"):
        tr.fit(Classifier(MLP(64, [3])), datamodule=dm)
    assert tr.global_step == 0


def test_growth_is_verified_on_a_validation_batch(tmp_path, dm):
    """The probe's shapes let a BatchNorm1d MLP grow (its rank is unknown without them)."""
    pl.seed_everything(0, verbose=False)
    net = nn.Sequential(nn.Linear(64, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 10))
    model = Classifier(copy.deepcopy(net), lr=0.1)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=2)
    trainer(tmp_path, [grow], max_epochs=3).fit(model, datamodule=dm)
    assert [e.changes[0].new for e in grow.events] == [8, 16]
    assert all(e.preservation_error < 1e-5 for e in grow.events)


def test_checkpoints_of_autogrow_0_1_still_load_and_resume(tmp_path, dm):
    """A checkpoint written by autogrow 0.1 (events as dicts, records without tensor lists) loads and resumes."""
    old = "tests/data/autogrow-0.1.ckpt"
    x = next(iter(dm.test_dataloader()))[0][:8]
    expected = torch.load("tests/data/autogrow-0.1-outputs.pt")  # what 0.1 computed with this checkpoint
    model = load_grown(Classifier, old, model=MLP(64, [3]))
    # The same weights give the same outputs up to the CPU's rounding (0.1 ran on another machine).
    assert model.model.fc1.out_features == 12 and torch.allclose(model(x), expected, rtol=1e-6, atol=1e-6)
    pl.seed_everything(0, verbose=False)
    fresh = Classifier(MLP(64, [3]), optimizer="adam", lr=0.01, scheduler="cosine", max_epochs=4)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=2, policy="round_robin", seed=3)
    trainer(tmp_path, [grow], max_epochs=4).fit(fresh, datamodule=dm, ckpt_path=old)
    assert [e.index for e in grow.events] == [1, 2] and grow.events[1].changes[0].old == 6
    assert grow.stopped is StopReason.MAX_EVENTS and fresh.model.fc1.out_features == 12
