"""The LR around growth: multiplier sequence, composition with any scheduler, width scaling, resume, the
deadline through the callback."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from autogrow.callbacks import AutoGrow
from autogrow.experiments.data import DigitsDataModule
from autogrow.experiments.models import MLP, Classifier

import autogrow
from autogrow.actions import Widen
from autogrow.budget import Budget
from autogrow.events import Reason
from autogrow.lr import GrowthLR, shrink_perturb
from autogrow.optim import optimizer_holds_model
from autogrow.plateau import Deadline, Plateau
from tests.test_callback import trainer


def test_multiplier_holds_decays_after_the_last_growth_and_rewarms():
    lr = GrowthLR(decay=0.5, final=0.0, rewarm=4, rewarm_start=0.2, total_steps=20)
    assert [lr.multiplier(t) for t in (0, 9, 10, 15, 20)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    lr.step_count = 12
    lr.grew()  # after step 12: re-warm 0.2 -> 1 over 4 steps, and the decay starts no earlier than here
    ramp = [lr.multiplier(t) for t in range(12, 17)]
    assert ramp[0] == pytest.approx(0.2) and ramp[2] == pytest.approx(0.6 * (1 - 2 / 8))
    assert lr.multiplier(16) == pytest.approx(1 - 4 / 8) and lr.multiplier(20) == 0.0


def test_rewarm_as_a_fraction_of_the_run_follows_total_steps():
    """``rewarm=0.1`` re-warms over 10% of ``total_steps`` (as Lightning's ``val_check_interval``): the same ramp as
    ``rewarm=4`` on a 40-step run; without a known length there is no re-warm."""
    by_steps, by_fraction = GrowthLR(decay=0.0, rewarm=4), GrowthLR(decay=0.0, rewarm=0.1)
    assert by_fraction.rewarm_steps == 0 and by_fraction.multiplier(3) == 1.0
    by_fraction.total_steps = 40
    for lr in (by_steps, by_fraction):
        lr.step_count = 7
        lr.grew()
    assert by_fraction.rewarm_steps == 4
    ramp = [by_fraction.multiplier(t) for t in range(7, 13)]
    assert ramp == [by_steps.multiplier(t) for t in range(7, 13)]
    assert ramp[0] == pytest.approx(0.1) and ramp[4:] == [1.0, 1.0]


def test_multiplier_composes_with_any_scheduler():
    """The scheduler never sees the multiplier; every update is lr(scheduler) x multiplier x gradient."""
    def run(with_lr: bool) -> tuple[list[float], list[float]]:
        p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
        mult = GrowthLR(decay=0.5, total_steps=6)
        if with_lr:
            mult.attach(opt)
        lrs, steps = [], []
        for _ in range(6):
            before = float(p)
            p.grad = torch.ones(1, dtype=torch.float64)
            opt.step()
            mult.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            steps.append(before - float(p))
        return lrs, steps

    lrs, plain = run(False)
    lrs_with, steps = run(True)
    assert lrs_with == lrs  # the schedule itself is untouched
    expected = [plain[t] * GrowthLR(decay=0.5, total_steps=6).multiplier(t) for t in range(6)]
    assert steps == pytest.approx(expected)


def test_width_scaling_shrinks_the_updates_of_widened_layers():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    lr = GrowthLR(decay=0.0, width_scaling=True)
    lr.attach(opt, net)  # fan-ins recorded: 4 and 8
    autogrow.widen(net, "0", 16, optimizer=opt, generator=0)
    lr.attach(opt, net)  # the consumer's fan-in is now 16: its updates are halved
    x = torch.randn(5, 4, dtype=torch.float64)
    net(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    moved = {n: (before[n] - p.detach()) for n, p in net.named_parameters()}
    assert torch.allclose(moved["2.weight"], 0.1 * 0.5 * grads["2.weight"])
    assert torch.allclose(moved["0.weight"], 0.1 * grads["0.weight"])  # fan-in 4 unchanged


def test_width_scaling_follows_stacked_blocks_to_their_originals_fan_in():
    """Stacking renames the blocks after the copy: every weight keeps the fan-in it started from (the copy its
    original's), so a copy of a narrow block is not scaled as the wide block whose name it takes."""
    from tests.models import TinyGPT

    net = TinyGPT(layers=2).double()
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    autogrow.widen(net, "blocks.1.fc1", 24, generator=0, example_inputs=ids)  # block 1's fc2 starts at fan-in 24
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    lr = GrowthLR(decay=0.0, width_scaling=True)
    lr.attach(opt, net)  # fan-ins at start: blocks.0.fc2 12, blocks.1.fc2 24
    g = autogrow.stack(net, "blocks.0", optimizer=opt, generator=1, example_inputs=ids)  # new blocks.1: fan-in 12
    lr.grew(net, [g])
    lr.attach(opt, net)
    assert lr.base_fan_in["blocks.1.fc2.weight"] == 12 and lr.base_fan_in["blocks.2.fc2.weight"] == 24
    assert not lr._scales  # no weight is wider than it started: nothing is scaled
    autogrow.widen(net, "blocks.1.fc1", 24, optimizer=opt, generator=2, example_inputs=ids)  # the copy widens
    lr.attach(opt, net)
    assert lr._scales == {id(net.blocks[1].fc2.weight): 0.5}


def test_fresh_steps_give_new_units_adams_own_bias_correction():
    """Fresh units' moments start at zero while the tensor's step count is carried: with ``fresh_steps`` their k-th
    update is the one Adam makes from a fresh start (bias correction with k, not t); old entries move as without."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(16, 4, dtype=torch.float64)
    for _ in range(1500):  # a long-trained tensor: its own bias correction is nearly 1
        net(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    g = autogrow.widen(net, "0", 6, init="random", optimizer=opt, generator=0)  # fresh units with gradients
    runs = {}
    for fresh in (False, True):
        n, o = copy.deepcopy((net, opt))
        lr = GrowthLR(decay=0.0, fresh_steps=fresh)
        lr.step_count = 1500
        lr.attach(o, n)
        lr.grew(n, [g])
        moves = []
        for k in (1, 2, 3):
            before = n[0].weight.detach().clone()
            n(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
            lr.step()
            st = o.state[n[0].weight]
            t = float(st["step"])
            own = 0.01 * (st["exp_avg"] / (1 - 0.9**k)) / ((st["exp_avg_sq"] / (1 - 0.999**k)).sqrt() + 1e-8)
            moves.append((before - n[0].weight.detach(), own, t))
        runs[fresh] = moves
    for (plain, own, t), (fixed, own2, _) in zip(runs[False], runs[True]):
        assert t > 1500
        assert torch.allclose(fixed[3:], own2[3:], rtol=1e-4, atol=1e-12)  # the fresh rows: Adam from step k (to eps)
        assert not torch.allclose(plain[3:], own[3:], rtol=1e-2)  # without: several times larger
        assert float((plain[3:].abs() / fixed[3:].abs()).mean()) > 2
    assert torch.equal(runs[False][0][0][:3], runs[True][0][0][:3])  # old rows: the same first update


def test_fresh_steps_forget_births_that_a_deepening_or_a_shrink_invalidates():
    from autogrow.fresh import FreshSteps

    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    fresh = FreshSteps()
    fresh.grew(net, [autogrow.widen(net, "0", 6, init="zero_out", generator=0)], step=5)
    assert set(fresh.births) == {"0.weight", "0.bias", "2.weight"}
    assert (fresh.births["0.weight"][:, 0] == 5).tolist() == [False] * 3 + [True] * 3
    fresh.grew(net, [autogrow.widen(net, "0", 8, init="zero_out", generator=1)], step=9)  # older births follow
    assert fresh.births["0.weight"][:, 0].tolist()[3:] == [5, 5, 5, 9, 9]
    x = torch.randn(8, 4, dtype=torch.float64)
    fresh.grew(net, [autogrow.shrink(net, "0", 4, mode="prune", example_inputs=x)], step=10)
    assert "0.weight" not in fresh.births and "2.weight" not in fresh.births
    fresh.grew(net, [autogrow.widen(net, "0", 6, init="zero_out", generator=2)], step=11)
    fresh.grew(net, [autogrow.deepen(net, "0")], step=12)  # modules renamed: every birth forgotten
    assert fresh.births == {}


def test_shrink_perturb_is_seeded_and_leaves_the_global_rng_alone():
    net = nn.Linear(4, 3)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    state = torch.random.get_rng_state()
    shrink_perturb(a, 0.8, 0.1, torch.Generator().manual_seed(3))
    shrink_perturb(b, 0.8, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a.weight, b.weight) and not torch.allclose(a.weight, 0.8 * net.weight)
    with pytest.raises(ValueError, match=r"shrink: 1.5 is not allowed"):
        shrink_perturb(a, 1.5, 0.1, torch.Generator())


def test_the_deadline_reaches_the_budget_in_time_and_the_lr_decays_after(tmp_path):
    dm = DigitsDataModule(batch_size=64, seed=0)
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, [2]), lr=0.05)
    grow = AutoGrow(trigger=Plateau(patience=100), max_width=16, deadline=0.5)  # no plateau: the deadline rules
    trainer(tmp_path, [grow], max_epochs=8).fit(model, datamodule=dm)
    assert [e.reason for e in grow.events] == [Reason.DEADLINE] * 3 and model.model.fc1.out_features == 16
    assert [e.epoch for e in grow.events][-1] <= 4  # by half the run (8 epochs)
    assert grow.schedule.lr.last_growth is not None and grow.schedule.multiplier() == pytest.approx(0.0, abs=0.02)


def test_a_geometric_deadline_leaves_small_sizes_within_the_first_epoch_at_the_planned_steps(tmp_path):
    """``ratio=1/8``: with 3 events to go (2 -> 16 units) by half the run, they are due at 0.5/64, 0.5/8 and 0.5
    of the run's steps, checked before every batch (not only at evaluations), each exact."""
    dm = DigitsDataModule(batch_size=64, seed=0)
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, [2]), lr=0.05)
    grow = AutoGrow(trigger=Plateau(patience=100), max_width=16, deadline=Deadline(0.5, ratio=0.125))
    trainer(tmp_path, [grow], max_epochs=8).fit(model, datamodule=dm)
    total = model.trainer.estimated_stepping_batches
    assert [e.step for e in grow.events] == [math.ceil(f * total - 1e-9) for f in (0.5 / 64, 0.5 / 8, 0.5)]
    assert [e.epoch for e in grow.events][:2] == [0, 0] and [e.reason for e in grow.events] == [Reason.DEADLINE] * 3
    assert all(e.preservation_error < 1e-5 for e in grow.events) and model.model.fc1.out_features == 16


