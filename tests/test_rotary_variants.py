"""Rotary embeddings as the other model families write them: on part of each head (Phi, GPT-NeoX: ``q[..., :d]``
rotated, ``q[..., d:]`` passed, joined again) and interleaved (GPT-J: ``stack((-x2, x1), -1).flatten(-2)`` over the
even and odd entries). The heads grow through them; slices along the head size and stacks along a new axis follow
the heads, and what would cut the units is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.errors import AutogrowError
from tests.models import max_rel_error, rotate_half
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's: the pairs (x0, x1), (x2, x3), ... rotated, stacked on a new axis and merged back."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryLM(nn.Module):
    """Attention with rotary embeddings on the first ``rotary`` entries of each head of 4; ``style``: ``"half"``
    (Phi/GPT-NeoX: rotate_half) or ``"interleaved"`` (GPT-J)."""

    def __init__(self, style: str, rotary: int = 2, d: int = 8, heads: int = 2, head_size: int = 4) -> None:
        super().__init__()
        self.tok, self.head = nn.Embedding(11, d), nn.Linear(d, 11)
        self.q, self.k, self.v = (nn.Linear(d, heads * head_size) for _ in range(3))
        self.o = nn.Linear(heads * head_size, d)
        self.style, self.rotary, self.head_size = style, rotary, head_size
        angles = torch.outer(torch.arange(16.0), torch.ones(rotary))
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def rope(self, t: torch.Tensor) -> torch.Tensor:
        rot, keep = t[..., : self.rotary], t[..., self.rotary:]
        turn = rotate_half(rot) if self.style == "half" else rotate_every_two(rot)
        T = t.shape[-2]
        return torch.cat((rot * self.cos[:T] + turn * self.sin[:T], keep), dim=-1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, -1, self.head_size).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
        return self.head(x + self.o(y.transpose(1, 2).reshape(B, T, -1)))


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_heads_grow_through_partial_and_interleaved_rotary(style, target):
    """Widening q reaches k backwards through the attention, and k's rotary slice before k itself."""
    torch.manual_seed(0)
    model, ids = RotaryLM(style), torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    autogrow.widen(model, target, 16, split=0.3, generator=0, example_inputs=ids)
    assert max_rel_error(ref, model(ids)) <= 1e-9
    assert (model.q.out_features, model.k.out_features, model.v.out_features, model.o.in_features) == (16,) * 4


class StackedUnits(nn.Module):
    """A residual add of a widened tensor (B, 2) and a stack of two per-sample values: the stack makes the units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.a, self.b, self.out = nn.Linear(3, 2), nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x) + torch.stack((self.a(x)[:, 0], self.b(x)[:, 0]), dim=1))


class SlicedUnits(nn.Module):
    """A residual add of a widened tensor (B, 2) and the first two of another layer's 4 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.other, self.out = nn.Linear(3, 2), nn.Linear(3, 4), nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x) + self.other(x)[:, :2])


@pytest.mark.parametrize("net, match", [
    (StackedUnits, r"'stack'.*stacks tensors along the widened units' axis"),
    (SlicedUnits, r"'getitem'.*with slice\(None, 2, None\) on the units' axis"),
])
def test_stacks_and_slices_that_make_the_units_are_refused(net, match):
    torch.manual_seed(0)
    model, x = net(), torch.randn(4, 3)
    before = snapshot(model)
    with pytest.raises(AutogrowError, match=match):
        autogrow.widen(model, "fc", 4, generator=0, example_inputs=x)
    assert_unchanged(before, model)
