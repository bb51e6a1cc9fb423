"""Function preservation of widen/deepen on generated and hand-built architectures."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autogrow
from tests.models import CatNet, TinyResNet, TinyTransformer, conv_nd, max_rel_error

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "leaky": nn.LeakyReLU}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def mlp(widths: list[int], act: str, bn: bool, dropout: bool, bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 2):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if bn:
            layers.append(nn.BatchNorm1d(widths[i + 1]))
        layers.append(ACTS[act]())
        if dropout:
            layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def cnn(chans: list[int], act: str, bn: bool, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = 8
    for i in range(len(chans) - 1):
        layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(chans[i + 1]))
        layers.append(ACTS[act]())
        if pool:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.Flatten(), nn.Linear(chans[-1] * size * size, 5), nn.ReLU(), nn.Linear(5, 3)]
    return nn.Sequential(*layers)


def hidden_layers(model: nn.Module) -> list[str]:
    """Weighted layers except the output layer (the last registered one)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names[:-1]


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so copying them wrongly shows."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))


def grow_and_check(model: nn.Module, x: torch.Tensor, ops: list[tuple[str, int, int]], dtype: torch.dtype,
                   train: bool, seed: int) -> None:
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model, gen)
    x = x.to(dtype)
    model.train(train)
    for m in model.modules():  # train mode: compare with dropout off
        if isinstance(m, nn.Dropout) and train:
            m.p = 0.0
    with torch.no_grad():
        ref = model(x)
    for kind, pick, extra in ops:
        names = hidden_layers(model)
        target = names[pick % len(names)]
        if kind == "widen":
            m = model.get_submodule(target)
            n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            autogrow.widen(model, target, n + extra, split=0.3 if extra % 2 else 0.0, generator=seed + pick,
                           example_inputs=x)
        else:  # residual=None: the exact residual form where the activation is not idempotent
            autogrow.deepen(model, target, residual=None, generator=seed, example_inputs=x)
        with torch.no_grad():
            out = model(x)
        err = max_rel_error(ref, out)
        assert err <= TOL[dtype], f"{kind} {target}: relative error {err:.3g}"


op_strategy = st.lists(st.tuples(st.sampled_from(["widen", "deepen"]), st.integers(0, 9), st.integers(1, 6)),
                       min_size=1, max_size=10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(1, 8), min_size=3, max_size=5), act=st.sampled_from(list(ACTS)),
       bn=st.booleans(), dropout=st.booleans(), bias=st.booleans(), ops=op_strategy,
       dtype=st.sampled_from([torch.float32, torch.float64]), train=st.booleans(), seed=st.integers(0, 2**20))
def test_random_mlps_keep_their_function(widths, act, bn, dropout, bias, ops, dtype, train, seed):
    torch.manual_seed(seed)  # only for building the model; surgery itself never touches the global RNG
    model = mlp(widths, act, bn, dropout, bias)
    x = torch.randn(16, widths[0], generator=torch.Generator().manual_seed(seed))
    grow_and_check(model, x, ops, dtype, train, seed)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chans=st.lists(st.integers(1, 5), min_size=2, max_size=4), act=st.sampled_from(list(ACTS)),
       bn=st.booleans(), pool=st.booleans(), ops=op_strategy,
       dtype=st.sampled_from([torch.float32, torch.float64]), train=st.booleans(), seed=st.integers(0, 2**20))
def test_random_cnns_keep_their_function(chans, act, bn, pool, ops, dtype, train, seed):
    torch.manual_seed(seed)
    chans = chans[:3] if pool else chans
    model = cnn(chans, act, bn, pool)
    x = torch.randn(4, chans[0], 8, 8, generator=torch.Generator().manual_seed(seed))
    grow_and_check(model, x, ops, dtype, train, seed)


def check_preserved(model: nn.Module, x: torch.Tensor, fn, tol: float = 1e-5) -> None:
    randomize_bn(model, torch.Generator().manual_seed(1))
    for train in (False, True):
        m = copy.deepcopy(model).train(train)
        with torch.no_grad():
            ref = m(x)
        fn(m)
        with torch.no_grad():
            assert max_rel_error(ref, m(x)) <= tol


