"""Multi-query attention (StarCoder's GPTBigCode, PaLM): one fused ``c_attn`` split into unequal parts, all the query
heads, one key head and one value head, by sizes held in attributes. The query heads grow from ``c_attn`` alone:
the key/value head keeps its size and serves every query head, old and new. Where the code repeats it for the query
heads (Hugging Face's ``repeat_kv``) the attribute holding the repeat count is rewritten; under SDPA's
``enable_gqa`` nothing reads it, and an attribute that may hold it is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.actions import Widen
from autogrow.optim import optimizer_holds_model
from autogrow.widen import unit_features
from tests.models import assert_adam_state_replays, lm_snapshots, lm_steps, max_rel_error, repeat_kv
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64

REPEATS = ["expand", "sdpa"]


class MultiQueryLM(nn.Module):
    """GPTBigCode's attention with ``multi_query=True``, written by hand: ``c_attn`` makes 4 query heads of 4, one key
    and one value head; ``repeat`` is ``"expand"`` (``repeat_kv(k, self.n_rep)``), ``"sdpa"`` (``enable_gqa``) or
    ``"sdpa_count"`` (``enable_gqa``, the module keeping the query heads per key/value head in ``num_key_value_groups``,
    which nothing reads)."""

    def __init__(self, repeat: str, d: int = 8, heads: int = 4, head_size: int = 4) -> None:
        super().__init__()
        self.tok, self.norm, self.head = nn.Embedding(11, d), nn.LayerNorm(d), nn.Linear(d, 11)
        self.c_attn, self.c_proj = nn.Linear(d, (heads + 2) * head_size), nn.Linear(heads * head_size, d)
        self.embed_dim, self.head_dim, self.repeat = heads * head_size, head_size, repeat
        if repeat == "expand":
            self.n_rep = heads
        if repeat == "sdpa_count":
            self.num_key_value_groups = heads

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        B, T, _ = x.shape
        q, k, v = self.c_attn(self.norm(x)).unsqueeze(1).split((self.embed_dim, self.head_dim, self.head_dim), dim=3)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.repeat == "expand":
            y = F.scaled_dot_product_attention(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.head(x + self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))


def trained(repeat: str) -> tuple[MultiQueryLM, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model, ids = MultiQueryLM(repeat), torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lm_steps(model, opt, ids, 2)
    return model, opt, ids


@pytest.mark.parametrize("repeat", REPEATS)
@pytest.mark.parametrize("init", ["net2wider", "zero_out"])
def test_the_query_heads_grow_and_the_key_value_head_keeps_its_rows(repeat, init):
    model, opt, ids = trained(repeat)
    ref, kv_rows = model(ids), model.c_attn.weight[16:].detach().clone()
    autogrow.widen(model, "c_attn", 40, init=init, split=0.3, generator=1, optimizer=opt, example_inputs=ids)
    assert max_rel_error(ref, model(ids)) <= 1e-9
    assert (model.c_attn.out_features, model.c_proj.in_features, model.embed_dim) == (40, 32, 32)
    assert torch.equal(model.c_attn.weight[32:], kv_rows)  # the key and value head: the same rows, after the queries
    assert getattr(model, "n_rep", 8) == 8  # repeat_kv's count rewritten: as many copies as query heads
    assert optimizer_holds_model(opt, model)
    lm_steps(model, opt, ids)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("repeat", REPEATS)
def test_adam_state_is_carried_through_the_unequal_split(repeat):
    model, _, ids = trained(repeat)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # its whole history replayed below
    batches = [torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    snaps = lm_snapshots(model, opt, batches)
    g = autogrow.widen(model, "c_attn", 32, split=0.3, generator=2, optimizer=opt, example_inputs=ids)
    assert_adam_state_replays(model, opt, snaps, batches, [g], lr=1e-2)


def test_widths_are_the_fixed_parts_plus_whole_heads_and_the_callback_rounds_to_them():
    model, opt, ids = trained("expand")
    assert unit_features(model, "c_attn", ids) == (4, 8)
    before = snapshot(model, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"8 plus a multiple of 4 \(of its output's unequal parts only "
                       r"one grows"):
        autogrow.widen(model, "c_attn", 30, optimizer=opt, example_inputs=ids)
    assert_unchanged(before, model, opt)
    assert Widen(units=3).plan(model, "c_attn", 0, example_inputs=ids).width == 28  # 24 + 3, up to whole heads
    assert Widen(factor=2).plan(model, "c_attn", 0, example_inputs=ids).width == 40  # the query heads doubled


def test_shrink_merges_copied_query_heads_and_prunes_fresh_ones():
    model, opt, ids = trained("expand")
    ref = model(ids)
    autogrow.widen(model, "c_attn", 40, generator=3, optimizer=opt, example_inputs=ids)  # 4 -> 8 heads, copies
    autogrow.shrink(model, "c_attn", 24, optimizer=opt, example_inputs=ids)
    assert (model.c_attn.out_features, model.c_proj.in_features, model.embed_dim, model.n_rep) == (24, 16, 16, 4)
    assert max_rel_error(ref, model(ids)) <= 1e-9
    autogrow.widen(model, "c_attn", 40, init="zero_out", generator=4, optimizer=opt, example_inputs=ids)
    autogrow.shrink(model, "c_attn", 28, mode="prune", optimizer=opt, example_inputs=ids)  # 3 of the silent heads
    assert (model.c_attn.out_features, model.c_proj.in_features, model.embed_dim, model.n_rep) == (28, 20, 20, 5)
    assert max_rel_error(ref, model(ids)) <= 1e-9


def test_a_count_that_nothing_reads_is_refused_by_name_untouched():
    """Under ``enable_gqa`` the forward reads no repeat count; ``num_key_value_groups`` (4, the query heads per
    key/value head) would stay 4 after growing to 8 heads, so the growth is refused and nothing changes."""
    model, opt, ids = trained("sdpa_count")
    before = snapshot(model, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"multi-query attention .* query heads grow from 4 to 8; the "
                       r"model keeps 4 in num_key_value_groups, which this forward did not read"):
        autogrow.widen(model, "c_attn", 40, optimizer=opt, example_inputs=ids)
    assert_unchanged(before, model, opt)


class LiteralSplit(MultiQueryLM):
    """The query part's size written in the code: ``split((16, 4, 4))``."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        B, T, _ = x.shape
        q, k, v = self.c_attn(self.norm(x)).unsqueeze(1).split((16, 4, 4), dim=3)
        y = F.scaled_dot_product_attention(q.view(B, T, -1, 4).transpose(1, 2), k, v, is_causal=True, enable_gqa=True)
        return self.head(x + self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))


