"""``init="mix"``: new units of a LayerNorm/RMSNorm-normalised stream are random orthogonal mixtures of the old
ones. Exact (the norms see the same mean and mean square), not copies of any old unit, refused where the
tensor is not linear up to its norms, and replayable from the record."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.experiments.zoo import assert_unchanged, snapshot

import autogrow
from tests.models import TinyGPT, TinyLlama, TinyTransformer, lm_steps, max_rel_error
from tests.test_token_stream import TinyViT
from tests.test_transformers import ids

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


def trained(model: nn.Module, x: torch.Tensor) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lm_steps(model, opt, x, 3)
    return opt


def max_abs_cosine(new: torch.Tensor, old: torch.Tensor) -> float:
    """The largest |cosine| between a column of ``new`` and a column of ``old``."""
    return float((F.normalize(new, dim=0).T @ F.normalize(old, dim=0)).abs().max())


@pytest.mark.parametrize("build, width", [(TinyTransformer, 12), (TinyTransformer, 15), (TinyGPT, 16), (TinyGPT, 19),
                                          (TinyLlama, 16)])
def test_mixed_stream_units_are_exact_new_and_start_without_state(build, width, rmsnorm_registered):
    torch.manual_seed(0)
    model, x = build(), ids()
    opt = trained(model, x)
    target = "emb" if build is TinyTransformer else "tok"
    emb = model.get_submodule(target)
    n, old_rows = emb.embedding_dim, emb.weight.detach().clone()
    before = {k: v.clone() for k, v in opt.state[emb.weight].items()}
    ref = model(x)
    plan = autogrow.plan_widen(model, target, width, init="auto", generator=0, example_inputs=x)
    assert plan.init == "mix"  # the default where a norm normalises over the units
    plan.apply(opt)
    assert max_rel_error(ref, model(x)) <= 1e-9
    w = model.get_submodule(target).weight.detach()
    assert torch.equal(w[:, :n], old_rows)
    assert max_abs_cosine(w[:, n:], old_rows) < 0.99  # no new unit is a copy of an old one
    st = opt.state[model.get_submodule(target).weight]
    assert torch.equal(st["exp_avg"][:, :n], before["exp_avg"]) and st["exp_avg"][:, n:].abs().sum() == 0
    lm_steps(model, opt, x)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_copies_stay_copies_where_mixtures_do_not():
    """The reason for mixing: a Net2Net copy of a stream unit starts collinear with its original."""
    torch.manual_seed(0)
    a, x = TinyGPT(), ids()
    b = copy.deepcopy(a)
    autogrow.widen(a, "tok", 16, init="net2wider", generator=0, example_inputs=x)
    autogrow.widen(b, "tok", 16, init="mix", generator=0, example_inputs=x)
    old = b.tok.weight[:, :8].detach()
    assert max_abs_cosine(a.tok.weight[:, 8:].detach(), old) > 0.999
    assert max_abs_cosine(b.tok.weight[:, 8:].detach(), old) < 0.99


def test_mix_under_a_norm_needs_at_least_double_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model, x = TinyGPT(), ids()
    opt = trained(model, x)
    before = snapshot(model, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"width: with init='mix'.*at least its 8 units: at least 16, "
                                                     r"not 12"):
        autogrow.widen(model, "tok", 12, init="mix", optimizer=opt, example_inputs=x)
    assert_unchanged(before, model, opt)


class PostNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.fc(x))


@pytest.mark.parametrize("middle, why, auto", [
    (lambda: nn.Sequential(PostNorm(), PostNorm()),
     r"node 'add_1'.*joins the tensor before and after a normalisation.*post-norm residual", "net2wider"),
    (lambda: nn.Sequential(nn.GELU(), nn.LayerNorm(4)), r"node '_1_0'.*GELU.*is not linear in the units", "net2wider"),
    (lambda: nn.BatchNorm1d(4), r"node '_1'.*BatchNorm1d.*scales or normalises each unit on its own.*zero_out",
     "zero_out"),
])
def test_mix_is_refused_where_the_tensor_is_not_linear_up_to_its_norms(middle, why, auto):
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(3, 4), middle(), nn.Linear(4, 2)), torch.randn(5, 3)
    before = snapshot(net)
    with pytest.raises(autogrow.AutogrowError, match=r"init: 'mix' is not allowed for '0': " + why):
        autogrow.widen(net, "0", 8, init="mix", example_inputs=x)
    assert_unchanged(before, net)
    plan = autogrow.plan_widen(net, "0", 8, init="auto", generator=0, example_inputs=x)
    assert plan.init == auto  # copies where a norm needs them, new features elsewhere


def test_mix_through_linear_ops_without_a_norm_grows_by_any_amount():
    """Dropout, scaling and a residual sum are linear: mixtures stay exact, and with no norm any width goes."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.drop, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.drop(self.a(x) * 0.5 + self.b(x)) / 2.0)

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(5, 3)  # eval: dropout is the identity
    ref = net(x).detach()
    g = autogrow.widen(net, "a", 6, init="mix", generator=0, example_inputs=x)
    assert max_rel_error(ref, net(x)) <= 1e-9 and net.b.out_features == 6
    assert g.maps["base"].mix.shape == (2, 4)


