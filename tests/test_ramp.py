"""Norms that ramp new units in (``autogrow.ramp``, ``init="ramp"``): exact at the growth, a plain norm afterwards,
undone and refused cleanly, carried through stacking, checkpoints and a resumed fit."""

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
from autogrow.actions import Stack, Widen
from autogrow.plan import Undo
from autogrow.plateau import EveryN
from autogrow.policy import GrowthPolicy, TryCandidates
from autogrow.ramp import RampState, advance_ramps, is_ramped, ramp_state, set_ramps, start_ramp
from tests.models import TinyGPT, lm_steps, max_rel_error
from tests.test_resize_callback import Only
from tests.test_transformers import TinyLM


def _plain(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = None if norm.weight is None else norm.weight[: x.shape[-1]]
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, x.shape[-1:], w, None if norm.bias is None else norm.bias[: x.shape[-1]], norm.eps)
    return F.rms_norm(x, x.shape[-1:], w, norm.eps)


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(7), lambda: nn.LayerNorm(7, bias=False),
                                  lambda: nn.RMSNorm(7, eps=1e-6), lambda: nn.LayerNorm(7, elementwise_affine=False)])
def test_a_ramped_norm_computes_the_old_norm_then_fades_the_new_units_in(make):
    norm = make().double()
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    start_ramp(norm, old=4, length=4)
    y = norm(x)  # not started: the new units weigh 0
    assert torch.allclose(y[..., :4], _plain(norm, x[..., :4]), atol=1e-12) and bool((y[..., 4:] == 0).all())
    assert advance_ramps(norm, 10) == 1 and torch.equal(norm(x), y)  # starts at step 10, weight 0
    advance_ramps(norm, 11)
    state = norm._autogrow_ramp
    assert state.weights(7).tolist() == [1, 1, 1, 1, 0.25, 0.25, 0.25]
    set_ramps(norm, {"": RampState(state.segments, 4, now=14).to_dict()})  # every weight 1: the plain norm
    assert torch.allclose(norm(x), _plain(norm, x), atol=1e-12)
    set_ramps(norm, {"": state.to_dict()})
    assert advance_ramps(norm, 13) == 1 and is_ramped(norm)
    assert advance_ramps(norm, 14) == 0 and type(norm) in (nn.LayerNorm, nn.RMSNorm)
    assert not hasattr(norm, "_autogrow_ramp") and torch.equal(norm(x), _plain(norm, x))


