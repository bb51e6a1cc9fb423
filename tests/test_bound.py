"""Sizes kept in module attributes (autogrow.bound): timm reshapes its fused q/k/v to ``self.num_heads`` heads,
GPT-2 splits it by ``self.split_size``, other code views it as ``(B, T, self.n_head, -1)``. Widening the heads
rewrites the attribute with the tensors, exactly; a shrink writes it back; replaying the growth record rewrites it
on another copy; a growth the attribute makes inexact is undone, the attribute included; a head size is never
rewritten (heads written in the code are refused); tracing leaves plain ints behind."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.bound import BoundSize, bound_sizes
from autogrow.errors import AutogrowError
from tests.models import assert_adam_state_replays, lm_snapshots, lm_steps, max_rel_error
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


class TimmAttention(nn.Module):
    """timm's ``Attention``: the fused q/k/v reshaped to ``(B, N, 3, self.num_heads, self.head_dim)``.
    ``scale_by_heads`` multiplies the output by ``2 / self.num_heads`` as well (a second use of the attribute,
    which a rewrite would change)."""

    def __init__(self, dim: int, heads: int, scale_by_heads: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale_by_heads = heads, dim // heads, scale_by_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, -1)
        return self.proj(o * (2 / self.num_heads) if self.scale_by_heads else o)


class GPT2Attention(nn.Module):
    """transformers' ``GPT2Attention``: the fused q/k/v split by ``self.split_size``, heads of ``self.head_dim``
    counted with -1."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.split_size, self.head_dim = dim, dim // heads
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        shape = (*q.shape[:-1], -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(o.transpose(1, 2).reshape(*x.shape[:-1], -1))


class HeadsFirst(TimmAttention):
    """``view(B, N, 3, self.num_heads, -1)``: the number of heads in an attribute, the head size computed from it:
    the heads grow (the attribute rewritten), the head size stays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


class ComputedHeadSize(nn.Module):
    """minGPT's way: ``view(B, T, self.n_head, C // self.n_head)`` with ``C`` read from the tensor: after the
    growth rewrites ``n_head`` the head size computed from it is the old one again."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.n_head = heads  # no biases on q, k, v: a key bias gets no gradient (softmax ignores it), only noise
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=i == 3) for i in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        C = q.size(-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))


