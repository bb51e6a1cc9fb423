"""Fused projections: one layer whose output is split into equal parts (q, k and v; SwiGLU's gate and up) grows
every part alike, by whole heads; a split into parts of fixed size is refused, naming it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from tests.models import assert_adam_state_replays, lm_snapshots, lm_steps, max_rel_error
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64

SPLITS = ("chunk", "split_by_size", "reshape_unbind", "reshape_index")


class FusedBlock(nn.Module):
    """A pre-LN transformer block whose attention reads q, k and v from one ``qkv`` layer (as GPT-2 and timm do),
    and whose MLP is a fused SwiGLU (``gate_up`` holds both halves)."""

    def __init__(self, d: int = 8, heads: int = 2, head_size: int = 4, hidden: int = 6, how: str = "chunk") -> None:
        super().__init__()
        self.how, self.head_size = how, head_size
        self.ln1, self.qkv = nn.LayerNorm(d), nn.Linear(d, 3 * heads * head_size)
        self.o = nn.Linear(heads * head_size, d)
        self.ln2, self.gate_up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * hidden), nn.Linear(hidden, d)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.qkv(self.ln1(x))
        if self.how.startswith("reshape"):  # timm: (B, T, 3, heads, size) -> (3, B, heads, T, size)
            qkv = h.reshape(B, T, 3, -1, self.head_size).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0) if self.how == "reshape_unbind" else (qkv[0], qkv[1], qkv[2])
        else:
            q, k, v = h.chunk(3, dim=-1) if self.how == "chunk" else h.split(h.size(-1) // 3, dim=2)
            q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        gate, up = self.gate_up(self.ln2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class FusedLM(nn.Module):
    def __init__(self, how: str = "chunk") -> None:
        super().__init__()
        self.tok, self.block, self.head = nn.Embedding(11, 8), FusedBlock(how=how), nn.Linear(8, 11)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.tok(idx)))


def ids() -> torch.Tensor:
    return torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))


def trained(how: str = "chunk") -> tuple[FusedLM, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model, x = FusedLM(how), ids()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lm_steps(model, opt, x, 2)
    return model, opt, x


@pytest.mark.parametrize("init", ["auto", "net2wider", "zero_out"])
@pytest.mark.parametrize("how", SPLITS)
def test_a_fused_qkv_grows_whole_heads_in_every_part(how, init):
    model, opt, x = trained(how)
    ref = model(x)
    g = autogrow.widen(model, "block.qkv", 36, init=init, split=0.3, generator=1, optimizer=opt, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    assert model.block.qkv.out_features == 36 and model.block.o.in_features == 12  # 2 -> 3 heads in q, k and v
    assert g.maps["base"].idx.tolist()[:2] == [0, 1] and len(g.maps["base"].idx) == 3  # mapped by heads
    w = model.block.qkv.weight.detach().view(3, 3, 4, 8)  # (part, head, row, in)
    if init == "net2wider":  # the new head copies the same old head in q, k and v
        src = g.maps["base"].idx[2]
        for part in range(3):
            assert torch.equal(w[part, 2], w[part, src])
    lm_steps(model, opt, x)
    assert torch.isfinite(model(x)).all()


def test_a_fused_gate_up_projection_grows_both_halves():
    model, opt, x = trained()
    ref = model(x)
    autogrow.widen(model, "block.gate_up", 20, generator=2, optimizer=opt, example_inputs=x)  # hidden 6 -> 10
    assert max_rel_error(ref, model(x)) <= 1e-9
    assert model.block.gate_up.out_features == 20 and model.block.down.in_features == 10


def test_d_model_grows_through_fused_layers():
    model, opt, x = trained()
    ref = model(x)
    g = autogrow.widen(model, "tok", 16, init="auto", generator=3, optimizer=opt, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    assert g.options["init"] == "mix" and model.block.qkv.in_features == 16 and model.block.gate_up.in_features == 16


def test_fused_state_equals_the_grown_models_own_gradient_history():
    """Adam's moments, carried through a fused widening with uneven splits, equal those the grown model's own
    gradients build from the start (the gradient-replay check of tests/test_optim.py)."""
    torch.manual_seed(0)
    net, x = FusedLM(), ids()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    snaps = lm_snapshots(net, opt, [x] * 3)
    growths = [autogrow.widen(net, "block.qkv", 36, init="net2wider", split=0.4, generator=5, optimizer=opt,
                              example_inputs=x)]
    assert_adam_state_replays(net, opt, snaps, [x] * 3, growths, lr=1e-2)


class ConstantSplit(nn.Module):
    """GPT-2's ``c_attn(x).split(self.split_size, dim=2)``: the part size is a number in the code."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.o = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(8, dim=2)
        q, k, v = (t.view(B, T, -1, 4).transpose(1, 2) for t in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))