def test_widening_d_model_with_a_ramp_is_exact_and_stays_exact_through_stacking_and_a_second_growth():
    """float64: fresh d_model units under every LayerNorm, exact; a block stacked during the ramp carries it; a
    second growth adds a segment; the optimizer follows; at the end every norm is plain again."""
    torch.manual_seed(0)
    net = TinyGPT(layers=1).double()
    ids = torch.randint(0, 11, (4, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    lm_steps(net, opt, ids, 2)
    ref = net(ids)
    g = autogrow.widen(net, "tok", 16, init="ramp", ramp_steps=3, generator=0, example_inputs=ids, optimizer=opt)
    assert g.options["ramps"] == ["blocks.0.ln1", "blocks.0.ln2", "ln_f"] and g.options["ramp_steps"] == 3
    assert max_rel_error(ref, net(ids)) <= 1e-12
    assert net.tok.weight[:, 8:].abs().min() > 0 and net.head.weight[:, 8:].abs().max() == 0  # new writers, no readers
    autogrow.stack(net, "blocks.0", example_inputs=ids, optimizer=opt)
    assert is_ramped(net.blocks[1].ln1) and max_rel_error(ref, net(ids)) <= 1e-12
    advance_ramps(net, 0)
    lm_steps(net, opt, ids)
    advance_ramps(net, 1)
    ref = net(ids)
    autogrow.widen(net, "tok", 32, init="ramp", ramp_steps=3, generator=1, example_inputs=ids, optimizer=opt)
    assert max_rel_error(ref, net(ids)) <= 1e-12
    assert net.ln_f._autogrow_ramp.segments == ((8, 16, 0), (16, 32, None))
    for step in range(2, 4):
        advance_ramps(net, step)
        lm_steps(net, opt, ids)
    assert set(ramp_state(net)) == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_f"}
    assert advance_ramps(net, 5) == 0 and not ramp_state(net)  # the second segment started at step 2
    assert {type(m) for m in net.modules() if isinstance(m, nn.LayerNorm)} == {nn.LayerNorm}
    assert all(v.shape == p.shape for p in net.parameters() for v in opt.state[p].values() if v.dim() > 0)


def test_a_norm_of_its_own_registered_as_rmsnorm_ramps_as_nn_rmsnorm_does(rmsnorm_registered):
    """Llama's case: a hand-written RMSNorm (its eps under a name of its own) registered as nn.RMSNorm ramps by
    scaling what its own forward sees and returns; it computes what a ramped nn.RMSNorm computes at every step."""
    from tests.models import RMSNorm

    own, ref = RMSNorm(7, eps=1e-5).double(), nn.RMSNorm(7, eps=1e-5).double()
    with torch.no_grad():
        own.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(own.weight)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    for norm in (own, ref):
        start_ramp(norm, old=4, length=4)
    y = own(x)
    assert torch.allclose(y[..., :4], _plain(ref, x[..., :4]), atol=1e-12) and bool((y[..., 4:] == 0).all())
    for step in range(10, 14):
        assert advance_ramps(own, step) == advance_ramps(ref, step) == 1
        assert torch.allclose(own(x), ref(x), atol=1e-12), step
    assert advance_ramps(own, 14) == 0 and type(own) is RMSNorm and torch.equal(own(x), RMSNorm.forward(own, x))


def test_auto_ramps_where_the_norms_can_and_mixes_where_they_cannot(rmsnorm_registered):
    """A subclass of nn.LayerNorm registered as one (timm's) ramps, and so does an RMSNorm of its own registered as
    nn.RMSNorm (Llama's); a LayerNorm of its own does not (its statistics subtract a mean that scaling cannot
    weigh): "auto" falls back to mixtures there, and "ramp" is refused naming it."""
    from tests.models import RMSNorm

    class OwnNorm(nn.LayerNorm):  # a forward of its own: it ramps only once registered as what it computes
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    class OwnLayerNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

        def forward(self, x):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)

    ids = torch.randint(0, 11, (2, 6))
    net = TinyGPT(layers=1).double()
    assert autogrow.plan_widen(net, "tok", 16, init="auto", ramp_steps=5, example_inputs=ids).init == "ramp"
    assert autogrow.plan_widen(net, "tok", 16, init="auto", example_inputs=ids).init == "mix"  # no ramp length
    assert autogrow.plan_widen(net, "blocks.0.fc1", 24, init="auto", ramp_steps=5, example_inputs=ids).init == \
        "zero_out"  # no norm over the MLP's units: nothing to ramp
    for norm, spec in ((OwnNorm(8), nn.LayerNorm(1)), (RMSNorm(8), nn.RMSNorm(1))):
        autogrow.register_channelwise(type(norm), autogrow.registry.channel_spec(spec))
        net = TinyGPT(layers=1).double()
        net.ln_f = norm.double()
        ref = net(ids)
        autogrow.widen(net, "tok", 16, init="ramp", ramp_steps=5, generator=0, example_inputs=ids)
        assert is_ramped(net.ln_f) and isinstance(net.ln_f, type(norm)) and max_rel_error(ref, net(ids)) <= 1e-12
        advance_ramps(net, 0)
        assert advance_ramps(net, 5) == 0 and type(net.ln_f) is type(norm)  # its own class back
    autogrow.register_channelwise(OwnLayerNorm, autogrow.registry.channel_spec(nn.LayerNorm(1)))
    try:
        net.ln_f = OwnLayerNorm(16).double()
        assert autogrow.plan_widen(net, "tok", 32, init="auto", ramp_steps=5, example_inputs=ids).init == "mix"
        before = snapshot(net)
        with pytest.raises(autogrow.AutogrowError, match=r"init: 'ramp' is not allowed for 'tok': 'ln_f' is a "
                                                         r"OwnLayerNorm; only nn.LayerNorm and nn.RMSNorm ramp"):
            autogrow.plan_widen(net, "tok", 32, init="ramp", example_inputs=ids)
        assert_unchanged(before, net)
    finally:
        autogrow.registry._CHANNELWISE.pop(OwnLayerNorm)
        autogrow.registry._CHANNELWISE.pop(OwnNorm)


def test_copies_and_shrinking_are_refused_while_a_ramp_runs_and_an_undo_puts_the_plain_norms_back():
    ids = torch.randint(0, 11, (2, 6))
    net = TinyGPT(layers=1).double()
    opt = torch.optim.Adam(net.parameters())
    lm_steps(net, opt, ids)
    before = snapshot(net, opt)
    undo = Undo()
    autogrow.plan_widen(net, "tok", 16, init="ramp", generator=0, example_inputs=ids).apply(opt, record=undo)
    assert is_ramped(net.ln_f)
    ramped = snapshot(net, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"init: 'net2wider' is not allowed for 'tok' while "
                                                     r"\['blocks.0.ln1', 'blocks.0.ln2', 'ln_f'\] ramp in units"):
        autogrow.widen(net, "tok", 32, init="net2wider", example_inputs=ids, optimizer=opt)
    assert_unchanged(ramped, net, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"target: 'tok' is not allowed; expected a layer whose units no "
                                                     r"norm or reader is ramping in .*shrink once the ramp has ended"):
        autogrow.shrink(net, "tok", mode="prune", width=12, example_inputs=ids, optimizer=opt)
    assert_unchanged(ramped, net, opt)
    undo.restore()  # the model only (a caller's Undo does not hold the optimizer)
    assert_unchanged(before[:3] + (None,), net)
    assert not any(is_ramped(m) for m in net.modules())


def test_set_ramps_restores_by_name_and_refuses_what_cannot_ramp():
    net = TinyGPT(layers=1).double()
    ids = torch.randint(0, 11, (2, 6))
    autogrow.widen(net, "tok", 16, init="ramp", ramp_steps=4, generator=0, example_inputs=ids)
    advance_ramps(net, 7)
    saved = ramp_state(net)
    assert saved["ln_f"] == {"segments": [[8, 16, 7]], "length": 4, "now": 7}
    set_ramps(net, {})
    assert not any(is_ramped(m) for m in net.modules())
    set_ramps(net, saved)
    assert ramp_state(net) == saved
    with pytest.raises(autogrow.AutogrowError, match=r"ramps: 'tok' is not a norm or layer of this model that can "
                                                     r"ramp"):
        set_ramps(net, {"tok": saved["ln_f"]})
    with pytest.raises(autogrow.AutogrowError, match=r"ramps: 'head''s ramp over units 8..32 does not fit its 16"):
        set_ramps(net, {"head": {**saved["ln_f"], "segments": [[8, 32, 7]]}})
    assert ramp_state(net) == saved


@pytest.mark.parametrize("ramp", [0, -3, 1.5, 1.0, True, "5"])
def test_widen_checks_its_ramp(ramp):
    with pytest.raises(autogrow.AutogrowError, match=r"ramp"):
        Widen(ramp=ramp)


def test_a_fit_interrupted_inside_a_ramp_resumes_bit_identically(tmp_path):
    """Two AutoGrow callbacks (widen, stack) advance the ramps once per step between them; a checkpoint taken in the
    middle of the ramp (norms ramped, weights between 0 and 1) resumes to the uninterrupted run's weights."""
    torch.set_default_dtype(torch.float32)
    seq = torch.randint(0, 11, (64, 9), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=16)
    sizes = {"layers": 1, "d": 8, "heads": 1, "head_size": 4, "hidden": 8}

    class StopAt(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch + 1 >= 3

    def run(root: str, stop: bool = False, ckpt: str | None = None) -> tuple[TinyLM, AutoGrow]:
        pl.seed_everything(0, verbose=False)
        model = TinyLM(**sizes)
        widen = AutoGrow(grow=Widen(ramp=10), trigger=EveryN(every=2), max_events=1, targets=["net.tok"])
        deeper = AutoGrow(grow=Stack(), trigger=EveryN(every=2), max_events=1)
        saver = ModelCheckpoint(dirpath=tmp_path / root, save_last=True)
        pl.Trainer(max_epochs=5, callbacks=[widen, deeper, saver, *([StopAt()] if stop else [])], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
                   ).fit(model, loader, loader, ckpt_path=ckpt)
        return model, widen

    full, _ = run("full")
    assert not any(is_ramped(m) for m in full.modules())  # 10 steps after the growth at step 8: over by step 20
    part, grow = run("part", stop=True)
    state = ramp_state(part)
    assert len(grow.events) == 1 and set(state) == {"net.ln_f", "net.blocks.0.ln1", "net.blocks.0.ln2",
                                                    "net.blocks.1.ln1", "net.blocks.1.ln2"}
    assert 0 < state["net.ln_f"]["now"] - state["net.ln_f"]["segments"][0][2] < 10  # inside the ramp
    saved = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)
    assert saved["autogrow"]["ramps"] == state
    resumed, _ = run("resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_replayed_growth_leaves_the_norms_plain_unless_the_checkpoint_says_they_ramp():
    """Replay rebuilds the shapes; the ramp is training state: over unless the saved ramps say otherwise."""
    from autogrow.checkpoint import restore_history

    ids = torch.randint(0, 11, (2, 6))
    net = TinyGPT(layers=1).double()
    g = autogrow.widen(net, "tok", 16, init="ramp", ramp_steps=4, generator=0, example_inputs=ids)
    advance_ramps(net, 0)
    advance_ramps(net, 2)  # half way
    plain, ramped = TinyGPT(layers=1).double(), TinyGPT(layers=1).double()
    restore_history(plain, [g.to_dict()])
    restore_history(ramped, [g.to_dict()], ramps=ramp_state(net))
    assert not any(is_ramped(m) for m in plain.modules()) and ramp_state(ramped) == ramp_state(net)
    ramped.load_state_dict(net.state_dict())
    assert torch.equal(ramped(ids), net(ids))


def test_try_candidates_trials_ramp_d_model_in_and_leave_the_ramps_as_they_were(tmp_path):
    """A trial of d_model advances the ramps as real steps would (else its new units weigh 0 throughout and it
    scores exactly as no growth); after the trials, even one that ended a running ramp, the model, the ramps and
    the optimizer are what growing the chosen layers directly gives."""
    torch.set_default_dtype(torch.float32)
    seq = torch.randint(0, 11, (64, 9), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=16)

    def run(policy: GrowthPolicy) -> tuple[TinyLM, AutoGrow, dict]:
        pl.seed_everything(0, verbose=False)
        model = TinyLM(layers=1, d=8, heads=1, head_size=4, hidden=8)
        first = AutoGrow(grow=Widen(ramp=6), trigger=EveryN(every=1), max_events=1, targets=["net.tok"],
                         deadline=None)  # d_model at step 4: its ramp runs over steps 4-10
        grow = AutoGrow(grow=Widen(ramp=6), trigger=EveryN(every=2), max_events=1, policy=policy, deadline=None,
                        seed=5)  # at step 8: trials of 3 steps end the first ramp
        trainer = pl.Trainer(max_epochs=3, callbacks=[first, grow], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
        trainer.fit(model, loader, loader)
        return model, grow, trainer.optimizers[0].state_dict()

    tried, grow, opt_a = run(TryCandidates(k=3, steps=3, actions=("widen",)))
    notes = grow.events[0].notes
    assert notes.startswith("tried 3") and "widen net.tok: loss" in notes
    reference = float(notes.split("reference loss ")[1].split(")")[0])
    tok = float(notes.split("widen net.tok: loss ")[1].split(",")[0])
    assert tok != reference  # the new d_model units took part in the trial
    direct, _, opt_b = run(Only(grow.events[0].changes[0].target))
    a, b = tried.state_dict(), direct.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ramp_state(tried) == ramp_state(direct)
    assert all(torch.equal(torch.as_tensor(opt_a["state"][i][k]), torch.as_tensor(opt_b["state"][i][k]))
               for i in opt_a["state"] for k in opt_a["state"][i])
