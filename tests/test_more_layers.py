"""ConvTranspose, depthwise convs, InstanceNorm, PReLU grow exactly; GroupNorm and grouped convs grow by whole groups
of fresh units; grouped convs whose in and out channels differ are refused untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from autogrow.experiments.zoo import assert_unchanged, snapshot

import autogrow
from autogrow.actions import width_of
from autogrow.optim import optimizer_holds_model


def _perturbed(net: nn.Module) -> nn.Module:
    net = net.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _stepped(build, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor, torch.optim.Optimizer]:
    """The perturbed model, a float64 batch, and an Adam optimizer that has taken one step (state to carry)."""
    net = _perturbed(build())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).square().mean().backward()
    opt.step()
    return net, x, opt


CASES = {
    "convtranspose": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.ReLU(),
                                            nn.ConvTranspose2d(4, 2, 3)), (2, 3, 7, 7)),
    "convtranspose1d": (lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3), nn.Tanh(), nn.Conv1d(4, 2, 3)),
                        (2, 3, 9)),
    "instancenorm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True,
                                                                                 track_running_stats=True),
                                           nn.ReLU(), nn.Conv2d(4, 2, 3)), (2, 3, 9, 9)),
    "instancenorm_plain": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.InstanceNorm1d(4), nn.Conv1d(4, 2, 3)),
                           (2, 3, 9)),
    "prelu_per_channel": (lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)), (5, 3)),
    "prelu_shared": (lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)), (5, 3)),
    "depthwise": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.Conv2d(4, 4, 3, groups=4, padding=1, bias=True), nn.ReLU(),
                                        nn.Conv2d(4, 2, 1)), (2, 3, 8, 8)),
    "prelu_conv": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 3)), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_widen_and_deepen_are_exact_with_adam_state(name):
    net, x, opt = _stepped(*CASES[name])
    net.eval()  # running statistics, where there are any, are used as they were
    with torch.no_grad():
        before = net(x)
    autogrow.widen(net, "0", 7, optimizer=opt, generator=0, example_inputs=x)
    assert width_of(net[0]) == 7 and net(x).shape == before.shape
    assert (net(x) - before).abs().max() < 1e-12
    if isinstance(net[1], nn.PReLU) and net[1].num_parameters > 1:
        assert net[1].num_parameters == net[1].weight.numel() == 7
    if name == "depthwise":  # the depthwise conv grew with its input: 7 filters, 7 groups
        assert net[3].weight.shape[0] == net[3].groups == net[3].in_channels == net[3].out_channels == 7
        with pytest.raises(autogrow.AutogrowError, match="channel-wise Conv2d"):
            autogrow.widen(net, "3", 9, example_inputs=x)
        autogrow.deepen(net, "3", optimizer=opt, generator=2, example_inputs=x)  # a full identity conv after it
        assert any(isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == m.out_channels == 7
                   for m in net.modules())
        assert (net(x) - before).abs().max() < 1e-12
    autogrow.deepen(net, "0", optimizer=opt, generator=1, residual=True, example_inputs=x)
    assert (net(x) - before).abs().max() < 1e-12
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in net.parameters()}
    net.train()
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()  # the grown model and its optimizer train


GROUPNORM = {
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6), nn.SiLU(), nn.Conv2d(6, 2, 3)),
             (2, 3, 8, 8)),
    "linear": (lambda: nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.ReLU(), nn.Linear(4, 2)), (5, 3)),
}


@pytest.mark.parametrize("name", sorted(GROUPNORM))
def test_groupnorm_grows_by_whole_groups_of_fresh_units(name):
    """Old groups keep their channels and statistics, the new channels form new groups (zero outgoing weights):
    exact, the group size kept, Adam's state following, and the grown model trains."""
    net, x, opt = _stepped(*GROUPNORM[name])
    before, size = net(x).detach(), net[1].num_channels // net[1].num_groups
    old, original = width_of(net[0]), copy.deepcopy(net)
    g = autogrow.widen(net, "0", old + 2 * size, init="auto", optimizer=opt, generator=0, example_inputs=x)
    assert (net[1].num_channels, net[1].num_channels // net[1].num_groups) == (old + 2 * size, size)
    autogrow.replay(original, [g])  # the record rebuilds the same groups (as a checkpoint resume does)
    assert original[1].num_groups == net[1].num_groups and torch.equal(original(x), net(x))
    assert (net(x) - before).abs().max() < 1e-12
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in net.parameters())
    net(x).square().mean().backward()
    opt.step()