def test_a_deadline_behind_schedule_catches_up_at_once(tmp_path):
    """Three events needed (2 -> 16 units), all due at 30% of the run (``ratio=1``): the first batch past it
    brings all three, each exact, and the optimizer follows every one of them."""
    dm = DigitsDataModule(batch_size=64, seed=0)
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, [2]), lr=0.05)
    grow = AutoGrow(trigger=Plateau(patience=100), max_width=16, deadline=Deadline(0.3, ratio=1.0))
    trainer(tmp_path, [grow], max_epochs=3).fit(model, datamodule=dm)
    assert [e.reason for e in grow.events] == [Reason.DEADLINE] * 3
    assert len({e.step for e in grow.events}) == 1
    assert grow.events[0].step == math.ceil(0.3 * model.trainer.estimated_stepping_batches)
    assert [(e.changes[0].old, e.changes[0].new) for e in grow.events] == [(2, 4), (4, 8), (8, 16)]
    assert all(e.preservation_error < 1e-5 for e in grow.events)
    assert optimizer_holds_model(model.trainer.optimizers[0], model)


def test_growth_lr_arguments_are_checked():
    for kw, message in (({"decay": 1.5}, "decay: 1.5"), ({"rewarm": -1}, "rewarm: -1"),
                        ({"rewarm": 1.5}, r"rewarm: 1.5 .*a float in \(0, 1\)"), ({"rewarm": True}, "rewarm: True"),
                        ({"width_scaling": 1}, "width_scaling: 1"), ({"fresh_steps": "yes"}, "fresh_steps: 'yes'")):
        with pytest.raises(ValueError, match=message):
            GrowthLR(**kw)
    with pytest.raises(ValueError, match=r"deadline: 0 is not allowed"):
        AutoGrow(deadline=0)
    with pytest.raises(ValueError, match=r"ratio: 0 is not allowed"):
        AutoGrow(deadline=Deadline(0.5, ratio=0))
    with pytest.raises(ValueError, match=r"shrink_perturb: \(2, 0.1\) is not allowed"):
        AutoGrow(shrink_perturb=(2, 0.1))


