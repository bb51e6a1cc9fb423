"""Norms and scales over another axis than the widened units' pass the units through, each unit on its own: a per-head
norm over the head size (Qwen3, Gemma 3, OLMoE's ``q_norm``/``k_norm``), a LayerNorm over a conv's length, a PReLU
per channel on a tensor whose units are its last axis. Those whose statistics or filters span the units' axis
(BatchNorm, InstanceNorm, GroupNorm, depthwise convs) stay refused. A norm over all heads' features together
(OLMo-2's ``q_norm``/``k_norm`` over the whole projection) grows head by head, under uniform copies of the heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.errors import AutogrowError
from autogrow.registry import ChannelSpec
from tests.models import assert_adam_state_replays, lm_snapshots, lm_steps, max_rel_error, repeat_kv
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


class QKNormLM(nn.Module):
    """Qwen3's attention: 4 query heads over 2 key/value heads of 4, q and k normalised per head over the head size
    (``q_norm(q_proj(x).view(B, T, -1, head_dim))``), repeated by ``repeat_kv``; a residual stream and a head.
    ``whole``: OLMo-2's, q and k normalised over the whole projection (all heads' features together) before the heads
    are split off."""

    def __init__(self, norm: type[nn.Module] = nn.RMSNorm, d: int = 8, head_size: int = 4, whole: bool = False) -> None:
        super().__init__()
        self.tok, self.head = nn.Embedding(11, d), nn.Linear(d, 11)
        self.q, self.k, self.v = nn.Linear(d, 4 * head_size), nn.Linear(d, 2 * head_size), nn.Linear(d, 2 * head_size)
        self.o = nn.Linear(4 * head_size, d)
        self.q_norm, self.k_norm = (norm(4 * head_size), norm(2 * head_size)) if whole else (norm(head_size),
                                                                                             norm(head_size))
        self.head_size, self.n_rep, self.whole = head_size, 2, whole

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(B, T, -1, self.head_size) for y in (q, k, v))
        if not self.whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(y.transpose(1, 2).reshape(B, T, -1)))


def trained(norm: type[nn.Module], whole: bool = False) -> tuple[QKNormLM, torch.Tensor]:
    torch.manual_seed(0)
    model, ids = QKNormLM(norm, whole=whole), torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    lm_steps(model, torch.optim.Adam(model.parameters(), lr=1e-2), ids, 2)  # norms no longer at their init
    return model, ids


@pytest.mark.parametrize("norm", [nn.RMSNorm, nn.LayerNorm])
@pytest.mark.parametrize("target, width", [("q", 32), ("k", 16), ("v", 16)])
def test_per_head_norms_pass_the_heads_through(norm, target, width):
    """Widening q, k or v grows whole key/value groups through the per-head norms, exactly; the norms keep their
    head-size entries (nothing of theirs grows)."""
    model, ids = trained(norm)
    ref, norm_weights = model(ids), [m.weight.detach().clone() for m in (model.q_norm, model.k_norm)]
    plan = autogrow.plan_widen(model, target, width, split=0.3, generator=1, example_inputs=ids)
    assert plan.channelwise == []  # the per-head norms do not grow
    plan.apply()
    assert max_rel_error(ref, model(ids)) <= 1e-9
    assert (model.q.out_features, model.k.out_features, model.v.out_features, model.o.in_features) == (32, 16, 16, 32)
    assert all(torch.equal(m.weight, w) for m, w in zip((model.q_norm, model.k_norm), norm_weights))


def test_adam_state_is_carried_through_per_head_norms():
    model, ids = trained(nn.RMSNorm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    snaps = lm_snapshots(model, opt, batches)
    g = autogrow.widen(model, "k", 16, split=0.3, generator=2, optimizer=opt, example_inputs=ids)
    assert_adam_state_replays(model, opt, snaps, batches, [g], lr=1e-2)


class ChannelsBy(nn.Module):
    """A conv's channels (the units) on axis 1 of (B, C, L), then a layer over another axis: ``after``."""

    def __init__(self, after: nn.Module) -> None:
        super().__init__()
        self.conv, self.after, self.out = nn.Conv1d(2, 4, 3, padding=1), after, nn.Conv1d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.after(self.conv(x))))


