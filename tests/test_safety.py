"""Never silently wrong: every construct that once grew wrongly is now exact or refused with the model
and optimizer untouched; every apply with example inputs is verified and undone when it fails."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.errors import NeedsShapes
from autogrow.optim import optimizer_holds_model
from tests.models import max_rel_error
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


class WidthScaled(nn.Module):
    """``h / h.size(-1)``: the width is read and used in the computation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h / h.size(-1))


class HeadSplit(nn.Module):
    """``b, t, d = h.shape; h.view(b, t, heads, d // heads)``: the units are split into heads."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        b, t, d = h.shape
        h = h.view(b, t, 2, d // 2).flip(2).flatten(2)
        return self.out(h)


class FusedSplit(nn.Module):
    """nanoGPT's ``B, T, C = x.size(); q, k, v = c_attn(x).split(C, dim=2)``."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.emb, self.c_attn, self.c_proj, self.head = nn.Linear(4, d), nn.Linear(d, 3 * d), nn.Linear(d, d), \
            nn.Linear(d, 2)

    def forward(self, x):
        x = self.emb(x)
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        return self.head(x + self.c_proj(q * k + v))


class ViewBack(nn.Module):
    """Sizes read from the widened tensor and used to reshape it back: they follow the new width."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        b, t, c = h.shape
        h = h.reshape(b * t, c).view(b, t, c)
        return self.fc2(h)


class TokenBN(nn.Module):
    """``BatchNorm1d`` on a ``(B, T, C)`` tensor normalises T, not the features."""

    def __init__(self, t: int, c: int) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, c), nn.BatchNorm1d(t), nn.Linear(c, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def tokens(t: int = 5) -> torch.Tensor:
    return torch.randn(3, t, 4, generator=torch.Generator().manual_seed(0))


def refused(model: nn.Module, call, match: str, error: type = autogrow.AutogrowError) -> None:
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(before, model)


def test_width_read_in_arithmetic_is_refused():
    x = torch.randn(5, 4)
    for kw in ({}, {"example_inputs": x}):
        refused(WidthScaled(), lambda m, kw=kw: autogrow.widen(m, "fc1", 9, **kw),
                r"node 'truediv'.*uses a size read from the widened units' axis")


def test_splitting_the_units_into_heads_is_refused():
    x = tokens()
    refused(HeadSplit(), lambda m: autogrow.widen(m, "inp", 10, example_inputs=x),
            r"node 'view'.*the head size would change to 5")
    refused(HeadSplit(), lambda m: autogrow.widen(m, "inp", 10), r"node 'view'.*computed from sizes.*example_inputs",
            NeedsShapes)


def test_fused_qkv_split_by_the_width_is_refused():
    x = tokens()
    refused(FusedSplit(), lambda m: autogrow.widen(m, "emb", 12, example_inputs=x), r"node 'split'.*size read")


def test_sizes_that_follow_the_width_are_exact():
    x = tokens()
    model = ViewBack()
    ref = model(x)
    autogrow.widen(model, "fc1", 11, split=0.3, generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    # Without shapes the unpacked sizes' axes are unknown: refused, asking for example inputs.
    refused(ViewBack(), lambda m: autogrow.widen(m, "fc1", 11), "example_inputs", NeedsShapes)


def test_batch_norm_on_tokens_is_refused():
    refused(TokenBN(t=7, c=5), lambda m: autogrow.widen(m, "fc1", 8), r"node 'bn'.*has 7 features.*5")
    x = tokens(t=5)  # T == C: only the recorded rank tells the BatchNorm normalises T
    refused(TokenBN(t=5, c=5), lambda m: autogrow.widen(m, "fc1", 8, example_inputs=x), r"node 'bn'.*normalises axis 1")
    refused(TokenBN(t=5, c=5), lambda m: autogrow.widen(m, "fc1", 8), r"rank of its input is unknown", NeedsShapes)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    refused(net, lambda m: autogrow.deepen(m, "0", batch_norm=True, example_inputs=x),
            r"batch_norm: True is not allowed.*shape \(3, 5, 6\)")
    autogrow.deepen(net, "0", batch_norm=True, example_inputs=torch.randn(3, 4))  # 2-D: fine


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


class TiedBranches(nn.Module):
    """Two branches sharing one weight, joined by an add: the tie is in the same role."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.relu(self.a(x) + self.b(2 * x)))


class TiedElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.out, self.c = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(4, 6)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.relu(self.a(x))) + self.c(x).sum(-1, keepdim=True)


def test_tied_parameters_grow_together_or_are_refused():
    refused(TiedLM(), lambda m: autogrow.widen(m, "emb", 12), r"emb.weight and head.weight are one tied Parameter")
    refused(TiedElsewhere(), lambda m: autogrow.widen(m, "a", 9), r"a.weight is tied to \['c.weight'\]")
    model = TiedBranches()
    x = torch.randn(5, 4)
    ref, n = model(x), autogrow.num_params(model)
    opt = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    opt.step()
    ref = model(x)
    plan = autogrow.plan_widen(model, "a", 10, split=0.4, generator=0, example_inputs=x)
    delta = plan.param_delta
    plan.apply(opt)
    assert model.a.weight is model.b.weight and model.a.weight.shape == (10, 4)
    assert autogrow.num_params(model) == n + delta
    assert max_rel_error(ref, model(x)) <= 1e-9
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


class TiedNormLM(nn.Module):
    """A language model's tied embedding and output layer around a pre-LN residual block; the output layer reads
    the final LayerNorm through a view and a slice (``act``: through an activation too)."""

    def __init__(self, act: bool = False) -> None:
        super().__init__()
        self.emb, self.ln1, self.fc, self.ln_f = nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.LayerNorm(6)
        self.head, self.act = nn.Linear(6, 11, bias=False), act
        self.head.weight = self.emb.weight
        for ln in (self.ln1, self.ln_f):  # not the neutral 1 and 0: the new entries' values are what is tested
            nn.init.uniform_(ln.weight, 0.5, 1.5), nn.init.uniform_(ln.bias, -0.5, 0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.fc(torch.tanh(self.ln1(h)))
        z = self.ln_f(h).view(idx.shape[0], idx.shape[1], -1)[:, 1:]
        return self.head(torch.tanh(z) if self.act else z)


def test_a_tied_embedding_and_output_layer_widen_through_the_final_norm():
    """d_model grows through a tied embedding/output layer (GPT-2's wte and lm_head): the final LayerNorm's new
    entries start at zero, so the output layer's new columns may be the embedding's and the tie is kept. Exact; the
    new units learn from the first step (the norm's new scale has a gradient); the optimizer holds the one tensor."""
    torch.manual_seed(0)
    model, idx = TiedNormLM(), torch.randint(0, 11, (4, 5))
    opt = torch.optim.Adam(model.parameters())
    model(idx).sum().backward()
    opt.step()
    ref = model(idx).detach()
    plan = autogrow.plan_widen(model, "emb", 12, init="auto", generator=0, example_inputs=idx)
    assert plan.init == "mix"
    plan.apply(opt)
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (11, 12)
    assert max_rel_error(ref, model(idx)) <= 1e-12
    assert torch.equal(model.ln_f.weight[6:], torch.zeros(6)) and torch.equal(model.ln_f.bias[6:], torch.zeros(6))
    assert torch.equal(model.ln1.weight[6:], torch.ones(6))  # other norms: neutral, as for any mixture
    assert model.emb.weight[:, 6:].abs().min() > 0  # the new columns are mixtures, read by the output layer too
    assert optimizer_holds_model(opt, model)
    assert opt.state[model.emb.weight]["exp_avg"].shape == (11, 12)
    opt.zero_grad()
    model(idx).sum().backward()
    assert model.ln_f.weight.grad[6:].abs().min() > 0
    opt.step()


class OnePlusRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``, the weight starting at 0; an entry is dark at weight -1."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class UndeclaredOnePlusRMSNorm(OnePlusRMSNorm):
    """The same norm, registered without saying where it is dark."""


class TiedGemmaLM(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.emb, self.norm1, self.fc, self.norm_f = nn.Embedding(11, 6), norm(6), nn.Linear(6, 6), norm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        for n in (self.norm1, self.norm_f):
            nn.init.uniform_(n.weight, -0.5, 0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.fc(torch.tanh(self.norm1(h)))
        return self.head(self.norm_f(h))


def test_a_norm_dark_at_another_value_darkens_the_tied_reader():
    """Gemma's ``x * (1 + weight)`` norm, registered with its neutral (0) and dark (-1) weights: d_model grows by
    mixtures through the tied embedding and output layer, the final norm's new entries at -1. Registered without its
    dark value, the new entries would start at 0 (not dark): the check catches the change and undoes it."""
    from dataclasses import replace

    from autogrow.registry import _CHANNELWISE, channel_spec, register_channelwise

    rms = channel_spec(nn.RMSNorm(1))
    register_channelwise(OnePlusRMSNorm, replace(rms, tensors={"weight": 0.0}, dark={"weight": -1.0}))
    register_channelwise(UndeclaredOnePlusRMSNorm, replace(rms, tensors={"weight": 0.0}))
    try:
        torch.manual_seed(0)
        idx = torch.randint(0, 11, (4, 5))
        model = TiedGemmaLM(OnePlusRMSNorm).double()
        ref = model(idx)
        autogrow.widen(model, "emb", 12, init="mix", generator=0, example_inputs=idx)
        assert max_rel_error(ref, model(idx)) <= 1e-9 and model.head.weight is model.emb.weight
        assert torch.equal(model.norm_f.weight[6:], -torch.ones(6, dtype=torch.float64))
        assert torch.equal(model.norm1.weight[6:], torch.zeros(6, dtype=torch.float64))  # elsewhere: neutral
        refused(TiedGemmaLM(UndeclaredOnePlusRMSNorm).double(),
                lambda m: autogrow.widen(m, "emb", 12, init="mix", generator=0, example_inputs=idx),
                r"changed the model's output")
    finally:
        _CHANNELWISE.pop(OnePlusRMSNorm), _CHANNELWISE.pop(UndeclaredOnePlusRMSNorm)


def test_a_tie_the_final_norm_cannot_darken_is_refused():
    """Refused, model and optimizer untouched: copies (the output layer's columns would be split), and an output
    layer that reads the final norm through an activation (only views, indexing and dropout are followed)."""
    idx = torch.randint(0, 11, (4, 5))
    refused(TiedNormLM(), lambda m: autogrow.widen(m, "emb", 12, init="net2wider", example_inputs=idx),
            r"emb.weight and head.weight are one tied Parameter")
    refused(TiedNormLM(act=True), lambda m: autogrow.widen(m, "emb", 12, init="mix", example_inputs=idx),
            r"emb.weight and head.weight are one tied Parameter")


class CatKeywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.cat(tensors=[self.a(x), self.b(x)], dim=-1))


def test_core_argument_forms():
    x = torch.randn(5, 4)
    model = CatKeywords()
    ref = model(x)
    autogrow.widen(model, "a", 6, generator=np.int64(3), split=0.2)  # keyword cat, numpy seed
    assert max_rel_error(ref, model(x)) <= 1e-9
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    refused(net, lambda m: autogrow.deepen(m, "0", residual=True, batch_norm=True), r"batch_norm: True is not allowed")
    refused(net, lambda m: autogrow.deepen(m, "0", kernel_size=3), r"kernel_size: 3 is not allowed.*has no kernel")
    refused(net, lambda m: autogrow.widen(m, "0", 9, generator=2**70), r"generator: .* is not allowed")
    refused(net, lambda m: autogrow.widen(m, "0", 9, noise=float("nan")), r"noise: nan is not allowed")
    compiled = torch.compile(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))
    ref = compiled(x)
    autogrow.widen(compiled, "0", 9, split=0.3, generator=0, example_inputs=x)  # names of the compiled module work
    assert compiled._orig_mod[0].out_features == 9 and max_rel_error(ref, compiled(x)) <= 1e-6


class WidthDependent(nn.Linear):
    """A user layer whose output depends on its own width, registered as if it were a plain Linear."""

    def forward(self, x):
        return super().forward(x) * (6 / self.out_features)


def test_growth_that_changes_the_function_is_caught_and_undone():
    autogrow.register_layer(WidthDependent, autogrow.LayerSpec({"weight": 0, "bias": 0}, {"weight": 1},
                                                               "out_features", "in_features", -1, -1))
    net = nn.Sequential(WidthDependent(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    opt = torch.optim.Adam(net.parameters())
    net(x).sum().backward()
    opt.step()
    before = snapshot(net, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"changed the model.s output by 0\.\d+ \(relative\)"):
        autogrow.widen(net, "0", 9, split=0.3, generator=0, optimizer=opt, example_inputs=x)
    assert_unchanged(before, net, opt)
    autogrow.widen(copy.deepcopy(net), "0", 9, generator=0)  # without example inputs nothing can tell


def test_growth_whose_forward_fails_is_undone():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(x).sum().backward()
    opt.step()
    before = snapshot(net, opt)
    plan = autogrow.plan_widen(net, "0", 9, generator=0, example_inputs=x)
    plan.changes = [c for c in plan.changes if c.module != "2"]  # a wrong plan: the consumer would not follow
    with pytest.raises(autogrow.AutogrowError, match=r"forward raised RuntimeError.*the growth was undone"):
        plan.apply(opt)
    assert_unchanged(before, net, opt)


def test_non_finite_weights_are_refused():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[2].weight[0, 0] = float("inf")
    refused(net, lambda m: autogrow.widen(m, "0", 9), r"parameter '2.weight' holds NaN/inf")


def test_optimizers_that_cannot_follow_are_refused_or_named():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    refused(net, lambda m: autogrow.check_optimizer(torch.optim.Adafactor(m.parameters()), m),
            "Adafactor keeps factored second moments")

    class Mine(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["trace"] = p.detach().clone()
            return super().step(closure)

    opt = Mine(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"Mine keeps state 'trace'.*register_optimizer_state"):
        autogrow.widen(net, "0", 9, optimizer=opt, generator=0)
    asgd_net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    asgd = torch.optim.ASGD(asgd_net.parameters(), lr=0.1, t0=0)
    for _ in range(3):
        asgd.zero_grad()
        asgd_net(torch.randn(8, 4)).pow(2).sum().backward()
        asgd.step()
    ax = asgd.state[asgd_net[2].weight]["ax"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ASGD's average is known: no warning
        g = autogrow.widen(asgd_net, "0", 12, mapping="uniform", optimizer=asgd, generator=0)
    share = g.maps["base"].scale[:6].to(ax.dtype)
    new_ax = asgd.state[asgd_net[2].weight]["ax"]
    assert torch.allclose(new_ax[:, :6], ax * share)  # transformed like the weight itself


def test_replay_needs_no_example_inputs():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    fresh = copy.deepcopy(net)
    x = torch.randn(5, 4)
    records = [autogrow.widen(net, "0", 10, split=0.2, generator=1, example_inputs=x).to_dict(),
               autogrow.deepen(net, "0", batch_norm=True, generator=2, example_inputs=x).to_dict()]
    autogrow.replay(fresh, records)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    assert F.mse_loss(net.eval()(x), fresh.eval()(x)) == 0
