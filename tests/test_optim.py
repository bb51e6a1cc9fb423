"""Optimizer and LR-scheduler state carried across growth."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.optim import optimizer_holds_model

# eps is made negligible where it enters a state buffer non-linearly (Adamax's max(|g| + eps), RMSprop's
# g / (sqrt(v) + eps)): there the carried state is exact only up to eps / |g|.
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "rmsprop-centered-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5, eps=1e-14),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, eps=1e-14),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
}


def teacher() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    # BatchNorm after the ReLU: a bias right before a train-mode BatchNorm has no gradient at all.
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.double()


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def loss_of(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(net(batch[0]), batch[1])


X = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))  # shows BatchNorm1d's input


def grow(net: nn.Module, opt: torch.optim.Optimizer, split: float) -> list[autogrow.Growth]:
    return [autogrow.widen(net, "0", 10, optimizer=opt, split=split, generator=7, example_inputs=X),
            autogrow.widen(net, "3", 7, optimizer=opt, generator=8)]


@pytest.mark.parametrize("split", [0.0, 0.4])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradient_replay(name, split):
    """The carried state equals the state the student's own gradient history would have built."""
    make = OPTIMIZERS[name]
    net = teacher()
    opt = make(net.parameters())
    data = batches(6)
    snapshots = []
    for b in data:
        snapshots.append(copy.deepcopy(net))
        opt.zero_grad()
        loss_of(net, b).backward()
        opt.step()
    growths = grow(net, opt, split)

    # Independently: the students that each teacher snapshot maps to, and their own gradients.
    shapes = [p for p in net.parameters()]
    replay_params = [nn.Parameter(torch.zeros_like(p)) for p in shapes]
    ref = make(replay_params)
    for snap, b in zip(snapshots, data):
        autogrow.replay(snap, growths)
        grads = torch.autograd.grad(loss_of(snap, b), list(snap.parameters()))
        for p, g in zip(replay_params, grads):
            p.grad = g
        ref.step()

    names = [n for n, _ in net.named_parameters()]
    for n, p, q in zip(names, net.parameters(), replay_params):
        carried, own = opt.state[p], ref.state[q]
        assert carried.keys() == own.keys(), n
        for k in own:
            a, b = carried[k], own[k]
            if isinstance(b, torch.Tensor) and b.dim() > 0:
                err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                assert err <= 1e-6, f"{name} {n}.{k}: relative error {err:.3g}"
            else:
                assert float(a) == float(b), f"{name} {n}.{k}"


def test_state_rule_is_not_vacuous():
    """Copying Adam's moments without the 1/count and 1/count^2 factors fails the replay comparison."""
    net = teacher()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for b in batches(2):
        opt.zero_grad()
        loss_of(net, b).backward()
        opt.step()
    before = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    g = autogrow.widen(net, "0", 12, mapping="uniform", generator=0, example_inputs=X)  # each unit copied twice
    autogrow.grow_optimizer(opt, g, net)
    st = opt.state[net[0].weight]
    assert torch.allclose(st["exp_avg"], before["exp_avg"].repeat(2, 1) / 2)
    assert torch.allclose(st["exp_avg_sq"], before["exp_avg_sq"].repeat(2, 1) / 4)
    consumer = opt.state[net[3].weight]["exp_avg"]
    assert consumer.shape == (4, 12)  # consumer columns are copied, not scaled


def train_steps(net: nn.Module, opt: torch.optim.Optimizer, sched, data) -> None:
    for b in data:
        opt.zero_grad()
        loss_of(net, b).backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_step_updates_every_parameter_and_new_params_start_empty():
    net = teacher()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train_steps(net, opt, None, batches(3))
    autogrow.widen(net, "0", 9, optimizer=opt, generator=0, example_inputs=X)
    g = autogrow.deepen(net, "3", optimizer=opt, residual=True, generator=0)  # after Tanh: residual form
    new = [dict(net.named_parameters())[n] for n in g.new_params]
    assert all(p not in opt.state for p in new)
    assert [id(p) for grp in opt.param_groups for p in grp["params"]] == [id(p) for p in net.parameters()]
    before = [p.detach().clone() for p in net.parameters()]
    train_steps(net, opt, None, batches(1))
    changed = [not torch.equal(a, p) for a, p in zip(before, net.parameters())]
    # The zero-initialised last layer of the residual block moves at once; its first layer moves from the
    # second step (its gradient flows through the zero layer). Everything else moves now.
    names = [n for n, _ in net.named_parameters()]
    stuck = [n for n, c in zip(names, changed) if not c]
    assert all(".body.0." in n for n in stuck), stuck
    train_steps(net, opt, None, batches(2))
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_groups_keep_hyperparameters_and_new_params_join_their_layer():
    net = teacher()
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.1},
                           {"params": list(net[1].parameters()) + list(net[3].parameters()), "lr": 0.01},
                           {"params": net[5].parameters(), "lr": 0.001, "momentum": 0.5}], momentum=0.9)
    train_steps(net, opt, None, batches(2))
    autogrow.widen(net, "3", 8, optimizer=opt, generator=0)
    g = autogrow.deepen(net, "3", optimizer=opt, residual=True, generator=0)
    assert [grp["lr"] for grp in opt.param_groups] == [0.1, 0.01, 0.001]
    assert opt.param_groups[2]["momentum"] == 0.5
    group1 = {id(p) for p in opt.param_groups[1]["params"]}
    assert all(id(dict(net.named_parameters())[n]) in group1 for n in g.new_params)


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=30),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9**e),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3]),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
}