class FalconAttention(nn.Module):
    """transformers' Falcon (new decoder architecture): the fused output viewed as (key/value groups, group + 2,
    head size): each group's query heads, then its key and its value, broadcast to the query heads and flattened
    with them; the heads merged back by ``reshape(B, T, self.num_heads * self.head_dim)``. The group size is
    ``self.num_heads // self.num_kv_heads`` as in Falcon (``kv_from_heads``), or an attribute of its own."""

    def __init__(self, dim: int, heads: int, kv_from_heads: bool = True) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, heads // 2, dim // heads
        self.group, self.kv_from_heads = 2, kv_from_heads
        self.qkv = nn.Linear(dim, self.num_kv_heads * (self.group + 2) * self.head_dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        group = self.num_heads // self.num_kv_heads if self.kv_from_heads else self.group
        qkv = self.qkv(x).view(B, T, -1, group + 2, self.head_dim)
        q = qkv[:, :, :, :-2]
        k, v = (torch.broadcast_to(qkv[:, :, :, [i]], q.shape) for i in (-2, -1))
        q, k, v = (t.flatten(2, 3).transpose(1, 2).reshape(B, self.num_heads, T, self.head_dim) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(0, 2, 1, 3)
        return self.dense(o.reshape(B, T, self.num_heads * self.head_dim))


class LiteralHeads(TimmAttention):
    """``view(B, N, 3, 2, -1)``: 2 heads written in the code: widening would grow the head size (and change the
    softmax scale), so it is refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


class LM(nn.Module):
    """Embedding, one attention block with a residual, output layer."""

    def __init__(self, attention: type[nn.Module], **kw: object) -> None:
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(11, 8), attention(8, 2, **kw), nn.Linear(8, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h + self.attn(h))


@dataclass(frozen=True)
class Case:
    layer: str  # the layer widened: the fused q/k/v, or q (k and v grow with it)
    attr: str  # the attribute the growth rewrites, its value before and after doubling
    before: int
    after: int
    width: int  # doubling the layer
    bad: int  # a width that cuts a head, and the refusal it gets
    why: str
    block: int = 4  # rows per unit: a head of 4, or Falcon's group of 2 query heads, a key and a value


_PARTS = r"a multiple of 12 \(3 equal parts of whole heads of 4\)"
CASES = {TimmAttention: Case("attn.qkv", "num_heads", 2, 4, 48, 25, _PARTS),
         GPT2Attention: Case("attn.c_attn", "split_size", 8, 16, 48, 25, _PARTS),
         HeadsFirst: Case("attn.qkv", "num_heads", 2, 4, 48, 25, _PARTS),
         ComputedHeadSize: Case("attn.q", "n_head", 2, 4, 16, 9, r"is not a whole number of heads\. Widen to a "
                                r"multiple of 4"),
         # a unit: one key/value group (2 query heads, a key and a value, of 4 each)
         FalconAttention: Case("attn.qkv", "num_heads", 2, 4, 32, 20, r"not a whole number of them\. Widen to a "
                               r"multiple of 16", block=16)}


def trained(attention: type[nn.Module], **kw: object) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model, ids = LM(attention, **kw), torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lm_steps(model, opt, ids, 2)
    return model, opt, ids


@pytest.mark.parametrize("attention", list(CASES))
def test_the_heads_grow_and_the_attribute_follows(attention):
    model, opt, ids = trained(attention)
    case = CASES[attention]
    ref = model(ids)
    plan = autogrow.plan_widen(model, case.layer, case.width, split=0.3, generator=1, example_inputs=ids)
    assert f"attribute attn.{case.attr} = {case.after}" in str(plan)  # the plan says what it will write
    assert getattr(model.attn, case.attr) == case.before  # nothing written before apply
    g = plan.apply(opt)
    assert max_rel_error(ref, model(ids)) <= 1e-9
    value = getattr(model.attn, case.attr)
    assert value == case.after and type(value) is int  # a plain int, not the tracer's BoundSize
    assert g.params[f"{case.layer}.weight"][0].block == case.block  # whole heads (groups)
    grown = copy.deepcopy(model)
    autogrow.shrink(model, case.layer, case.width // 2, mode="merge", optimizer=opt, example_inputs=ids)
    assert getattr(model.attn, case.attr) == case.before and max_rel_error(ref, model(ids)) <= 1e-9  # merged back
    lm_steps(grown, torch.optim.Adam(grown.parameters()), ids)
    assert all(torch.isfinite(p).all() for p in grown.parameters())


@pytest.mark.parametrize("attention", list(CASES))
def test_adam_state_carried_through_copied_heads_and_replay_rewrites_the_attribute(attention):
    model, _, ids = trained(attention)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    snaps = lm_snapshots(model, opt, batches)
    case = CASES[attention]
    g = autogrow.widen(model, case.layer, case.width, split=0.3, generator=3, optimizer=opt, example_inputs=ids)
    assert getattr(snaps[0].attn, case.attr) == case.before
    assert_adam_state_replays(model, opt, snaps, batches, [g], lr=1e-2)  # the snapshots replay the growth
    assert getattr(snaps[0].attn, case.attr) == case.after and type(getattr(snaps[0].attn, case.attr)) is int


@pytest.mark.parametrize("attention", list(CASES))
def test_part_of_a_head_is_refused_untouched(attention):
    model, opt, ids = trained(attention)
    before = snapshot(model, opt)
    case = CASES[attention]
    with pytest.raises(AutogrowError, match=rf"{case.bad} .*{case.why}"):
        autogrow.widen(model, case.layer, case.bad, optimizer=opt, example_inputs=ids)
    assert_unchanged(before, model, opt)
    assert type(getattr(model.attn, case.attr)) is int


@pytest.mark.parametrize("kv_from_heads", [True, False])
def test_falcon_groups_grow_and_the_attributes_that_count_them_follow(kv_from_heads):
    """Falcon computes its group size as ``num_heads // num_kv_heads``: ``num_heads`` is rewritten where the heads
    are reshaped, and ``num_kv_heads``, which counts the units (key/value groups), with it, so that the group size
    stays 2. With the group size an attribute of its own, ``num_kv_heads`` is not read and stays."""
    model, opt, ids = trained(FalconAttention, kv_from_heads=kv_from_heads)
    ref = model(ids)
    plan = autogrow.plan_widen(model, "attn.qkv", 48, init="zero_out", generator=2, example_inputs=ids)
    assert ("attribute attn.num_kv_heads = 3" in str(plan)) == kv_from_heads
    plan.apply(opt)
    assert max_rel_error(ref, model(ids)) <= 1e-9
    assert (model.attn.num_heads, model.attn.num_kv_heads) == (6, 3 if kv_from_heads else 1)
    assert model.attn.dense.in_features == 24  # 3 groups of 2 query heads of 4


def test_a_rewrite_that_changes_the_function_is_undone():
    """The attribute also scales the output (2 / self.num_heads): rewriting it changes the function, so the
    growth is undone after the check on the example inputs, the attribute with it."""
    model, opt, ids = trained(TimmAttention, scale_by_heads=True)
    before = snapshot(model, opt)
    with pytest.raises(AutogrowError, match="changed the model's output"):
        autogrow.widen(model, "attn.qkv", 48, init="zero_out", optimizer=opt, example_inputs=ids)
    assert_unchanged(before, model, opt)
    assert model.attn.num_heads == 2 and type(model.attn.num_heads) is int


def test_a_number_of_heads_written_in_the_code_is_refused():
    model, opt, ids = trained(LiteralHeads)
    before = snapshot(model, opt)
    with pytest.raises(AutogrowError, match="head size would change"):
        autogrow.widen(model, "attn.qkv", 48, optimizer=opt, example_inputs=ids)
    assert_unchanged(before, model, opt)


def test_tracing_leaves_plain_ints_even_when_it_fails():
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.n = nn.Linear(4, 4), 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert isinstance(self.n, BoundSize) and self.n.owner == "" and self.n.attr == "n"
            raise RuntimeError("boom")

    model = Fails()
    with pytest.raises(AutogrowError, match="boom"):
        autogrow.widen(model, "fc", 8, example_inputs=torch.zeros(2, 4))
    assert type(model.n) is int and model.n == 3

    class Counts(nn.Sequential):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1  # a value the forward writes while traced is kept (a plain int)
            self.twice = self.calls * 2  # one computed from a traced attribute too
            return super().forward(x)

    counts = Counts(nn.Linear(4, 4), nn.Linear(4, 2))
    counts.calls = 5
    autogrow.widen(counts, "0", 8, example_inputs=torch.zeros(2, 4))
    assert type(counts.calls) is int and counts.calls > 5 and type(counts.twice) is int
    leaf = nn.Linear(4, 4)  # a layer's own sizes are not bound: it has no children
    with bound_sizes(nn.Sequential(leaf)):
        assert type(leaf.in_features) is int


def test_the_callback_grows_timm_style_heads_and_the_checkpoint_loads(tmp_path):
    """A real fit: the ``all`` policy widens d_model and the fused q/k/v (2 -> 4 heads, ``self.num_heads``
    rewritten), exactly; the checkpoint loads into a fresh model, the attribute rewritten by the replay."""

    from tests.test_transformers import TinyLM, fit_one_growth, reloaded

    model, grow, trainer, seq = fit_one_growth(lambda: TinyLM(arch=LM, attention=TimmAttention))
    (event,) = grow.events
    assert "net.attn.qkv" in [c.target for c in event.changes] and event.preservation_error < 1e-5
    assert model.net.attn.num_heads == 4 and type(model.net.attn.num_heads) is int
    loaded = reloaded(trainer, model, seq, tmp_path, arch=LM, attention=TimmAttention)
    assert loaded.net.attn.num_heads == 4
