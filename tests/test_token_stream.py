"""A ViT-style residual stream: class token, position embedding and LayerScale (bare Parameters), a conv patch
embedding flattened into tokens, a concatenation along the tokens. Widening d_model grows them all, exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import autogrow
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")


class TinyViT(nn.Module):
    """Patches -> tokens, a class token in front, learned positions, one pre-norm MLP block, the class token read."""

    def __init__(self, d: int = 8, fixed_expand: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, d, 4, stride=4)  # 8x8 images: 4 patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d))
        self.norm1, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 16), nn.Linear(16, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))  # LayerScale
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)
        self.fixed_expand = fixed_expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], 1, 8) if self.fixed_expand else self.cls_token.expand(
            x.shape[0], -1, -1)
        h = torch.cat([cls, h], dim=1) + self.pos_embed
        h = h + self.gamma * self.fc2(torch.relu(self.fc1(self.norm1(h))))
        return self.head(self.norm(h)[:, 0])


def trained(seed: int = 0, **kw) -> tuple[nn.Module, torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net, x = TinyViT(**kw), torch.randn(3, 3, 8, 8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return net, x, opt


@pytest.mark.parametrize("target", ["proj", "fc2"])  # the first stream producer, and one reached backward
def test_widening_d_model_grows_the_class_token_and_positions(target):
    net, x, opt = trained()
    before = net(x).detach()
    plan = autogrow.plan_widen(net, target, 16, init="auto", generator=0, example_inputs=x)
    assert "cls_token: [1, 1, 8] -> [1, 1, 16]" in str(plan) and "pos_embed: [1, 5, 8] -> [1, 5, 16]" in str(plan)
    assert set(plan.producers) == {"proj", "fc2"} and set(plan.consumers) == {"fc1", "head"}
    plan.apply(opt)
    assert net.cls_token.shape == (1, 1, 16) and net.pos_embed.shape == (1, 5, 16) and net.gamma.shape == (16,)
    assert (net(x) - before).abs().max() < 1e-12
    assert opt.state[net.cls_token]["exp_avg"].shape == (1, 1, 16)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in net.parameters()}
    autogrow.shrink(net, target, 8, optimizer=opt, example_inputs=x)  # the copies merge back, tokens too
    assert net.cls_token.shape == (1, 1, 8) and (net(x) - before).abs().max() < 1e-12


def test_replay_rebuilds_the_grown_tokens():
    net, x, opt = trained()
    fresh = copy.deepcopy(net)
    g = autogrow.widen(net, "fc2", 16, init="auto", optimizer=opt, generator=0, example_inputs=x)
    autogrow.replay(fresh, [g])
    assert torch.equal(fresh.cls_token, net.cls_token) and torch.equal(fresh(x), net(x))


def test_an_expand_to_a_fixed_width_is_refused_untouched():
    net, x, opt = trained(fixed_expand=True)
    before = snapshot(net, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"expands to a fixed size on the units' axis. Expand with -1"):
        autogrow.widen(net, "proj", 16, init="auto", optimizer=opt, generator=0, example_inputs=x)
    assert_unchanged(before, net, opt)
