"""AutoGrow resizing both ways inside real Trainer.fit runs (CPU, tiny MLPs on the digits data, seconds each):
duplicate units merged exactly, redundant units pruned within a tolerance, over capacity, budgets, no
oscillation, resume after a shrink, and TryCandidates' trials rolled back exactly."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from autogrow.callbacks import AutoGrow
from autogrow.experiments.data import DigitsDataModule
from autogrow.experiments.models import MLP, Classifier
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

import autogrow
from autogrow.events import Reason
from autogrow.optim import optimizer_holds_model
from autogrow.plateau import EveryN
from autogrow.policy import GrowthPolicy, TryCandidates
from autogrow.resize import OverfitCheck, Shrink
from tests.test_callback import StopAfter, trainer

NEVER = EveryN(every=1000)  # no growth: the shrink alone acts


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, seed=0)


def model_of(hidden=(8,), duplicates: bool = False, **kw) -> Classifier:
    """A digits MLP; ``duplicates``: every hidden unit of fc1 doubled into two exact copies (net2wider, no split)."""
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, list(hidden)), **{"lr": 0.1, **kw})
    if duplicates:
        autogrow.widen(model.model, "fc1", 2 * hidden[0], init="net2wider", split=0.0, generator=0)
    return model


def fit(tmp_path, model, dm, callbacks, epochs, **kw) -> pl.Trainer:
    t = trainer(tmp_path, callbacks, max_epochs=epochs, **kw)
    t.fit(model, datamodule=dm)
    return t


def test_duplicates_merge_exactly_mid_fit(tmp_path, dm):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = model_of(duplicates=True)
    grow = AutoGrow(trigger=NEVER, shrink=Shrink(prune=False, overfit_patience=None, warmup=2, every=1))
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, model, dm, [grow], 4, precision="64-true", logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("autogrow/events/text_summary")]
    assert len(texts) == 1 and "Shrink event 1" in texts[0] and "(duplicates)" in texts[0]
    shrinks = [e for e in grow.events if e.shrank]
    assert [e.reason for e in shrinks] == [Reason.DUPLICATES] and shrinks[0].epoch == 2
    assert (shrinks[0].changes[0].old, shrinks[0].changes[0].new) == (16, 8)
    assert shrinks[0].preservation_error < 1e-9 and shrinks[0].measured_change < 1e-9
    assert model.model.fc1.out_features == 8
    assert autogrow.checkpoint.history_of(model)[-1]["kind"] == "shrink"
    opt = model.trainer.optimizers[0]
    assert optimizer_holds_model(opt, model)
    # the state followed the merge
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())


def test_prune_within_tolerance_and_min_params(tmp_path, dm):
    model = model_of(hidden=(32,))
    n = autogrow.num_params(model)
    shrink = Shrink(merge=False, tol=0.1, overfit_patience=None, warmup=2, every=1, min_params=n - 20 * 74)
    grow = AutoGrow(trigger=NEVER, shrink=shrink)
    fit(tmp_path, model, dm, [grow], 6)
    assert grow.events and all(e.reason is Reason.REDUNDANT for e in grow.events)
    assert all(e.measured_change <= 0.1 for e in grow.events)
    assert all(e.params_after < e.params_before for e in grow.events)
    assert autogrow.num_params(model) >= shrink.min_params  # pruning stopped at the floor


def test_no_shrink_is_decided_from_until_on(tmp_path, dm):
    """The last part of the run trains at the final size: with ``until=0.5`` every shrink comes from an evaluation
    in the first half (6 epochs: the end of epoch 0 or 1); the same run with ``until=None`` still shrinks later."""
    epochs = {}
    for until in (0.5, None):
        shrink = Shrink(merge=False, tol=0.5, overfit_patience=None, warmup=0, every=1, cooldown=0, until=until)
        grow = AutoGrow(trigger=NEVER, shrink=shrink)
        fit(tmp_path, model_of(hidden=(64,)), dm, [grow], 6)
        epochs[until] = [e.epoch for e in grow.events if e.shrank]
    assert epochs[0.5] and max(epochs[0.5]) <= 1
    assert max(epochs[None]) >= 3


class NoisyValidation(DigitsDataModule):
    """Validation labels drawn at random: fitting the training data only makes validation worse."""

    def val_dataloader(self) -> DataLoader:
        x, y = self._loader("val", False).dataset.tensors
        y = torch.randint(0, 10, y.shape, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def test_over_capacity_prunes_the_widest_layer(tmp_path):
    check = OverfitCheck(mode="min", patience=2)
    assert [check.update(v, t) for v, t in [(1.0, 2.0), (1.1, 1.5), (1.2, 1.0)]] == [False, False, True]
    model = model_of(hidden=(16, 32), lr=0.05)
    shrink = Shrink(merge=False, prune=False, overfit_patience=2, overfit_fraction=0.25, cooldown=0)
    grow = AutoGrow(trigger=NEVER, shrink=shrink)
    fit(tmp_path, model, NoisyValidation(batch_size=64, seed=0), [grow], 5)
    over = [e for e in grow.events if e.reason is Reason.OVERFIT]
    assert over and (over[0].changes[0].target, over[0].changes[0].old, over[0].changes[0].new) == ("model.fc2", 32, 24)


class Only(GrowthPolicy):
    """Grows the one named layer (to compare with what TryCandidates chose)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def choose(self, candidates):
        return [c.name for c in candidates if c.name == self.name]