GN_REFUSALS = [
    (lambda net, x, opt: autogrow.widen(net, "0", 9, init="auto", optimizer=opt, example_inputs=x),
     r"width: 9 is not allowed for '0': \['1'\] act on groups of \[2\] channels, so it grows by whole groups: "
     r"6 \+ a multiple of 2 \(e.g. 8\)"),
    (lambda net, x, opt: autogrow.widen(net, "0", 8, init="net2wider", optimizer=opt, example_inputs=x),
     r"init: 'net2wider' is not allowed for '0': \['1'\] act on groups of channels.*use init='zero_out'"),
    (lambda net, x, opt: autogrow.widen(net, "0", 8, init="vt", optimizer=opt, example_inputs=x),
     r"init: 'vt' is not allowed"),
    (lambda net, x, opt: autogrow.shrink(net, "0", 4, mode="prune", optimizer=opt, example_inputs=x),
     r"cannot shrink '0': \['1'\] act on groups of channels"),
]


@pytest.mark.parametrize("call, message", GN_REFUSALS)
def test_groupnorm_refusals_leave_model_and_optimizer_untouched(call, message):
    net = _perturbed(GROUPNORM["conv"][0]())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).sum().backward()
    opt.step()
    before = snapshot(net, opt)
    with pytest.raises(autogrow.AutogrowError, match=message):
        call(net, x, opt)
    assert_unchanged(before, net, opt)


class CatGroupNorm(nn.Module):
    """A GroupNorm over a concatenation: widening one branch would put new channels inside its groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
        self.gn, self.out = nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gn(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_groupnorm_over_a_concatenation_is_refused():
    with pytest.raises(autogrow.AutogrowError, match=r"'gn'.*acts on groups of channels of a concatenation"):
        autogrow.plan_widen(CatGroupNorm(), "a", 4, init="auto", example_inputs=torch.randn(2, 3, 4, 4))


def _resnext_block() -> nn.Sequential:
    """A ResNeXt bottleneck's core: 1x1 conv, BN, ReLU, grouped 3x3 conv (2 groups of 4), BN, ReLU, 1x1 conv."""
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))


def test_a_grouped_conv_grows_by_whole_groups_with_its_input():
    """Widening the layer before a grouped conv appends whole groups (fresh filters over the fresh inputs, zero
    outgoing weights): exact, the group size kept, Adam's state following, replayable, deepenable; it trains."""
    net, x, opt = _stepped(_resnext_block, (2, 3, 8, 8))
    net.eval()
    before, original = net(x).detach(), copy.deepcopy(net)
    g = autogrow.widen(net, "0", 16, init="auto", optimizer=opt, generator=0, example_inputs=x)
    conv = net[3]
    assert (conv.in_channels, conv.out_channels, conv.groups, tuple(conv.weight.shape[:2])) == (16, 16, 4, (16, 4))
    assert torch.equal(conv.weight[:8], original[3].weight)  # the old groups keep their filters
    assert (net(x) - before).abs().max() < 1e-12
    autogrow.replay(original, [g])
    assert original[3].groups == 4 and torch.equal(original(x), net(x))
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in net.parameters())
    autogrow.deepen(net, "3", optimizer=opt, generator=1, example_inputs=x)  # a full identity conv after it
    assert (net(x) - before).abs().max() < 1e-12
    net.train()
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("call, message", [
    (lambda net, x, opt: autogrow.widen(net, "0", 10, init="auto", optimizer=opt, example_inputs=x),
     r"width: 10 is not allowed for '0': \['3'\] act on groups of \[4\] channels.*8 \+ a multiple of 4 \(e.g. 12\)"),
    (lambda net, x, opt: autogrow.widen(net, "0", 16, init="net2wider", optimizer=opt, example_inputs=x),
     r"init: 'net2wider' is not allowed for '0': \['3'\] act on groups of channels.*use init='zero_out'"),
    (lambda net, x, opt: autogrow.widen(net, "3", 16, init="auto", optimizer=opt, example_inputs=x),
     r"'3' is a channel-wise Conv2d.*widen that layer"),
    (lambda net, x, opt: autogrow.shrink(net, "0", 4, mode="prune", optimizer=opt, example_inputs=x),
     r"cannot shrink '0': \['3'\] act on groups of channels"),
])
def test_grouped_conv_refusals_leave_model_and_optimizer_untouched(call, message):
    net, x, opt = _stepped(_resnext_block, (2, 3, 8, 8))
    before = snapshot(net, opt)
    with pytest.raises(autogrow.AutogrowError, match=message):
        call(net, x, opt)
    assert_unchanged(before, net, opt)