def test_parts_of_fixed_size_and_partial_heads_are_refused_untouched():
    model = ConstantSplit()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(2, 5, 8)
    F.mse_loss(model(x), x).backward()
    opt.step()
    before = snapshot(model, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"'split'.*parts of fixed size 8.*h\.chunk\(3, dim=-1\)"):
        autogrow.widen(model, "c_attn", 48, optimizer=opt, example_inputs=x)
    with pytest.raises(autogrow.AutogrowError, match=r"'split'.*widening to 28 they would be 8, not equal parts"):
        autogrow.widen(model, "c_attn", 28, optimizer=opt, example_inputs=x)  # found by the fuzzer
    assert_unchanged(before, model, opt)
    fused, _, ids_ = trained()
    with pytest.raises(autogrow.AutogrowError, match=r"width: 31 .*a multiple of 12 \(3 equal parts of whole heads "
                       r"of 4\)"):  # the whole rule at once, not only the parts
        autogrow.widen(fused, "block.qkv", 31, example_inputs=ids_)
    with pytest.raises(autogrow.AutogrowError, match=r"heads of 4: the new width 10 .*one of the 3 equal parts"):
        autogrow.widen(fused, "block.qkv", 30, example_inputs=ids_)
    with pytest.raises(autogrow.AutogrowError, match=r"more than .* 24 units and a multiple of 12 \(3 equal parts "
                       r"of whole heads of 4\)"):
        autogrow.widen(fused, "block.qkv", 12, example_inputs=ids_)


def test_a_fused_growth_replays_from_its_json_record():
    model, _, x = trained()
    g = autogrow.widen(model, "block.qkv", 48, init="net2wider", split=0.3, generator=4, example_inputs=x)
    fresh, _, _ = trained()
    autogrow.replay(fresh, [autogrow.Growth.from_dict(json.loads(json.dumps(g.to_dict())))])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


class Squeezed(nn.Module):
    """Two layers joined after ``unsqueeze`` (the walk follows the second back through it), then ``squeeze``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c((self.a(x).unsqueeze(1) + self.b(x).unsqueeze(1)).squeeze(1))


def test_unsqueeze_is_followed_backwards_and_squeeze_forwards():
    model, x = Squeezed(), torch.randn(3, 4)
    ref = model(x)
    autogrow.widen(model, "a", 9, generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9 and model.b.out_features == 9 and model.c.in_features == 9


def test_a_copied_head_of_a_fused_qkv_merges_back_exactly():
    model, _, x = trained()
    autogrow.widen(model, "block.qkv", 48, init="net2wider", generator=0, example_inputs=x)  # 2 -> 4 heads: copies
    ref = model(x)
    autogrow.shrink(model, "block.qkv", 36, mode="merge", example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    assert model.block.qkv.out_features == 36 and model.block.o.in_features == 12


def test_the_callback_grows_a_fused_model_and_its_checkpoint_loads(tmp_path):
    """A real fit: the default Widen() finds the fused qkv and gate_up (and d_model) on its own; every event is
    exact, and ``load_grown`` rebuilds the grown model from the checkpoint."""

    from tests.test_transformers import TinyLM, fit_one_growth, reloaded

    model, grow, trainer, seq = fit_one_growth(lambda: TinyLM(arch=FusedLM), length=7)
    block = model.net.block
    assert block.qkv.out_features == 48 and block.o.in_features == 16 and block.gate_up.out_features == 24
    assert all(e.preservation_error < 1e-5 for e in grow.events)
    reloaded(trainer, model, seq, tmp_path, arch=FusedLM)


class SplitTwice(nn.Module):
    """``q, kv = h.chunk(2, -1); k, v = kv.chunk(2, -1)``: parts of unequal size, by splitting a part again."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, kv = self.fc(x).chunk(2, dim=-1)
        k, v = kv.chunk(2, dim=-1)
        return self.out(torch.cat([q.tanh(), k, v], dim=-1))


def test_a_part_split_again_is_refused_untouched():
    model, x = SplitTwice(), torch.randn(3, 4)
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=r"'fc'.*split into 2 parts, and a part again into 2"):
        autogrow.widen(model, "fc", 32, example_inputs=x)
    assert_unchanged(before, model)


def test_the_widen_action_rounds_to_whole_heads_in_every_part():
    """``Widen(factor=1.25)`` on a fused qkv of 2 heads of 4 (24 features) asks for 30: it grows to 36 (3 heads in
    q, k and v); under ``max_width=30`` it cannot add a head and the plan refuses, naming the multiple."""
    from autogrow.actions import Widen

    model, _, x = trained()
    assert Widen(factor=1.25).plan(model, "block.qkv", seed=0, example_inputs=x).width == 36
    assert Widen(units=1).plan(model, "block.qkv", seed=0, example_inputs=x).width == 36
    assert Widen(factor=1.25).plan(model, "block.gate_up", seed=0, example_inputs=x).width == 16  # 2 parts of 8
    with pytest.raises(autogrow.AutogrowError, match=r"width"):
        Widen(factor=1.25).plan(model, "block.qkv", seed=0, max_width=30, example_inputs=x)