def test_a_shrunk_layer_is_not_regrown_at_the_next_event(tmp_path, dm):
    model = model_of(hidden=(8, 8), duplicates=True)
    shrink = Shrink(prune=False, overfit_patience=None, warmup=0, every=1)
    grow = AutoGrow(trigger=EveryN(every=2), shrink=shrink, deadline=None)
    fit(tmp_path, model, dm, [grow], 4, precision="64-true")
    kinds = [(e.reason, [c.target for c in e.changes]) for e in grow.events]
    assert kinds[0] == (Reason.DUPLICATES, ["model.fc1"])
    assert kinds[1] == (Reason.SCHEDULE, ["model.fc2"])  # fc1 sits this growth out


@pytest.mark.parametrize("build, message", [
    (lambda: Shrink(tol=-1.0), "tol"),
    (lambda: Shrink(fraction=1.0), "fraction"),
    (lambda: Shrink(merge=False, prune=False, overfit_patience=None), "at least one way to shrink"),
    (lambda: Shrink(batches=1), "batches"),
    (lambda: Shrink(until=0.0), "until: 0.0 is not allowed"),
    (lambda: Shrink(select="qr"), "select: 'qr' is not"),
    (lambda: Shrink(until=1.5), "until: 1.5 is not allowed"),
    (lambda: Shrink(ridge=-0.01), r"ridge: -0.01 is not allowed; expected a number >= 0"),
    (lambda: AutoGrow(shrink="merge"), "shrink"),
    (lambda: AutoGrow(max_params=100, shrink=Shrink(min_params=200)), "min_params"),
    (lambda: TryCandidates(k=0), "k"),
    (lambda: TryCandidates(steps=0), "steps"),
    (lambda: TryCandidates(actions=[]), "actions"),
])
def test_bad_arguments_raise_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_resume_after_a_shrink_is_bit_identical(tmp_path, dm):
    """Merges and prunes replay from the checkpoint's history; optimizer (Adam), scheduler and decisions resume."""
    def run(epochs, ckpt=None, root="a"):
        model = model_of(hidden=(8, 6), duplicates=True, optimizer="adam", lr=0.01, scheduler="cosine", max_epochs=7)
        grow = AutoGrow(trigger=EveryN(every=3), seed=3, deadline=None,
                        shrink=Shrink(tol=0.05, warmup=1, every=2, overfit_patience=1))
        ckpt_cb = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1)
        fit_kw = {"ckpt_path": ckpt} if ckpt else {}
        trainer(tmp_path, [grow, StopAfter(epochs if epochs < 7 else None), ckpt_cb],
                max_epochs=7).fit(model, datamodule=dm, **fit_kw)
        return model, grow

    full, grow_full = run(7, root="full")
    _, grow_part = run(3, root="part")
    assert any(e.shrank for e in grow_part.events)
    resumed, grow_resumed = run(7, ckpt=tmp_path / "part" / "last.ckpt", root="resumed")
    assert [e.to_dict() for e in grow_resumed.events] == [e.to_dict() for e in grow_full.events]
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_try_candidates_keeps_only_the_chosen_growth(tmp_path, dm):
    """After the trials, model and optimizer are what growing the chosen layer directly gives; same choice twice."""
    def run(policy):
        model = model_of(hidden=(4, 4), optimizer="adam", lr=0.01)
        grow = AutoGrow(trigger=EveryN(every=2), policy=policy, max_events=1, deadline=None, seed=5)
        t = fit(tmp_path, model, dm, [grow], 4)
        return model, grow, t.optimizers[0].state_dict()

    tried, grow_a, opt_a = run(TryCandidates(k=2, steps=3))
    again, grow_b, _ = run(TryCandidates(k=2, steps=3))
    event = grow_a.events[0]
    assert event.extra_flops > 0 and event.notes.startswith("tried 2") and event.notes == grow_b.events[0].notes
    chosen = event.changes[0].target
    direct, grow_c, opt_c = run(Only(chosen))
    assert [c.target for c in grow_c.events[0].changes] == [chosen]
    for other in (again, direct):
        a, b = tried.state_dict(), other.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert opt_a["state"].keys() == opt_c["state"].keys()
    assert all(torch.equal(torch.as_tensor(opt_a["state"][i][k]), torch.as_tensor(opt_c["state"][i][k]))
               for i in opt_a["state"] for k in opt_a["state"][i])