def sched_step(s, i: int) -> None:
    if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
        s.step(1.0)  # a flat metric: counts towards patience
    else:
        s.step()


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("path", ["in-place", "rebuild"])
def test_schedule_continues(name, path):
    """Uninterrupted vs grown (in place, or rebuilt and translated by name): same LRs and position."""
    data = batches(12)

    def run(grow_at: int | None):
        net = teacher()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        sched = SCHEDULERS[name](opt)
        lrs = []
        for i, b in enumerate(data):
            if i == grow_at:
                if path == "in-place":
                    autogrow.widen(net, "0", 9, optimizer=opt, generator=0, example_inputs=X)
                else:
                    saved, names = opt.state_dict(), autogrow.param_names(opt, net)
                    g = autogrow.widen(net, "0", 9, generator=0, example_inputs=X)
                    new_opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
                    new_sched = SCHEDULERS[name](new_opt)
                    autogrow.translate_state_dict(saved, names, [g], new_opt, net)
                    autogrow.carry_scheduler(sched, new_sched)
                    opt, sched = new_opt, new_sched
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
            sched_step(sched, i)
            lrs.append([grp["lr"] for grp in opt.param_groups])
        return lrs, sched.state_dict()

    base_lrs, base_state = run(None)
    grown_lrs, grown_state = run(5)
    assert grown_lrs == base_lrs
    for k in ("last_epoch", "num_bad_epochs", "best", "_step_count"):
        if k in base_state:
            assert grown_state[k] == base_state[k], k


def test_rebuild_path_equals_in_place_path():
    data = batches(4)
    results = []
    for path in ("in-place", "rebuild"):
        net = teacher()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        train_steps(net, opt, None, data[:2])
        if path == "in-place":
            autogrow.widen(net, "0", 9, optimizer=opt, generator=3, example_inputs=X)
            autogrow.deepen(net, "0", optimizer=opt, generator=3)
        else:
            saved, names = opt.state_dict(), autogrow.param_names(opt, net)
            gs = [autogrow.widen(net, "0", 9, generator=3, example_inputs=X), autogrow.deepen(net, "0", generator=3)]
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            autogrow.translate_state_dict(saved, names, gs, opt, net)
        train_steps(net, opt, None, data[2:])
        results.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_checkpoint_round_trip_is_bit_identical():
    """Grown optimizer state_dict -> fresh optimizer over a replayed fresh model: same next 10 steps."""
    data = batches(14)
    net = teacher()
    original = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    train_steps(net, opt, sched, data[:2])
    growths = [autogrow.widen(net, "0", 11, optimizer=opt, split=0.3, generator=1, example_inputs=X),
               autogrow.deepen(net, "0", optimizer=opt, batch_norm=True, generator=2, example_inputs=X),
               autogrow.widen(net, "3", 6, optimizer=opt, generator=3)]
    train_steps(net, opt, sched, data[2:4])
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "growth": [g.to_dict() for g in growths]})

    resumed = copy.deepcopy(original)
    autogrow.replay(resumed, ckpt["growth"])
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=20)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])

    train_steps(net, opt, sched, data[4:])
    train_steps(resumed, opt2, sched2, data[4:])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), resumed.state_dict().values()))


def test_optimizer_check_catches_a_stale_parameter():
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert optimizer_holds_model(opt, net)
    net.weight = torch.nn.Parameter(torch.zeros(3, 2))  # replaced without telling the optimizer
    assert not optimizer_holds_model(opt, net)