def test_a_split_whose_query_size_is_fixed_in_the_code_is_refused():
    torch.manual_seed(0)
    model, ids = LiteralSplit("sdpa"), torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=r"parts of \(16, 4, 4\): after widening part 0 they would need "
                       r"to be \(32, 4, 4\), but are \(16, 4, 4\)"):
        autogrow.widen(model, "c_attn", 40, example_inputs=ids)
    assert_unchanged(before, model)


def test_the_callback_grows_starcoders_query_heads_in_a_real_fit(tmp_path):
    """transformers' GPTBigCode (multi-query, eager attention) in a real fit: the callback's default ``Widen()`` doubles
    each block's query heads from ``c_attn`` (4 -> 8 heads of 8, the key/value head kept), rewriting ``embed_dim`` and
    ``num_key_value_groups``, the MLPs, and d_model through the tied embedding; exact, and a checkpoint replays the
    rewrites."""
    pytest.importorskip("transformers")
    from autogrow.experiments import zoo

    from tests.test_transformers import TinyLM, fit_one_growth, reloaded

    def starcoder() -> nn.Module:
        return zoo.Logits(zoo._gpt_bigcode("eager"))

    with pytest.warns(UserWarning, match="traced what its forward ran"):
        model, grow, trainer, seq = fit_one_growth(lambda: TinyLM(arch=starcoder), vocab=zoo.VOCAB)
    (event,) = grow.events
    attn = model.net.model.transformer.h[1].attn
    assert sorted(c.target for c in event.changes) == [
        *(f"net.model.transformer.h.{i}.{layer}" for i in (0, 1) for layer in ("attn.c_attn", "mlp.c_fc")),
        "net.model.transformer.wte"]
    assert event.preservation_error < 1e-5
    gpt = model.net.model
    assert gpt.transformer.wte.weight.shape[1] == 64 and gpt.lm_head.weight is gpt.transformer.wte.weight
    assert (attn.c_attn.out_features, attn.c_proj.in_features, attn.embed_dim, attn.num_key_value_groups) == (
        80, 64, 64, 8)
    assert optimizer_holds_model(trainer.optimizers[0], model)
    loaded = reloaded(trainer, model, seq, tmp_path, arch=starcoder)
    assert loaded.net.model.transformer.h[1].attn.num_key_value_groups == 8  # replayed from the growth record


class UnevenSplit(nn.Module):
    """Any layer's output split into unequal parts by sizes held in attributes: the first part can grow, the second
    keeps its size (``joined``: the split tensor is a residual sum of two layers, which such a growth cannot map)."""

    def __init__(self, joined: bool = False) -> None:
        super().__init__()
        self.fc, self.other = nn.Linear(4, 8), nn.Linear(4, 8) if joined else None
        self.first, self.second = 6, 2
        self.b, self.c = nn.Linear(6, 3), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x)) if self.other is None else self.fc(x) + self.other(x)
        p, q = h.split((self.first, self.second), dim=-1)
        return self.b(p) + self.c(q)


def test_any_unequal_split_of_a_layers_output_grows_its_first_part_or_is_refused_untouched():
    torch.manual_seed(0)
    model, x = UnevenSplit(), torch.randn(5, 4)
    ref = model(x)
    autogrow.widen(model, "fc", 11, init="zero_out", generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    assert (model.first, model.second, model.b.in_features, model.c.in_features) == (9, 2, 9, 2)
    model = UnevenSplit(joined=True)
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=r"joins 'other' to a tensor it cannot be mapped onto"):
        autogrow.widen(model, "fc", 11, example_inputs=x)
    assert_unchanged(before, model)
