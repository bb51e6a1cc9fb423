"""GradMax: fresh units' incoming weights along the top right singular vectors of M = sum delta a^T; exact; the
directions are M's; the gradient on the new outgoing weights is larger than with drawn rows; unsupported widenings
are refused untouched; in a real fit the rows are set at the next optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.experiments.zoo import assert_unchanged, snapshot

import autogrow
from autogrow.actions import Widen
from autogrow.gradmax import fresh_rows, gradmax


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)


def _loss(y: torch.Tensor):
    return lambda out: F.cross_entropy(out, y)


def test_fresh_rows_follow_the_top_singular_vectors_exactly():
    net, (x, y) = _net(), _batch()
    g = autogrow.widen(net, "0", 9, init="zero_out", generator=0)
    target = fresh_rows(net, g)
    assert target.producer == "0" and target.consumers == ("2",) and target.rows.tolist() == [5, 6, 7, 8]
    before, old = net(x).detach(), net[0].weight[:5].detach().clone()
    gradmax(net, g, x, _loss(y))
    assert (net(x) - before).abs().max() < 1e-12  # exact: the fresh units' outgoing weights are zero
    assert torch.equal(net[0].weight[:5], old) and (net[0].bias[5:] == 0).all()
    assert all(p.grad is None for p in net.parameters())  # only the consumers' outputs were differentiated
    # M computed independently: the gradient at layer 2's output times the input of layer 0
    h = net[1](net[0](x))
    z = net[2](h)
    delta, = torch.autograd.grad(F.cross_entropy(net[4](net[3](z)), y), z)
    _, s, vh = torch.linalg.svd(delta.T @ x, full_matrices=False)
    r = int((s > 1e-6 * s[0]).sum())  # a unit of layer 2 never active: M has rank 3 here
    rows, scale = net[0].weight[5:].detach(), old.norm(dim=1).mean()
    assert r == 3 and torch.allclose(rows @ rows.T, scale ** 2 * torch.eye(4, dtype=torch.float64), atol=1e-9)
    assert torch.allclose((rows[:r] @ vh[:r].T).abs(), scale * torch.eye(r, dtype=torch.float64), atol=1e-9)
    assert (rows[r:] @ vh[:r].T).abs().max() < 1e-9  # past M's rank: drawn, orthogonal to its directions


def test_gradmax_rows_get_a_larger_gradient_than_drawn_ones():
    """What GradMax maximises: the gradient on the new outgoing weights (2 fresh units over 20 input features; drawn
    rows of the same norm catch about 2/20 of M's energy)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 20, generator=g, dtype=torch.float64), torch.randint(0, 3, (256,), generator=g)
    grown = autogrow.widen(net, "0", 7, init="zero_out", generator=0)
    drawn = copy.deepcopy(net)
    gradmax(net, grown, x, _loss(y))
    norms = []
    for m in (drawn, net):
        F.cross_entropy(m(x), y).backward()
        norms.append(float(m[2].weight.grad[:, 5:].norm()))
    assert norms[1] > 1.5 * norms[0]


class PoolTokens(nn.Sequential):
    """Tokens through a Linear, averaged over the tokens, then a Linear: the consumer's rows are samples, the
    producer's input rows are tokens, so M cannot be formed."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x):
        return self[2](self[1](self[0](x)).mean(dim=1))


@pytest.mark.parametrize("build, shape, kw, message", [
    (lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), (4, 1, 4, 4),
     {"init": "zero_out"}, r"gradmax: the widening of '0': '0' \(Conv2d\) holds the widened units"),
    (lambda: nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 2)), (4, 6), {"init": "net2wider"},
     r"'1' \(LayerNorm\) holds the widened units"),
    (lambda: nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), (4, 6), {"init": "net2wider"},
     r"added no fresh units \(init='net2wider'\)"),
    (lambda: nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), (4, 6), {"init": "zero_out"},
     r"also resizes the buffers"),
    (PoolTokens, (4, 5, 6), {"init": "zero_out"},
     r"the output \(4, 2\) of '2' does not line up with the input \(4, 5, 6\) of '0'"),
])
def test_unsupported_widenings_are_refused_untouched(build, shape, kw, message):
    net, x = build(), torch.randn(*shape)
    g = autogrow.widen(net, "0", 8, generator=0, example_inputs=x, **kw)
    before = snapshot(net)
    with pytest.raises(autogrow.AutogrowError, match=message):
        gradmax(net, g, x, lambda out: out.square().mean())
    assert_unchanged(before, net)


def test_widen_gradmax_needs_fresh_units():
    with pytest.raises(autogrow.AutogrowError, match=r"init: 'net2wider'.*'auto' or 'zero_out' with gradmax=True"):
        Widen(init="net2wider", gradmax=True)
    with pytest.raises(autogrow.AutogrowError, match="gradmax"):
        Widen(gradmax="yes")


def test_the_callback_sets_the_fresh_rows_before_the_next_optimizer_step(tmp_path):
    """In a real fit: the event is exact, and when the optimizer first steps after it the fresh rows are orthogonal
    with the old rows' mean norm (GradMax's directions), not the drawn ones."""
    import pytorch_lightning as pl
    from autogrow.callbacks import AutoGrow
    from autogrow.experiments.data import DigitsDataModule
    from autogrow.experiments.models import MLP, Classifier

    from autogrow.plateau import EveryN
    from tests.test_callback import trainer

    class Rows(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            fc1 = pl_module.model.fc1
            if fc1.out_features == 16 and not self.seen:
                self.seen.append(fc1.weight.detach().clone())

    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, [8]), lr=0.01)
    grow = AutoGrow(grow=Widen(gradmax=True), trigger=EveryN(every=1), max_events=1, deadline=None)
    rows = Rows()
    trainer(tmp_path, [grow, rows], max_epochs=2).fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert grow.events[0].preservation_error < 1e-6 and grow._gradmax.applied == 1
    w = rows.seen[0].double()
    fresh, scale = w[8:], w[:8].norm(dim=1).mean()
    assert torch.allclose(fresh @ fresh.T, scale ** 2 * torch.eye(8, dtype=torch.float64), atol=1e-4)
