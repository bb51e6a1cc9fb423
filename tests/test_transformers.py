"""Transformers grow in every dimension staged training grows: MLP width, heads, d_model, depth."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.callbacks import AutoGrow, load_grown

import autogrow
from autogrow.optim import optimizer_holds_model
from tests.models import TinyGPT, TinyLlama, lm_steps, max_rel_error
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


def ids(t: int = 7) -> torch.Tensor:
    return torch.randint(0, 11, (3, t), generator=torch.Generator().manual_seed(0))


def trained(sdpa: bool) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model, x = TinyGPT(sdpa=sdpa), ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lm_steps(model, opt, x, 2)
    return model, opt, x


@pytest.mark.parametrize("sdpa", [True, False])
def test_every_dimension_grows_exactly_and_trains(sdpa):
    model, opt, x = trained(sdpa)
    ref = model(x)
    steps = [
        lambda: autogrow.widen(model, "blocks.0.attn.q", 12, split=0.3, generator=1, optimizer=opt, example_inputs=x),
        lambda: autogrow.widen(model, "blocks.1.fc1", 24, split=0.3, generator=2, optimizer=opt, example_inputs=x),
        lambda: autogrow.widen(model, "tok", 16, generator=3, optimizer=opt, example_inputs=x),  # d_model, x2
        lambda: autogrow.stack(model, "blocks.1", generator=4, optimizer=opt, example_inputs=x),
        lambda: autogrow.deepen(model, "blocks.0.fc1", residual=None, generator=5, optimizer=opt, example_inputs=x),
    ]
    for step in steps:
        step()
        assert max_rel_error(ref, model(x)) <= 1e-9
    assert model.blocks[0].attn.q.out_features == 12 and model.blocks[0].attn.k.out_features == 12
    assert model.blocks[0].attn.o.in_features == 12 and model.tok.embedding_dim == 16 and len(model.blocks) == 3
    assert optimizer_holds_model(opt, model)
    opt.zero_grad()
    loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_new_heads_compute_what_their_originals_do():
    model, _, x = trained(True)
    g = autogrow.widen(model, "blocks.0.attn.v", 9, generator=0, example_inputs=x)  # 2 heads of 3 -> 3 heads
    head_map = g.maps["base"]
    assert head_map.idx.tolist()[:2] == [0, 1] and len(head_map.idx) == 3
    assert g.params["blocks.0.attn.q.weight"][0].block == 3  # rows move by whole heads


def test_head_size_and_partial_heads_are_refused():
    model, opt, x = trained(True)

    class FixedHeads(nn.Module):  # heads fixed by the config, head size from the width: it would change
        def __init__(self) -> None:
            super().__init__()
            self.q, self.o = nn.Linear(8, 6), nn.Linear(6, 8)

        def forward(self, h):
            b, t, c = h.shape
            y = self.q(h)
            return self.o(y.view(b, t, 2, y.size(-1) // 2).flip(2).reshape(b, t, -1))

    h = torch.randn(2, 5, 8)
    net = FixedHeads()
    before = snapshot(net)
    with pytest.raises(autogrow.AutogrowError, match=r"head size would change.*Grow the number of heads"):
        autogrow.widen(net, "q", 10, example_inputs=h)
    assert_unchanged(before, net)
    before = snapshot(model, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"new width 10 is not a whole number of heads.*multiple of 3"):
        autogrow.widen(model, "blocks.0.attn.q", 10, optimizer=opt, example_inputs=x)
    assert_unchanged(before, model, opt)


def test_llama_style_model_grows_in_every_dimension(rmsnorm_registered):
    """Rotary embeddings (rotate_half slices the head axis and joins the halves), a hand-written RMSNorm, SwiGLU:
    heads, MLP, d_model and depth grow exactly, and the optimizer keeps exactly the model's parameters."""
    torch.manual_seed(0)
    model, x = TinyLlama(), ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    ref = model(x)
    autogrow.widen(model, "blocks.0.attn.q", 16, split=0.3, generator=1, optimizer=opt, example_inputs=x)  # 4 heads
    assert max_rel_error(ref, model(x)) <= 1e-9
    autogrow.widen(model, "blocks.1.up", 20, init="zero_out", generator=2, optimizer=opt, example_inputs=x)  # SwiGLU
    assert max_rel_error(ref, model(x)) <= 1e-9
    autogrow.widen(model, "tok", 16, generator=3, optimizer=opt, example_inputs=x)  # d_model through the RMSNorms
    assert max_rel_error(ref, model(x)) <= 1e-9
    autogrow.stack(model, "blocks.1", generator=4, optimizer=opt, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    b0 = model.blocks[0]
    assert (b0.attn.k.out_features, b0.attn.v.out_features, b0.attn.o.in_features) == (16, 16, 16)
    assert model.blocks[1].gate.out_features == 20 and model.norm.weight.shape == (16,) and len(model.blocks) == 3
    assert optimizer_holds_model(opt, model)
    lm_steps(model, opt, x)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_unregistered_hand_written_norm_is_refused_with_the_way_out():
    torch.manual_seed(0)
    model, x = TinyLlama(), ids()
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=r"node 'mean'.*reduces over the widened units.*"
                                                     r"register_channelwise\(MyNorm"):
        autogrow.widen(model, "tok", 16, example_inputs=x)
    assert_unchanged(before, model)


