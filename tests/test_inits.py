"""Initialisers of new units: each exact one is exact; fresh units' optimizer state is empty or at the old
units' mean, and the old units' state is carried unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from tests.models import CatNet, TinyGPT, TinyResNet, TinyTransformer, max_rel_error

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


CASES = [(TinyResNet, lambda: torch.randn(3, 3, 6, 6), "stem", 7), (CatNet, lambda: torch.randn(3, 2, 8, 8), "a", 6),
         (TinyTransformer, lambda: torch.randint(0, 11, (4, 5)), "blocks.0.fc1", 13),
         (TinyGPT, lambda: torch.randint(0, 11, (2, 6)), "blocks.1.attn.q", 12)]


@pytest.mark.parametrize("init", ["zero_out", "vt"])
@pytest.mark.parametrize("build, data, target, width", CASES)
def test_fresh_unit_inits_are_exact(init, build, data, target, width):
    torch.manual_seed(0)
    model, x = build(), data()
    ref = model(x)
    g = autogrow.widen(model, target, width, init=init, generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    assert bool(g.maps["base"].fresh.any())  # the new units are new features, not copies


def test_vt_pairs_cancel_and_zero_out_starts_silent():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    autogrow.widen(a, "0", 8, init="vt", generator=0)  # 5 new units: two pairs and an odd one out
    assert torch.equal(a[0].weight[3], a[0].weight[4]) and torch.equal(a[2].weight[:, 3], -a[2].weight[:, 4])
    assert not torch.equal(a[0].weight[3], a[0].weight[5])  # each pair draws anew
    assert a[2].weight[:, 7].abs().sum() == 0  # the odd one out: zero outgoing
    autogrow.widen(b, "0", 7, init="zero_out", generator=0)
    assert b[2].weight[:, 3:].abs().sum() == 0 and b[0].weight[3:].abs().sum() > 0
    old_std = float(net[0].weight.std())
    assert 0.3 * old_std < float(b[0].weight[3:].std()) < 3 * old_std  # matched to the old rows


def test_fresh_units_are_refused_where_a_layer_norm_sees_them():
    model = TinyTransformer()
    with pytest.raises(autogrow.AutogrowError, match=r"init: 'zero_out' is not allowed for 'emb'.*statistics"):
        autogrow.widen(model, "emb", 12, init="zero_out")


def _update_ratio(new_state: str) -> float:
    """|update| of the new units' outgoing weights over the old units', the first Adam step after growth."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    before = copy.deepcopy(opt.state[net[2].weight])
    autogrow.widen(net, "0", 16, init="zero_out", new_state=new_state, optimizer=opt, generator=0)
    st = opt.state[net[2].weight]
    assert torch.equal(st["exp_avg"][:, :8], before["exp_avg"]) and torch.equal(st["step"], before["step"])
    if new_state == "mean":
        assert torch.allclose(st["exp_avg_sq"][:, 8:], before["exp_avg_sq"].mean(1, keepdim=True).expand(3, 8))
    else:
        assert st["exp_avg_sq"][:, 8:].abs().sum() == 0
    w = net[2].weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    moved = (net[2].weight.detach() - w).abs()
    return float(moved[:, 8:].mean() / moved[:, :8].mean())


def test_fresh_units_state_mean_keeps_their_first_steps_normal_sized():
    zero, mean = _update_ratio("zero"), _update_ratio("mean")
    assert zero > 2.0  # zero moments with the tensor's step count carried: oversized first steps
    assert mean < 1.0 < zero
