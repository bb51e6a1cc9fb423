"""Grouped-query attention (Llama 2/3, Mistral, Qwen): one key/value head serves a group of query heads, so the
heads grow by whole groups. Whichever of q, k or v is widened, each new key/value head comes with its query
heads and the output projection's columns for them; exact, the optimizer's state carried, and undone by a
shrink. The key/value heads reach the query heads' count the ways code does it: Hugging Face's ``repeat_kv``
(a new axis, expanded, merged into the heads), ``repeat_interleave``, or SDPA's ``enable_gqa=True``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.optim import optimizer_holds_model
from autogrow.widen import unit_features
from tests.models import TinyLlama, assert_adam_state_replays, lm_snapshots, lm_steps, max_rel_error
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64

REPEATS = ["expand", "interleave", "sdpa"]


def ids() -> torch.Tensor:
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))


def trained(repeat: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """4 query heads of 4 sharing 2 key/value heads (groups of 2), after two AdamW steps."""
    torch.manual_seed(0)
    model, x = TinyLlama(heads=4, kv_heads=2, head_size=4, repeat=repeat), ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lm_steps(model, opt, x, 2)
    return model, opt, x


@pytest.mark.parametrize("repeat", REPEATS)
@pytest.mark.parametrize("layer, width", [("q", 24), ("k", 12), ("v", 12)])
def test_a_key_value_head_grows_with_its_query_heads(repeat, layer, width):
    model, opt, x = trained(repeat)
    ref = model(x)
    g = autogrow.widen(model, f"blocks.0.attn.{layer}", width, split=0.3, generator=1, optimizer=opt,
                       example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9
    attn = model.blocks[0].attn
    assert (attn.q.out_features, attn.k.out_features, attn.v.out_features, attn.o.in_features) == (24, 12, 12, 24)
    assert g.params["blocks.0.attn.q.weight"][0].block == 8  # a unit: one key/value head's 2 query heads of 4
    assert g.params["blocks.0.attn.k.weight"][0].block == 4 and g.params["blocks.0.attn.o.weight"][0].block == 8
    assert len(g.maps["base"].idx) == 3  # 2 -> 3 key/value heads
    assert optimizer_holds_model(opt, model)
    lm_steps(model, opt, x)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("repeat", REPEATS)
def test_fresh_groups_are_exact_and_shrink_undoes_copies(repeat):
    model, opt, x = trained(repeat)
    ref = model(x)
    autogrow.widen(model, "blocks.1.attn.v", 16, init="zero_out", generator=2, optimizer=opt, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9 and model.blocks[1].attn.q.out_features == 32
    autogrow.widen(model, "blocks.0.attn.k", 16, generator=3, optimizer=opt, example_inputs=x)  # copies
    autogrow.shrink(model, "blocks.0.attn.q", 16, optimizer=opt, example_inputs=x)  # the copies merge back
    attn = model.blocks[0].attn
    assert (attn.q.out_features, attn.k.out_features, attn.o.in_features) == (16, 8, 16)
    assert max_rel_error(ref, model(x)) <= 1e-9


@pytest.mark.parametrize("repeat", REPEATS)
def test_pruning_removes_whole_groups(repeat):
    model, opt, x = trained(repeat)
    autogrow.shrink(model, "blocks.0.attn.q", 8, mode="prune", optimizer=opt, example_inputs=x)
    attn = model.blocks[0].attn
    assert (attn.q.out_features, attn.k.out_features, attn.v.out_features, attn.o.in_features) == (8, 4, 4, 8)
    lm_steps(model, opt, x)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("repeat", REPEATS)
def test_part_of_a_group_is_refused_untouched(repeat):
    model, opt, x = trained(repeat)
    before = snapshot(model, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"multiple of 8 \(whole key/value heads of 4 with their query "
                       r"heads: grouped-query attention"):
        autogrow.widen(model, "blocks.0.attn.q", 20, optimizer=opt, example_inputs=x)  # one query head more
    assert_unchanged(before, model, opt)
    assert unit_features(model, "blocks.0.attn.q", x) == (8, 0) and unit_features(model, "blocks.0.attn.k", x) == (4, 0)


class SharedSizes(nn.Module):
    """The key/value heads' count read once, from k, and used to repeat v too: when v is widened, the walk meets
    v's expand before it has reached k (the sizes are checked once every widened tensor is known)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        _, kv, _, d = k.shape
        k, v = (y[:, :, None].expand(b, kv, 2, t, d).reshape(b, kv * 2, t, d) for y in (k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("layer", ["q", "k", "v"])
def test_sizes_read_from_another_head_projection(layer):
    torch.manual_seed(0)
    model, x = SharedSizes(), torch.randn(3, 5, 6)
    ref = model(x)
    autogrow.widen(model, layer, 2 * model.get_submodule(layer).out_features, generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9 and (model.q.out_features, model.v.out_features) == (16, 8)


def test_gradient_replay_through_the_groups():
    """Adam's carried state equals what the grown model's own gradient history builds (rows by whole groups)."""
    model, _, x = trained("expand")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    snaps = lm_snapshots(model, opt, batches)
    growths = [autogrow.widen(model, "blocks.0.attn.k", 12, split=0.3, generator=5, optimizer=opt, example_inputs=x),
               autogrow.widen(model, "blocks.1.attn.q", 32, split=0.4, generator=6, optimizer=opt, example_inputs=x)]
    assert_adam_state_replays(model, opt, snaps, batches, growths, lr=1e-2)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hugging_face_llama_grows_its_grouped_heads(impl):
    """HF's LlamaForCausalLM, 4 query heads over 2 key/value heads: SDPA with ``enable_gqa`` and the eager path
    through ``repeat_kv`` (its key/value heads also pass through the cache's concatenation)."""
    pytest.importorskip("transformers")
    from autogrow.experiments import zoo

    model, x = zoo.build(zoo.MODELS["llama"])
    model.config._attn_implementation = impl
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref = model(x).logits
    for layer, width in (("q_proj", 64), ("k_proj", 48), ("v_proj", 64)):
        autogrow.widen(model, f"model.layers.1.self_attn.{layer}", width, split=0.3, generator=0, optimizer=opt,
                       example_inputs=x)
        assert max_rel_error(ref, model(x).logits) <= 1e-9
    attn = model.model.layers[1].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (128, 64, 128)


@pytest.mark.parametrize("repeat", REPEATS)
def test_the_callback_grows_the_groups_once_per_event(rmsnorm_registered, repeat):
    """``AutoGrow``'s ``all`` policy on a grouped-query Llama: q, k and v are one coupled group, which grows once
    (by the default factor 2: one key/value head and its 2 query heads become two), exactly."""
    from tests.test_transformers import TinyLM, fit_one_growth

    model, grow, _, _ = fit_one_growth(lambda: TinyLM(arch=TinyLlama, layers=1, d=8, heads=2, kv_heads=1,
                                                      head_size=4, hidden=8, repeat=repeat))
    attn = model.net.blocks[0].attn
    assert (attn.q.out_features, attn.k.out_features, attn.v.out_features, attn.o.in_features) == (16, 8, 8, 16)
    assert len(grow.events) == 1 and grow.events[0].preservation_error < 1e-5


class Repeated(nn.Module):
    """Features repeated (``repeat_interleave`` on the units' axis) before a Linear, optionally a LayerNorm."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 2)
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(torch.relu(self.a(x)).repeat_interleave(2, dim=-1)))


def test_repeated_features_grow_their_reader_by_blocks_and_a_norm_over_them_is_refused():
    torch.manual_seed(0)
    model, x = Repeated(norm=False), torch.randn(5, 3)
    ref = model(x)
    autogrow.widen(model, "a", 6, generator=0, example_inputs=x)
    assert model.b.in_features == 12 and max_rel_error(ref, model(x)) <= 1e-9
    model = Repeated(norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"'norm' .*acts on units that hold 2 entries each"):
        autogrow.widen(model, "a", 6, optimizer=opt, generator=0, example_inputs=x)
    assert_unchanged(before, model, opt)