def test_a_mixed_growth_replays_from_its_json_record():
    torch.manual_seed(0)
    model, x = TinyGPT(), ids()
    original = copy.deepcopy(model)
    g = autogrow.widen(model, "tok", 19, init="mix", generator=0, example_inputs=x)
    record = autogrow.Growth.from_dict(json.loads(json.dumps(g.to_dict())))
    autogrow.replay(original, [record])
    for (n, p), q in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(p, q), n


def test_gradmax_does_not_re_point_mixed_units():
    from autogrow.gradmax import fresh_rows

    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    g = autogrow.widen(net, "0", 6, init="mix", generator=0)
    with pytest.raises(autogrow.AutogrowError, match=r"gradmax: .*mixtures of the old units.*not free rows"):
        fresh_rows(net, g)


class ViTWithoutLayerScale(TinyViT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = h + self.fc2(torch.relu(self.fc1(self.norm1(h))))
        return self.head(self.norm(h)[:, 0])


def test_a_class_token_and_positions_are_mixed_and_layer_scale_is_refused():
    """Expanding and concatenating a class token along the tokens, adding positions: linear, mixed exactly.
    LayerScale multiplies the stream by a per-unit factor: mixing through it is refused, copies are used."""
    torch.manual_seed(0)
    net, x = ViTWithoutLayerScale(), torch.randn(3, 3, 8, 8)
    ref = net(x)
    plan = autogrow.plan_widen(net, "proj", 16, init="auto", generator=0, example_inputs=x)
    assert plan.init == "mix"
    plan.apply()
    assert max_rel_error(ref, net(x)) <= 1e-9 and net.cls_token.shape == (1, 1, 16)
    scaled = TinyViT()
    before = snapshot(scaled)
    with pytest.raises(autogrow.AutogrowError, match=r"node 'mul'.*multiplies the units by a factor that grows with "
                                                     r"them.*LayerScale"):
        autogrow.widen(scaled, "proj", 16, init="mix", example_inputs=x)
    assert_unchanged(before, scaled)
    assert autogrow.plan_widen(scaled, "proj", 16, init="auto", generator=0, example_inputs=x).init == "net2wider"


@pytest.mark.parametrize("ramp", [None, 100])
def test_the_callback_grows_d_model_and_a_checkpoint_of_it_loads(tmp_path, ramp):
    """Through the callback: d_model grows by fresh units that the norms ramp in (the default; here still ramping
    when the fit ends) or, with ``ramp=None``, by mixtures; the checkpoint's history and ramps rebuild the model."""
    import pytorch_lightning as pl
    from autogrow.callbacks import AutoGrow
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from autogrow.actions import Widen
    from autogrow.checkpoint import load_grown
    from autogrow.plateau import EveryN
    from autogrow.ramp import is_ramped
    from tests.test_transformers import TinyLM

    torch.set_default_dtype(torch.float32)
    seq = torch.randint(0, 11, (64, 9), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=16)
    pl.seed_everything(0, verbose=False)
    sizes = {"layers": 1, "d": 8, "heads": 1, "head_size": 4, "hidden": 8}
    model = TinyLM(**sizes)
    grow = AutoGrow(grow=Widen(ramp=ramp), trigger=EveryN(every=1), max_events=1, targets=["net.tok"])
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.Trainer(max_epochs=2, callbacks=[grow, ckpt], logger=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(model, loader, loader)
    assert model.net.tok.embedding_dim == 16 and grow.events[0].preservation_error < 1e-5
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert [h["options"]["init"] for h in saved["autogrow"]["history"]] == ["mix" if ramp is None else "ramp"]
    ramped = {"net.ln_f", "net.blocks.0.ln1", "net.blocks.0.ln2"} if ramp else set()
    assert set(saved["autogrow"]["ramps"]) == ramped and is_ramped(model.net.ln_f) == bool(ramp)
    loaded = load_grown(TinyLM, tmp_path / "last.ckpt", **sizes)
    assert {n for n, m in loaded.named_modules() if is_ramped(m)} == ramped
    x = seq[:4, :-1]
    assert torch.equal(loaded(x), model.eval()(x))
