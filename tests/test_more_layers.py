"""ConvTranspose, depthwise convs, InstanceNorm, PReLU grow exactly; GroupNorm, grouped convs are refused untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import autogrow
from autogrow.actions import width_of


def _perturbed(net: nn.Module) -> nn.Module:
    net = net.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


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
    build, shape = CASES[name]
    net = _perturbed(build())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).square().mean().backward()
    opt.step()
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


@pytest.mark.parametrize("build, needle", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2)), "GroupNorm"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2)), "groups=2"),
])
def test_group_coupled_layers_are_refused_untouched(build, needle):
    net = _perturbed(build())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) if isinstance(net[0], nn.Conv2d) else torch.randn(
        5, 3, dtype=torch.float64)
    net(x).sum().backward()
    opt.step()
    model_before, opt_before = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    with pytest.raises(autogrow.AutogrowError, match=needle):
        autogrow.widen(net, "0", 8, optimizer=opt, generator=0, example_inputs=x)
    assert all(torch.equal(v, model_before[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(s["momentum_buffer"], opt_before["state"][i]["momentum_buffer"])
               for i, s in opt.state_dict()["state"].items())
