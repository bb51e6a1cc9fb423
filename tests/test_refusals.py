"""Requests that cannot be exact are refused, with a message naming the culprit, and change nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.experiments.zoo import assert_unchanged, snapshot  # the zoo's exact checks

import autogrow
from tests.models import TinyTransformer


class FixedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(48, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 48))


class SoftmaxOverFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(F.softmax(self.fc1(x), dim=-1))


class MatmulFixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.proj = nn.Parameter(torch.randn(5, 2))

    def forward(self, x):
        return torch.relu(self.fc1(x)) @ self.proj


class Unregistered(nn.Module):
    """A custom layer whose per-feature parameter reaches the widened tensor through an op autogrow does not know
    (``x * self.scale`` alone grows: a bare parameter grows with the units, as LayerScale does)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale.flip(0)


class WithUnregistered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(4, 5), Unregistered(5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.mid(self.fc1(x)))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))


CASES = [
    (mlp, lambda m: autogrow.plan_widen(m, "nope", 8),
     r"target: 'nope' is not a module.*growable layers: \['0', '2'\]"),
    (mlp, lambda m: autogrow.plan_widen(m, "0", 5), r"width: 5 is not allowed; expected more than '0'.s current 5"),
    (mlp, lambda m: autogrow.plan_widen(m, "1", 8), r"target: '1' is a GELU"),
    (mlp, lambda m: autogrow.plan_widen(m, "2", 8), r"node 'output'.*model's output"),
    (mlp, lambda m: autogrow.plan_widen(m, "0", 8, init="zeros"), r"init: 'zeros' is not allowed; expected one of"),
    (mlp, lambda m: autogrow.plan_widen(m, "0", 8, split=1.5),
     r"split: 1.5 is not allowed; expected a number in \[0.0, 1.0\)"),
    (FixedView, lambda m: autogrow.plan_widen(m, "conv", 4), r"node 'view'.*fixed shape.*x.flatten\(1\)"),
    (SoftmaxOverFeatures, lambda m: autogrow.plan_widen(m, "fc1", 8), r"node 'softmax'.*normalises over the widened"),
    (MatmulFixed, lambda m: autogrow.plan_widen(m, "fc1", 8), r"node 'matmul'"),
    (WithUnregistered, lambda m: autogrow.plan_widen(m, "fc1", 8), r"node 'flip'.*fixed"),
    (mlp, lambda m: autogrow.plan_deepen(m, "0"),
     r"after: '0' is followed by node '_1' .*GELU.*not idempotent.*residual=True"),
    (mlp, lambda m: autogrow.plan_deepen(m, "1"), r"after: '1' is a GELU, which has no identity"),
    (mlp, lambda m: autogrow.plan_deepen(m, "0", kernel_size=2, residual=True),
     r"kernel_size: 2 is not allowed; expected an odd"),
    (TinyTransformer, lambda m: autogrow.plan_widen(m, "emb", 9), r"width: .*multiple of 6, not 9"),
    (TinyTransformer, lambda m: autogrow.plan_widen(m, "emb", 12, mapping="random"), r"mapping='uniform'"),
]


@pytest.mark.parametrize("build, call, message", CASES)
def test_refusal_names_the_problem_and_changes_nothing(build, call, message):
    model = build()
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=message):
        call(model)
    assert_unchanged(before, model)


def test_planning_never_mutates():
    model = TinyTransformer()
    before = snapshot(model)
    plan = autogrow.plan_widen(model, "emb", 12, generator=0)
    autogrow.plan_deepen(model, "blocks.0.fc1", residual=True)
    assert_unchanged(before, model)
    plan.apply()
    assert model.emb.embedding_dim == 12
    with pytest.raises(autogrow.AutogrowError, match="changed since the plan"):
        plan.apply()  # stale plan
    deeper = autogrow.plan_deepen(model, "blocks.0.fc1", residual=True)
    deeper.apply()
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match="changed since the plan"):
        deeper.apply()  # its module was wrapped by the first apply
    assert_unchanged(before, model)


def test_optimizer_refusals_leave_model_and_optimizer_untouched():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.LBFGS(model.parameters())
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match="optimizer: LBFGS keeps its history"):
        autogrow.widen(model, "0", 8, optimizer=opt)
    assert_unchanged(before, model)

    class OddState(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["sketch"] = torch.zeros(3)
            return super().step(closure)

    opt = OddState(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = snapshot(model, opt)
    message = r"optimizer: OddState keeps state 'sketch' \(\(3,\)\).*state='reset'"
    with pytest.raises(autogrow.AutogrowError, match=message):
        autogrow.deepen(model, "0", optimizer=opt)
    assert_unchanged(before, model, opt)
    with pytest.raises(autogrow.AutogrowError, match="state: 'keep' is not allowed; expected one of"):
        autogrow.widen(model, "0", 8, optimizer=opt, state="keep")
    assert_unchanged(before, model, opt)
    autogrow.widen(model, "0", 8, optimizer=opt, state="reset")  # the explicit way out works
    assert len(opt.state) == 0 and model[0].out_features == 8
