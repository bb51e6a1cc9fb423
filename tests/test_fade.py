"""Hidden units faded in by their readers (``init="fade"``): MSG's masked ramp where no norm normalises the units.

New units start with random incoming *and* outgoing weights; every layer that reads them weighs their columns by
0 at the growth (exact), then by ``min(1, steps / ramp_steps)``, and is a plain layer again once the ramp ends."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.callbacks import AutoGrow
from autogrow.experiments.zoo import assert_unchanged, snapshot
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import autogrow
from autogrow.actions import Widen
from autogrow.plateau import EveryN
from autogrow.ramp import advance_ramps, is_ramped, ramp_state, set_ramps
from tests.models import TinyGPT, max_rel_error
from tests.test_transformers import TinyLM

pytestmark = pytest.mark.usefixtures("float64")


def trained() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt, x, y


def test_fade_is_exact_then_weighs_the_new_columns_in_and_ends_plain():
    net, opt, x, y = trained()
    ref = net(x)
    autogrow.widen(net, "0", 10, init="fade", ramp_steps=4, generator=0, optimizer=opt, example_inputs=x)
    assert max_rel_error(ref, net(x)) <= 1e-12 and is_ramped(net[2]) and not is_ramped(net[0])
    new = net[2].weight[:, 6:].detach().clone()
    assert bool((new != 0).all())  # random outgoing weights, not zeros
    for step in range(5):
        assert advance_ramps(net, step) == (1 if step < 4 else 0)
        w = torch.cat([torch.ones(6), torch.full((4,), min(1.0, step / 4))])
        h = net[1](net[0](x))
        expected = net[4](net[3](F.linear(h, net[2].weight * w, net[2].bias)))
        assert torch.allclose(net(x), expected, rtol=0, atol=1e-12)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if step == 0:  # weighed 0: no gradient reaches the new units' outgoing or incoming weights
            assert bool((net[2].weight.grad[:, 6:] == 0).all()) and bool((net[0].weight.grad[6:] == 0).all())
        else:
            assert bool((net[2].weight.grad[:, 6:] != 0).any())
        opt.step()
    assert type(net[2]) is nn.Linear


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


def test_conv_readers_and_a_flattened_reader_fade_by_their_blocks():
    torch.manual_seed(0)
    net, x = ConvNet(), torch.randn(3, 2, 4, 4)
    ref = net(x)
    autogrow.widen(net, "a", 6, init="fade", ramp_steps=2, generator=0, example_inputs=x)  # read by a conv
    autogrow.widen(net, "b", 8, init="fade", ramp_steps=2, generator=1, example_inputs=x)  # read through flatten
    assert max_rel_error(ref, net(x)) <= 1e-12 and is_ramped(net.b) and is_ramped(net.fc)
    assert net.fc._autogrow_ramp.segments == ((64, 128, None),)  # the new channels' 16 pixels each
    autogrow.deepen(net, "b", generator=2, example_inputs=x)  # after a fading conv: a plain identity conv
    assert max_rel_error(ref, net(x)) <= 1e-12 and type(net.b[-1]) is nn.Conv2d and is_ramped(net.b[0])
    advance_ramps(net, 0)
    advance_ramps(net, 2)
    assert not is_ramped(net.b[0]) and not is_ramped(net.fc) and net.fc.in_features == 128


def test_fade_is_refused_where_it_cannot_hold_and_other_inits_wait_for_it():
    net, opt, x, _ = trained()
    autogrow.widen(net, "0", 10, init="fade", ramp_steps=4, generator=0, optimizer=opt, example_inputs=x)
    before = snapshot(net, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"while \['2'\] fade in the units of an earlier growth"):
        autogrow.widen(net, "0", 12, init="zero_out", optimizer=opt, example_inputs=x)
    with pytest.raises(autogrow.AutogrowError, match=r"no norm or reader is ramping in"):
        autogrow.shrink(net, "0", 6, optimizer=opt, example_inputs=x)
    assert_unchanged(before, net, opt)
    autogrow.widen(net, "0", 12, init="fade", ramp_steps=4, generator=1, optimizer=opt, example_inputs=x)
    assert net[2]._autogrow_ramp.segments == ((6, 10, None), (10, 12, None))  # a second segment, exact
    normed = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    with pytest.raises(autogrow.AutogrowError, match=r"'fade' is not allowed .*normalise over its units.*'ramp'"):
        autogrow.widen(normed, "0", 12, init="fade")
    gpt, ids = TinyGPT(), torch.randint(0, 11, (2, 5))
    with pytest.raises(autogrow.AutogrowError, match=r"'fade' is not allowed .*attention heads"):
        autogrow.widen(gpt, "blocks.0.attn.q", 12, init="fade", example_inputs=ids)


def test_a_fading_reader_is_saved_and_restored_by_name():
    net, opt, x, _ = trained()
    fresh = [autogrow.widen(net, "2", 9, init="fade", ramp_steps=5, generator=0, example_inputs=x)]
    advance_ramps(net, 3)
    advance_ramps(net, 5)
    state = ramp_state(net)
    assert state == {"4": {"segments": [[6, 9, 3]], "length": 5, "now": 5}}
    other, *_ = trained()
    autogrow.replay(other, fresh)
    other.load_state_dict(net.state_dict())
    assert not is_ramped(other[4])  # a replay leaves the readers plain: the checkpoint says what ramps
    set_ramps(other, state)
    assert is_ramped(other[4]) and torch.equal(other(x), net(x))


def test_a_fit_interrupted_inside_a_fade_resumes_bit_identically(tmp_path):
    torch.set_default_dtype(torch.float32)
    seq = torch.randint(0, 11, (64, 9), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=16)

    class StopAt(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch + 1 >= 3

    def run(root: str, stop: bool = False, ckpt: str | None = None) -> tuple[TinyLM, AutoGrow]:
        pl.seed_everything(0, verbose=False)
        model = TinyLM(layers=1, d=8, heads=1, head_size=4, hidden=8)
        grow = AutoGrow(grow=Widen(init="fade", ramp=10), trigger=EveryN(every=2), max_events=1,
                        targets=["net.blocks.0.fc1"])
        saver = ModelCheckpoint(dirpath=tmp_path / root, save_last=True)
        pl.Trainer(max_epochs=5, callbacks=[grow, saver, *([StopAt()] if stop else [])], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
                   ).fit(model, loader, loader, ckpt_path=ckpt)
        return model, grow

    full, grow_full = run("full")
    assert grow_full.events[0].preservation_error < 1e-5 and not any(is_ramped(m) for m in full.modules())
    part, _ = run("part", stop=True)
    state = ramp_state(part)
    assert set(state) == {"net.blocks.0.fc2"} and 0 < state["net.blocks.0.fc2"]["now"] - 8 < 10  # inside the fade
    resumed, _ = run("resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