@pytest.mark.parametrize("build, needle", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=2)),
     r"groups=2 with 4 in and 8 out channels.*only grouped convs with as many out as in channels grow"),
])
def test_group_coupled_layers_are_refused_untouched(build, needle):
    net = _perturbed(build())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net(x).sum().backward()
    opt.step()
    before = snapshot(net, opt)
    with pytest.raises(autogrow.AutogrowError, match=needle):
        autogrow.widen(net, "0", 8, optimizer=opt, generator=0, example_inputs=x)
    assert_unchanged(before, net, opt)


def test_the_callback_grows_a_groupnorm_convnet_exactly(tmp_path):
    """AutoGrow's defaults (fresh units, x2) on a conv + GroupNorm net in a real fit: every event exact, the
    group size kept, the optimizer holding exactly the grown parameters."""
    import pytorch_lightning as pl
    from autogrow.callbacks import AutoGrow
    from autogrow.experiments.data import DigitsDataModule
    from autogrow.experiments.models import Classifier

    from autogrow.plateau import EveryN
    from tests.test_callback import trainer

    pl.seed_everything(0, verbose=False)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 64, 10))
    model = Classifier(net, lr=0.01)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=2, deadline=None)
    trainer(tmp_path, [grow], max_epochs=3).fit(model, datamodule=DigitsDataModule(batch_size=64, flatten=False))
    assert [(e.changes[0].old, e.changes[0].new) for e in grow.events] == [(4, 8), (8, 16)]
    assert all(e.preservation_error < 1e-5 for e in grow.events)
    gn = model.model[1]
    assert (gn.num_groups, gn.num_channels) == (8, 16)
    assert optimizer_holds_model(model.trainer.optimizers[0], model)


def test_the_callback_grows_a_grouped_convnet_exactly(tmp_path):
    """AutoGrow's defaults on a ResNeXt-style conv -> grouped conv net in a real fit: the grouped conv is not a target
    of its own, it grows with its input by whole groups (2 -> 4 -> 8 groups of 2), every event exact."""
    import pytorch_lightning as pl
    from autogrow.callbacks import AutoGrow
    from autogrow.experiments.data import DigitsDataModule
    from autogrow.experiments.models import Classifier

    from autogrow.plateau import EveryN
    from tests.test_callback import trainer

    pl.seed_everything(0, verbose=False)
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    model = Classifier(net, lr=0.01)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=2, deadline=None)
    trainer(tmp_path, [grow], max_epochs=3).fit(model, datamodule=DigitsDataModule(batch_size=64, flatten=False))
    assert grow.targets == ["model.0"]
    assert [(e.changes[0].old, e.changes[0].new) for e in grow.events] == [(4, 8), (8, 16)]
    assert all(e.preservation_error < 1e-5 for e in grow.events)
    conv = model.model[3]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (8, 16, 16)


class WhereMasked(nn.Module):
    """Causal attention masked by ``torch.where(mask, scores, min)`` (GPT-Neo's), heads from the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        scores = torch.where(mask, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


class Floored(nn.Module):
    """``where(h > 0, h, floor)``: a per-feature floor of the units' width, which grows with them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.floor = nn.Linear(6, 8), nn.Linear(8, 3), nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.where(h > 0, h, self.floor))


@pytest.mark.parametrize("build, target, width", [(WhereMasked, "q", 16), (Floored, "fc1", 12)])
def test_where_passes_the_units_entry_by_entry(build, target, width):
    """``torch.where`` and comparisons act entry by entry: a mask over the tokens broadcasts over the heads, and an
    operand of the units' width grows with them; exact with fresh units."""
    torch.manual_seed(0)
    model, x = build().double(), torch.randn(3, 5, 6, dtype=torch.float64)
    ref = model(x)
    autogrow.widen(model, target, width, init="zero_out", generator=0, example_inputs=x)
    assert float((model(x) - ref).abs().max()) <= 1e-9 * float(ref.abs().max())
    assert getattr(model, "o", getattr(model, "fc2", None)).in_features == width
    assert build is WhereMasked or model.floor.numel() == 12