def test_resnet_residual_stream_grows_together():
    torch.manual_seed(0)
    model = TinyResNet(c=4)
    x = torch.randn(3, 3, 6, 6)
    plan = autogrow.plan_widen(model, "stem", 7, generator=0)
    # The stem's output is added to both blocks' conv2 outputs: all of them grow with one mapping.
    assert set(plan.producers) == {"stem", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(plan.channelwise) == {"bn", "layer1.0.bn2", "layer1.1.bn2"}
    assert set(plan.consumers) == {"layer1.0.conv1", "layer1.1.conv1", "fc"}
    assert "stem.weight" in str(plan)
    check_preserved(model, x, lambda m: autogrow.widen(m, "stem", 7, generator=0))
    check_preserved(model, x, lambda m: autogrow.widen(m, "layer1.1.conv1", 9, generator=0))
    check_preserved(model, x, lambda m: autogrow.deepen(m, "layer1.0.conv1", generator=0))


def test_concatenation_offsets():
    torch.manual_seed(0)
    model = CatNet()
    x = torch.randn(3, 2, 8, 8)
    check_preserved(model, x, lambda m: autogrow.widen(m, "a", 6, generator=0))
    check_preserved(model, x, lambda m: autogrow.widen(m, "b", 7, split=0.4, generator=0))
    check_preserved(model, x, lambda m: autogrow.widen(m, "c", 9, generator=0))  # view(x.size(0), -1) -> fc


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_nd_flatten_and_bias(nd, bias):
    torch.manual_seed(nd)
    model = conv_nd(nd, bias)
    x = torch.randn(2, 2, *([4] * nd))
    check_preserved(model, x, lambda m: autogrow.widen(m, "0", 5, generator=0))
    check_preserved(model, x, lambda m: autogrow.widen(m, "3", 6, generator=0))  # conv -> flatten -> linear
    check_preserved(model, x, lambda m: autogrow.deepen(m, "0", generator=0))
    check_preserved(model, x, lambda m: autogrow.deepen(m, "3", generator=0, kernel_size=3))


def test_transformer_block():
    torch.manual_seed(0)
    model = TinyTransformer(d=6, hidden=10)
    idx = torch.randint(0, 11, (4, 5))
    check_preserved(model, idx, lambda m: autogrow.widen(m, "blocks.0.fc1", 13, generator=0))
    # The residual stream: embedding, both fc2s and the LayerNorms grow; x2 keeps LayerNorm exact.
    plan = autogrow.plan_widen(model, "emb", 12, generator=0)
    assert set(plan.producers) == {"emb", "blocks.0.fc2", "blocks.1.fc2"}
    assert set(plan.channelwise) == {"blocks.0.ln", "blocks.1.ln", "ln_f"} and plan.mapping == "uniform"
    check_preserved(model, idx, lambda m: autogrow.widen(m, "emb", 12, generator=0))
    check_preserved(model, idx, lambda m: autogrow.widen(m, "emb", 18, split=0.0, generator=0))
    with pytest.raises(autogrow.AutogrowError, match="multiple of 6"):
        autogrow.plan_widen(model, "emb", 8)
    with pytest.raises(autogrow.AutogrowError, match="not idempotent"):
        autogrow.plan_deepen(model, "blocks.0.fc1")
    check_preserved(model, idx, lambda m: autogrow.deepen(m, "blocks.0.fc1", residual=True, generator=0))


def test_deepen_batch_norm_is_identity_in_eval():
    torch.manual_seed(0)
    model = cnn([2, 3, 4], "relu", bn=True, pool=True).eval()
    x = torch.randn(3, 2, 8, 8)
    ref = model(x)
    autogrow.deepen(model, "0", batch_norm=True, generator=0)
    autogrow.deepen(model, "4", batch_norm=True, generator=0)
    assert max_rel_error(ref, model(x)) <= 1e-6
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4


def test_functional_activation_and_view():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.fc1 = nn.Linear(3 * 16, 6)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            h = h.view(h.size(0), -1)
            return self.fc2(nn.functional.relu(self.fc1(h)))

    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4)
    check_preserved(Net(), x, lambda m: autogrow.widen(m, "conv", 5, generator=0))
    check_preserved(Net(), x, lambda m: autogrow.deepen(m, "fc1", generator=0))
    net = Net()
    g = autogrow.deepen(net, "fc1", generator=0)
    assert g.renames == {"fc1.weight": "fc1.0.weight", "fc1.bias": "fc1.0.bias"}  # functional relu: wrap fc1