def test_try_candidates_over_actions_and_layers(tmp_path, dm):
    """Widen or deepen, each of two layers: at most k=3 of the 4 tried (drawn from the seed), the function kept."""
    model = model_of(hidden=(4, 4))
    grow = AutoGrow(trigger=EveryN(every=2), policy=TryCandidates(k=3, steps=2, actions=("widen", "deepen")),
                    deadline=None)
    fit(tmp_path, model, dm, [grow], 5)
    assert len(grow.events) == 2 and all(e.notes.startswith("tried 3") for e in grow.events)
    assert all(e.preservation_error < 1e-4 and e.extra_flops > 0 for e in grow.events)
    assert grow.policy.events == 2


def test_resize_suite_quick(tiny_idx, tmp_path):
    """The benchmark end to end on a tiny IDX set: rows per run, the targets stated, the files written."""
    import json

    from autogrow.experiments import suite_resize

    rows = suite_resize.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path), "--epochs", "2"])
    assert {p.name for p in tmp_path.iterdir()} >= {"resize.csv", "resize.json", "resize.md", "resize.png",
                                                     "targets.json"}
    assert [r["config"] for r in rows] == ["fixed 4", "fixed 16", "resize from 4", "resize from 16",
                                           "choice: round_robin", "choice: gradient", "choice: try"]
    assert rows[-1]["extra_flops"] > 0 and rows[-2]["extra_flops"] == rows[-3]["extra_flops"] == 0
    assert 0 < rows[-3]["reach_epoch"] <= 2  # round_robin reaches its own final accuracy, by the last epoch
    assert "reach_epoch" not in rows[0]
    met = json.loads((tmp_path / "targets.json").read_text())
    assert len(met) == 5 and all(isinstance(t["met"], bool) for t in met)
    assert (tmp_path / "resize_choice.png").is_file()
    assert "## Targets" in (tmp_path / "resize.md").read_text()