class Pooling(nn.Module):
    """Token pooling (mean over T, or the first token) and a concatenation along time."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.a, self.b, self.head = how, nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.how == "mean":
            h = h.mean(dim=1)
        elif self.how == "cls":
            h = h[:, 0]
        else:  # time: (B, 2T, C), an element-wise merge of both branches
            h = torch.cat([h, torch.relu(self.b(x))], dim=1).amax(dim=1)
        return self.head(h)


@pytest.mark.parametrize("how", ["mean", "cls", "time"])
def test_token_pooling_and_time_concatenation(how):
    x = torch.randn(3, 5, 4)
    model = Pooling(how)
    ref = model(x)
    autogrow.widen(model, "a", 9, split=0.3, generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    if how == "time":
        assert model.b.out_features == 9  # the other branch grows with it


class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, c, 3, padding=1), nn.Linear(c, 2), nn.Linear(2, c)
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        b, c, _, _ = h.shape
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3))))))
        return self.head((h * s.view(b, c, 1, 1)).mean((2, 3)))


def test_squeeze_excitation_gate_grows_with_its_channels():
    x = torch.randn(2, 3, 6, 6)
    model = SqueezeExcite()
    ref = model(x)
    plan = autogrow.plan_widen(model, "conv", 7, split=0.3, generator=0, example_inputs=x)
    assert set(plan.producers) == {"conv", "fc2"} and set(plan.consumers) == {"fc1", "head"}
    plan.apply()
    assert max_rel_error(ref, model(x)) <= 1e-9


def test_stacking_a_post_norm_block_is_refused_and_undone():
    class PostNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)

        def forward(self, x):
            return self.ln(x + self.fc(x))

    net = nn.Sequential(nn.Linear(3, 4), PostNorm(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    before = snapshot(net)
    with pytest.raises(autogrow.AutogrowError, match="changed the model's output"):
        autogrow.stack(net, "1", example_inputs=x)
    assert_unchanged(before, net)
    with pytest.raises(autogrow.errors.NeedsShapes, match="needs example_inputs"):
        autogrow.stack(net, "1")


def test_stack_replays_and_carries_the_optimizer():
    model, opt, x = trained(True)
    fresh = copy.deepcopy(model)
    g = autogrow.stack(model, "blocks.0", optimizer=opt, generator=0, example_inputs=x)
    assert "blocks.1.fc2.weight" in g.renames and g.renames["blocks.1.fc2.weight"] == "blocks.2.fc2.weight"
    new = [p for n, p in model.named_parameters() if n.startswith("blocks.1.")]
    assert all(p not in opt.state for p in new) and all(p.sum() == 0 for p in model.blocks[1].fc2.parameters())
    autogrow.replay(fresh, [g.to_dict()])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_stack_duplicate_copies_the_block_unmodified_and_replays():
    """G_stack's duplicate: the new block equals the old one, writes included, so the function changes (it is not
    exact, and says so); the grown model trains, the optimizer holds it, and the record replays it."""
    model, opt, x = trained(True)
    fresh, before = copy.deepcopy(model), model(x).detach()
    plan = autogrow.plan_stack(model, "blocks.0", init="duplicate", generator=0, example_inputs=x)
    assert not plan.exact
    g = plan.apply(opt)
    assert "unmodified duplicate" in g.summary()
    assert all(torch.equal(a, b) for a, b in zip(model.blocks[0].parameters(), model.blocks[1].parameters()))
    assert (model(x) - before).abs().max() > 1e-3  # the duplicate's writes count
    assert {id(p) for g_ in opt.param_groups for p in g_["params"]} == {id(p) for p in model.parameters()}
    autogrow.replay(fresh, [g.to_dict()])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()


class TinyLM(pl.LightningModule):
    """TinyGPT (or ``arch``) as a LightningModule: next-token cross-entropy, AdamW."""

    def __init__(self, arch: type[nn.Module] = TinyGPT, **kw) -> None:
        super().__init__()
        self.net = arch(**kw)

    def forward(self, idx):
        return self.net(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def fit_one_growth(make: Callable[[], TinyLM], vocab: int = 11, length: int = 9
                   ) -> tuple[TinyLM, AutoGrow, pl.Trainer, torch.Tensor]:
    """A 2-epoch float32 fit of ``make()`` (built after seeding) on 64 random token sequences of ``vocab`` ids and
    ``length``, with one ``AutoGrow`` event of the ``all`` policy after the first epoch; returns the model, the
    callback, the trainer and the sequences."""
    from torch.utils.data import DataLoader, TensorDataset

    from autogrow.plateau import EveryN

    torch.set_default_dtype(torch.float32)
    seq = torch.randint(0, vocab, (64, length), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=16)
    pl.seed_everything(0, verbose=False)
    model = make()
    grow = AutoGrow(trigger=EveryN(every=1), max_events=1, policy="all")
    trainer = pl.Trainer(max_epochs=2, callbacks=[grow], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, loader, loader)
    return model, grow, trainer, seq


def reloaded(trainer: pl.Trainer, model: TinyLM, seq: torch.Tensor, tmp_path, **kwargs: object) -> TinyLM:
    """``model`` saved in ``trainer``'s checkpoint and rebuilt from it by ``load_grown(TinyLM, ..., **kwargs)``, which
    replays the growths: asserts that it computes what ``model`` does on two of ``seq``'s sequences."""
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_grown(TinyLM, tmp_path / "last.ckpt", **kwargs)
    assert torch.equal(loaded(seq[:2, :-1]), model.eval()(seq[:2, :-1]))
    return loaded