class TanhGELU(nn.Module):
    """GPT-2's ``gelu_new``: ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x ** 3)))``, written with both pows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.fc2(h + 0.1 * h ** 2)


@pytest.mark.parametrize("init", ["net2wider", "zero_out"])
def test_powers_of_the_widened_units_stay_exact(init):
    torch.manual_seed(0)
    check_preserved(TanhGELU(), torch.randn(5, 4), lambda m: autogrow.widen(m, "fc1", 11, init=init, split=0.3,
                                                                           generator=0))


def test_random_init_changes_the_function():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    for grow in (lambda m: autogrow.widen(m, "0", 10, init="random", generator=0),
                 lambda m: autogrow.deepen(m, "0", init="random", generator=0)):
        model = mlp([4, 6, 3], "relu", False, False, True)
        ref = model(x)
        grow(model)
        assert max_rel_error(ref, model(x)) > 1e-2


def test_noise_is_inexact_and_split_is_exact():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    model = mlp([4, 6, 3], "relu", False, False, True)
    ref = model(x)
    m1 = copy.deepcopy(model)
    g = autogrow.widen(m1, "0", 12, split=0.5, generator=0)
    assert max_rel_error(ref, m1(x)) <= 1e-6
    um = g.maps["base"]
    even = 1.0 / torch.bincount(um.idx).double()[um.idx]
    assert (um.scale - even).abs().max() > 0.05  # the shares really differ from an even split
    m2 = copy.deepcopy(model)
    autogrow.widen(m2, "0", 12, noise=0.05, generator=0)
    assert 1e-6 < max_rel_error(ref, m2(x)) < 0.2


def test_dtype_device_requires_grad_and_no_global_rng():
    model = mlp([4, 6, 3], "relu", True, False, True).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    autogrow.widen(model, "0", 9, init="random", noise=0.1, generator=0, example_inputs=x)
    autogrow.deepen(model, "0", init="random", batch_norm=True, example_inputs=x)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not model[0].weight.requires_grad and model[0].weight.shape == (9, 4)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(b.dtype == torch.float64 for n, b in model.named_buffers() if "num_batches" not in n)


def test_replay_gives_identical_shapes_and_weights():
    torch.manual_seed(0)
    model = TinyResNet(c=4)
    fresh = copy.deepcopy(model)
    records = [
        autogrow.widen(model, "stem", 6, split=0.2, generator=1),
        autogrow.deepen(model, "layer1.0.conv1", generator=2),
        autogrow.widen(model, "layer1.1.conv1", 9, noise=0.1, generator=3),
        autogrow.widen(model, "layer1.0.conv1", 8, init="random"),
        autogrow.deepen(model, "layer1.1.conv1", init="random", batch_norm=True),
    ]
    as_json = json.loads(json.dumps([g.to_dict() for g in records]))
    autogrow.replay(fresh, as_json)
    a, b = model.state_dict(), fresh.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(autogrow.AutogrowError, match="does not fit"):
        autogrow.replay(TinyResNet(c=5), as_json[:1])


class Scale(nn.Module):
    """A user layer with one learned scale per feature."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.gain = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.gain


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class MaskedLinear(nn.Linear):
    """A subclass of a registered type: handled through isinstance, no registration needed."""


def test_user_registered_layers():
    autogrow.register_channelwise(Scale, autogrow.ChannelSpec({"gain": 1.0}, lambda m, n: setattr(m, "n", n),
                                                              dims=(-1,)))
    autogrow.register_elementwise(Swish)
    torch.manual_seed(0)
    net = nn.Sequential(MaskedLinear(4, 6), Scale(6), Swish(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    ref = net(x)
    plan = autogrow.plan_widen(net, "0", 10, split=0.3, generator=0)
    assert plan.channelwise == ["1"] and plan.consumers == ["3"]
    plan.apply()
    assert net[1].gain.shape == (10,) and net[1].n == 10
    assert max_rel_error(ref, net(x)) <= 1e-6
    with pytest.raises(autogrow.AutogrowError, match="not idempotent"):
        autogrow.plan_deepen(net, "0")  # Scale is skipped like a norm; Swish is no ReLU
    autogrow.deepen(net, "0", residual=True, generator=0)
    assert max_rel_error(ref, net(x)) <= 1e-6


@pytest.mark.parametrize("kw", [{}, {"residual": True}, {"batch_norm": True}, {"kernel_size": 5}])
def test_param_delta_is_what_apply_adds(kw):
    for net, after in ((nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "0"),
                       (nn.Sequential(nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2)), "0")):
        if "kernel_size" in kw and isinstance(net[0], nn.Linear):
            continue
        x = torch.randn(2, 4) if isinstance(net[0], nn.Linear) else torch.randn(2, 3, 4, 4)
        for plan in (autogrow.plan_deepen(net, after, example_inputs=x, **kw), autogrow.plan_widen(net, after, 11)):
            before = sum(p.numel() for p in net.parameters())
            delta = plan.param_delta
            plan.apply()
            assert sum(p.numel() for p in net.parameters()) - before == delta


def test_a_width_one_residual_branch_grows_with_its_stream():
    """With one unit, a size-1 tensor is not a broadcast: the residual branch must grow with the stream."""
    torch.manual_seed(0)
    model = mlp([1, 1, 1], "tanh", False, False, False)
    x = torch.randn(16, 1)
    autogrow.deepen(model, "0", residual=None, generator=0, example_inputs=x)
    autogrow.widen(model, "0", 2, generator=0, example_inputs=x)
    assert model[1][1].body[2].out_features == 2
    autogrow.widen(model, "1.1.body.2", 3, generator=0, example_inputs=x)  # the stream stays one group
    assert model[0].out_features == 3