def test_a_norm_over_the_length_passes_conv_channels_and_refuses_mixtures():
    """LayerNorm over L treats each channel on its own: copies and fresh channels are exact. Mixtures of the old
    channels would be normalised as a whole row, not mixed after the norm: refused, naming the norm."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 6)
    for init in ("net2wider", "zero_out"):
        net = ChannelsBy(nn.LayerNorm(6))
        ref = net(x)
        autogrow.widen(net, "conv", 7, init=init, split=0.3, generator=0, example_inputs=x)
        assert max_rel_error(ref, net(x)) <= 1e-9 and net.after.normalized_shape == (6,)
    net = ChannelsBy(nn.LayerNorm(6))
    before = snapshot(net)
    with pytest.raises(AutogrowError, match=r"init.*'after'.*normalises or scales each unit on its own"):
        autogrow.widen(net, "conv", 8, init="mix", generator=0, example_inputs=x)
    assert_unchanged(before, net)


class LengthBy(nn.Module):
    """A Linear over the last axis of (B, C, L) (its L outputs are the units), then a layer acting on axis 1."""

    def __init__(self, after: nn.Module) -> None:
        super().__init__()
        self.fc, self.after, self.out = nn.Linear(6, 5), after, nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.after(self.fc(x)))


def test_prelu_per_channel_passes_units_on_another_axis():
    torch.manual_seed(0)
    x, net = torch.randn(4, 3, 6), LengthBy(nn.PReLU(3, init=0.1))
    ref = net(x)
    autogrow.widen(net, "fc", 9, split=0.3, generator=0, example_inputs=x)
    assert max_rel_error(ref, net(x)) <= 1e-9 and net.after.num_parameters == 3


def test_batchnorm_over_channels_still_refuses_units_on_its_statistics_axes():
    """BatchNorm1d's statistics span the length axis, where the widened units sit: refused, nothing changed (also
    when it has as many channels as there are units)."""
    torch.manual_seed(0)
    for channels, match in ((3, r"'after'.*has 3 features, but the widened tensor has 5"),
                            (5, r"'after'.*normalises axis 1 .*but the widened units are on axis -1 of 3")):
        x, net = torch.randn(4, channels, 6), LengthBy(nn.BatchNorm1d(channels))
        net(x)  # running statistics of its own
        before = snapshot(net)
        with pytest.raises(AutogrowError, match=match):
            autogrow.widen(net, "fc", 9, generator=0, example_inputs=x)
        assert_unchanged(before, net)


@pytest.mark.parametrize("norm", [nn.RMSNorm, nn.LayerNorm])
@pytest.mark.parametrize("target, width", [("q", 32), ("k", 16), ("v", 16), ("q", 48)])
def test_a_norm_over_all_heads_grows_by_uniform_copies_of_whole_heads(norm, target, width):
    """Every key/value group copied equally often keeps each token's mean and mean square over the projection, so
    the norm over all heads' features grows with its entries copied head by head; exact, the Adam state replayed."""
    model, ids = trained(norm, whole=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    snaps = lm_snapshots(model, opt, batches)
    ref, q_norm = model(ids), model.q_norm.weight.detach().clone()
    g = autogrow.widen(model, target, width, generator=1, optimizer=opt, example_inputs=ids)
    assert max_rel_error(ref, model(ids)) <= 1e-9
    groups = width // {"q": 16, "k": 8, "v": 8}[target]  # key/value heads, each with its 2 query heads of 4
    assert (model.q.out_features, model.k.out_features, model.q_norm.weight.numel()) == (16 * groups, 8 * groups,
                                                                                       16 * groups)
    assert torch.equal(model.q_norm.weight[:16], q_norm) and torch.equal(model.q_norm.weight[16:32], q_norm)
    if norm is nn.RMSNorm:  # (k_norm's LayerNorm bias gets no gradient: a shift of every key changes no softmax)
        assert_adam_state_replays(model, opt, snaps, batches, [g], lr=1e-2)


def test_a_norm_over_all_heads_refuses_unramped_fresh_heads_uneven_copies_and_shrinking_untouched():
    model, ids = trained(nn.RMSNorm, whole=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = snapshot(model, opt)
    with pytest.raises(AutogrowError, match=r"'zero_out' is not allowed .* \['q_norm', 'k_norm'\]|'zero_out' is not "
                       r"allowed .* \['k_norm', 'q_norm'\]"):
        autogrow.widen(model, "k", 16, init="zero_out", optimizer=opt, example_inputs=ids)
    with pytest.raises(AutogrowError, match=r"copied equally often: use mapping='uniform' .* a multiple of 2"):
        autogrow.widen(model, "k", 12, optimizer=opt, example_inputs=ids)  # 2 -> 3 groups: one copied, one not
    with pytest.raises(AutogrowError, match=r"cannot shrink 'k': \[.*_norm.*\] act on the features of all its heads "
                       r"together"):
        autogrow.shrink(model, "k", 4, mode="prune", optimizer=opt, example_inputs=ids)
    assert_unchanged(before, model, opt)


class FeatureScale(nn.Module):
    """``x * weight``, one weight per feature of the last axis: channel-wise, no statistics across the features."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _resize_scale(m: nn.Module, n: int) -> None:
    pass  # the weight's new length is the whole of its size


autogrow.register_channelwise(FeatureScale, ChannelSpec({"weight": 1.0}, _resize_scale, dims=(-1,)))


class WholeProjectionScale(QKNormLM):
    """A per-feature scale over all of k's heads' features (no statistics across them), no norm on q."""

    def __init__(self) -> None:
        super().__init__(whole=True)
        self.q_norm, self.k_norm = nn.Identity(), FeatureScale(8)


def test_a_per_feature_scale_over_all_heads_grows_head_by_head_even_with_fresh_heads():
    torch.manual_seed(0)
    model, ids = WholeProjectionScale(), torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    ref, scales = model(ids), model.k_norm.weight.detach().clone()
    autogrow.widen(model, "k", 16, init="zero_out", generator=1, example_inputs=ids)
    assert max_rel_error(ref, model(ids)) <= 1e-9
    assert model.k_norm.weight.numel() == 16 and torch.equal(model.k_norm.weight[:8], scales)
    assert torch.equal(model.k_norm.weight[8:], torch.ones(8))  # fresh heads' entries neutral


@pytest.mark.parametrize("norm", [nn.RMSNorm, nn.LayerNorm])
@pytest.mark.parametrize("target, width", [("q", 32), ("k", 16), ("v", 16)])
def test_fresh_heads_ramp_in_through_a_norm_over_all_heads(norm, target, width):
    """``init="auto"`` with a ramp: fresh heads whose features the norm over the whole projection weighs by 0 at
    first (their features come last), exactly, rising to 1; then the norm is plain again."""
    from autogrow.ramp import advance_ramps, is_ramped

    model, ids = trained(norm, whole=True)
    ref = model(ids)
    g = autogrow.widen(model, target, width, init="auto", ramp_steps=2, generator=1, example_inputs=ids)
    assert g.options["init"] == "ramp" and max_rel_error(ref, model(ids)) <= 1e-9
    assert is_ramped(model.q_norm) and is_ramped(model.k_norm) and model.q_norm.weight.numel() == 32
    grown = model(ids)
    advance_ramps(model, 0), advance_ramps(model, 1)
    assert max_rel_error(grown, model(ids)) > 1e-6  # half-way: the fresh heads count
    advance_ramps(model, 2)
    assert type(model.q_norm) is norm and type(model.k_norm) is norm


def test_the_callback_ramps_fresh_heads_into_olmo2_in_a_real_fit(tmp_path):
    """transformers' OLMo-2 (``Olmo2RMSNorm`` registered) in a real fit: the callback's defaults grow its heads from
    ``q_proj`` by fresh heads that ``q_norm``/``k_norm`` ramp in, d_model likewise and the MLPs by fresh units; exact,
    the norms plain again after the ramp, and a checkpoint replays it all."""
    pytest.importorskip("transformers")
    from autogrow.experiments import zoo

    from autogrow.checkpoint import history_of
    from tests.test_transformers import TinyLM, fit_one_growth, reloaded

    def olmo2() -> nn.Module:
        return zoo.Logits(zoo._olmo2())

    with pytest.warns(UserWarning, match="traced what its forward ran"):
        model, grow, trainer, seq = fit_one_growth(lambda: TinyLM(arch=olmo2), vocab=zoo.VOCAB)
    (event,) = grow.events
    inits = {h["target"].removeprefix("net.model.model."): h["options"]["init"] for h in history_of(model)}
    assert inits == {"embed_tokens": "ramp", "layers.0.self_attn.q_proj": "ramp", "layers.1.self_attn.q_proj": "ramp",
                     "layers.0.mlp.gate_proj": "zero_out", "layers.1.mlp.gate_proj": "zero_out"}
    assert event.preservation_error < 1e-5
    attn = model.net.model.model.layers[1].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.q_norm.weight.numel()) == (64, 32, 64)
    assert type(attn.q_norm).__name__ == "Olmo2RMSNorm"  # the ramp has ended
    reloaded(trainer, model, seq, tmp_path, arch=olmo2)