def test_the_callback_grows_width_and_depth_of_a_transformer(tmp_path):
    """One AutoGrow widens (d_model, heads, MLP: all discovered), another stacks blocks; both exact."""
    from torch.utils.data import DataLoader, TensorDataset

    from autogrow.actions import Stack
    from autogrow.plateau import EveryN

    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 11, (96, 9), generator=g)
    data = TensorDataset(seq[:, :-1], seq[:, 1:])
    loader = DataLoader(data, batch_size=16)
    pl.seed_everything(0, verbose=False)
    model = TinyLM(layers=1, d=8, heads=1, head_size=4, hidden=8)
    widen = AutoGrow(trigger=EveryN(every=1), max_events=2, policy="all")
    deeper = AutoGrow(grow=Stack(), trigger=EveryN(every=1), max_events=2, policy="all")
    trainer = pl.Trainer(max_epochs=4, callbacks=[widen, deeper], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, loader, loader)
    net = model.net
    assert len(net.blocks) == 4 and net.tok.embedding_dim == 32
    assert all(b.attn.q.out_features == 16 and b.fc1.out_features == 32 for b in net.blocks)
    assert all(e.preservation_error < 1e-5 for e in widen.events + deeper.events)


def test_the_callback_grows_a_llama_style_model(rmsnorm_registered):
    """The callback's ``all`` policy on rotary attention, RMSNorm and SwiGLU: d_model, heads and MLP, each once per
    event, exact; d_model by fresh units that the hand-written RMSNorms (registered as nn.RMSNorm) ramp in."""
    from autogrow.checkpoint import history_of

    model, grow, _, _ = fit_one_growth(lambda: TinyLM(arch=TinyLlama, layers=1, d=8, heads=1, head_size=4, hidden=8))
    net = model.net
    assert {h["options"]["init"] for h in history_of(model) if h["target"].endswith("tok")} == {"ramp"}
    assert net.tok.embedding_dim == 16 and net.norm.weight.shape == (16,)
    assert net.blocks[0].attn.q.out_features == 8 and net.blocks[0].gate.out_features == 16
    assert len(grow.events) == 1 and grow.events[0].preservation_error < 1e-5