def test_two_multipliers_on_one_optimizer_apply_the_larger_once_and_restore_the_lr():
    """Two callbacks (widen + stack) each attach a GrowthLR: the LR must decay once, after the later growth,
    and the group's lr must be exactly the user's after every step (no drift)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    a, b = GrowthLR(decay=0.5, total_steps=8), GrowthLR(decay=0.5, total_steps=8)
    a.attach(opt)
    b.attach(opt)
    b.step_count = 5
    b.grew()  # b grew at step 5: its decay starts there, a's at step 4
    applied = []
    for t in range(8):
        a.step_count = b.step_count = t
        before = float(p)
        p.grad = torch.ones(1)
        opt.step()
        applied.append(before - float(p))
        assert opt.param_groups[0]["lr"] == 1.0
    expected = [max(a.multiplier(t), b.multiplier(t)) for t in range(8)]
    assert applied == pytest.approx(expected) and expected[4] == 1.0 and expected[6] < 1.0
    a.detach()
    b.detach()
    p.grad = torch.ones(1)
    before = float(p)
    opt.step()
    assert before - float(p) == pytest.approx(1.0)  # no hooks left


@pytest.mark.parametrize("start", [4, 8, 16])
def test_events_needed_counts_joint_widenings_as_they_happen(start):
    """The deadline's count of events still to go, at every size on the way: widening two coupled layers at once
    grows the weight between them in both dimensions (the sum of the single-layer deltas undercounts it and
    once made the count one too high, so every growth came a step early)."""
    mlp = lambda h: nn.Sequential(nn.Linear(30, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    budget = Budget(max_params=autogrow.num_params(mlp(64)))
    net, counts = mlp(start), []
    while autogrow.num_params(net) < budget.max_params:
        h = net[0].out_features
        counts.append(budget.events_needed(net, Widen(), ["0", "2"], [h, h]))
        for target in ("0", "2"):
            autogrow.widen(net, target, 2 * h)
    assert counts == list(range(len(counts), 0, -1)) and autogrow.num_params(net) == budget.max_params


def test_every_callbacks_multiplier_follows_the_optimizer_another_one_rebuilt():
    """Two AutoGrow callbacks growing at the same epoch end: the second rebuilds the optimizer after the first has
    moved its multiplier; the first's (here with width scaling) must still apply to the optimizer that trains."""
    from torch.utils.data import DataLoader, TensorDataset

    from autogrow.actions import Stack
    from autogrow.plateau import EveryN
    from tests.test_transformers import TinyLM

    seq = torch.randint(0, 11, (64, 9), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=16)
    pl.seed_everything(0, verbose=False)
    model = TinyLM(layers=1, d=8, heads=1, head_size=4, hidden=8)
    widen = AutoGrow(trigger=EveryN(every=1), max_events=1, policy="all", lr=GrowthLR(width_scaling=True))
    deeper = AutoGrow(grow=Stack(), trigger=EveryN(every=1), max_events=1, policy="all")
    t = pl.Trainer(max_epochs=3, callbacks=[widen, deeper], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    t.fit(model, loader, loader)
    assert len(widen.events) == len(deeper.events) == 1 and widen.events[0].step == deeper.events[0].step
    assert widen.schedule.lr.attached_to(t.optimizers[0]) and deeper.schedule.lr.attached_to(t.optimizers[0])
    scaled = {n: widen.schedule.lr._scales[id(p)] for n, p in model.named_parameters()
              if id(p) in widen.schedule.lr._scales}
    assert scaled["net.blocks.0.fc2.weight"] == 0.5  # its fan-in (the MLP width) doubled: half-size steps
    assert scaled["net.blocks.1.fc2.weight"] == 0.5  # the other callback's stacked copy: scaled as its original
