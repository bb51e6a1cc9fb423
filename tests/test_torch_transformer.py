"""torch's own transformer layers: ``nn.TransformerEncoder``/``Decoder`` are traced through (their Linears and
norms grow), and ``autogrow.unfuse_attention`` rebuilds each ``nn.MultiheadAttention`` from Linears computing the
same function, so that heads, d_model, FFN and depth all grow, exactly, in a real fit too."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn

import autogrow
from autogrow.attention import SplitAttention
from autogrow.optim import optimizer_holds_model
from tests.models import max_rel_error
from tests.test_refusals import assert_unchanged, snapshot
from tests.test_transformers import TinyLM

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


def _mha_pair(batch_first: bool, **kw) -> tuple[nn.MultiheadAttention, nn.Module]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
    if mha.in_proj_bias is not None:  # torch starts the biases at zero: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    holder = nn.Sequential(mha)
    assert autogrow.unfuse_attention(holder) == ["0"]
    return mha, holder[0]


def masks_of(name: str) -> dict:
    """The masks of case ``name``, made in the test's default dtype."""
    return {
        "none": {},
        "causal hint": {"is_causal": True, "attn_mask": nn.Transformer.generate_square_subsequent_mask(5)},
        "bool mask": {"attn_mask": torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.7},
        "float mask": {"attn_mask": torch.randn(5, 6, generator=torch.Generator().manual_seed(2))},
        "padding": {"key_padding_mask": torch.tensor([[False] * 5 + [True], [False] * 6])},
        "per-head mask and padding": {"attn_mask": torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(3)),
                                      "key_padding_mask": torch.tensor([[False] * 4 + [True] * 2, [False] * 6])},
    }[name]


MASKS = ["none", "causal hint", "bool mask", "float mask", "padding", "per-head mask and padding"]


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"kdim": 3, "vdim": 5}], ids=["packed", "no bias", "kdim"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_computes_what_multihead_attention_does(batch_first, kw, masks):
    mha, split = _mha_pair(batch_first, **kw)
    assert isinstance(split, SplitAttention) and split.num_heads == 2 and split.embed_dim == 8
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 5, 8, generator=g), torch.randn(2, 6, mha.kdim, generator=g), \
        torch.randn(2, 6, mha.vdim, generator=g)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    if masks == "causal hint":
        k, v = (t[:, :5] if batch_first else t[:5] for t in (k, v))
    for average in (True, False):
        a = mha(q, k, v, average_attn_weights=average, **masks_of(masks))
        b = split(q, k, v, average_attn_weights=average, **masks_of(masks))
        assert max_rel_error(a[0], b[0]) <= 1e-12 and max_rel_error(a[1], b[1]) <= 1e-12
    assert split(q, k, v, need_weights=False, **masks_of(masks))[1] is None


def test_unfuse_refuses_extra_key_value_positions_and_replaces_nothing():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, add_bias_kv=True))
    before = [type(m) for m in model]
    with pytest.raises(autogrow.AutogrowError, match=r"add_bias_kv=True or add_zero_attn=True"):
        autogrow.unfuse_attention(model)
    assert [type(m) for m in model] == before


class Encoder(nn.Module):
    """Features -> Linear -> nn.TransformerEncoder (2 layers, an optional padding mask) -> Linear; ``unfuse``: its
    attention unfused at construction (as a LightningModule would, before its optimizer)."""

    def __init__(self, norm_first: bool, batch_first: bool, unfuse: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.emb, self.head, self.batch_first = nn.Linear(4, 8), nn.Linear(8, 3), batch_first
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if norm_first else None,
                                         enable_nested_tensor=False)
        if unfuse:
            autogrow.unfuse_attention(self)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(x if self.batch_first else x.transpose(0, 1))
        h = self.enc(h, src_key_padding_mask=pad)
        return self.head(h if self.batch_first else h.transpose(0, 1))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, -2:] = True
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)), pad


def steps(model: nn.Module, opt: torch.optim.Optimizer, x: tuple, n: int = 2) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(*x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_an_unfused_encoder_grows_in_every_dimension(norm_first, batch_first):
    torch.manual_seed(0)
    model, x = Encoder(norm_first, batch_first), batch()
    assert autogrow.unfuse_attention(model) == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps(model, opt, x)
    ref = model(*x)
    ops = [lambda: autogrow.widen(model, "enc.layers.0.self_attn.q", 16, generator=1, optimizer=opt, example_inputs=x),
           lambda: autogrow.widen(model, "enc.layers.1.linear1", 24, generator=2, optimizer=opt, example_inputs=x),
           lambda: autogrow.widen(model, "emb", 16, init="auto", generator=3, optimizer=opt, example_inputs=x),
           lambda: autogrow.deepen(model, "enc.layers.0.linear1", generator=4, optimizer=opt, example_inputs=x)]
    if norm_first:  # a copy of a pre-norm layer whose writes to the stream start at zero (post-norm: refused)
        ops.append(lambda: autogrow.stack(model, "enc.layers.1", generator=5, optimizer=opt, example_inputs=x))
    for op in ops:
        op()
        assert max_rel_error(ref, model(*x)) <= 1e-9
    layer = model.enc.layers[0]
    assert layer.self_attn.num_heads == 4 and layer.self_attn.embed_dim == 16 and layer.norm1.weight.shape == (16,)
    assert model.enc.layers[1].linear1.out_features == 24 and model.head.in_features == 16
    assert len(model.enc.layers) == (3 if norm_first else 2)
    assert optimizer_holds_model(opt, model)
    steps(model, opt, x)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_attention_is_refused_naming_the_way_out():
    class WithMHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mha, self.head = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True), \
                nn.Linear(8, 2)

        def forward(self, x):
            h = self.emb(x)
            return self.head(h + self.mha(h, h, h)[0])

    x = torch.randn(2, 5, 4)
    model = WithMHA()
    with pytest.raises(autogrow.AutogrowError, match=r"node 'mha' \(call_module mha: MultiheadAttention\).*"
                                                     r"autogrow.unfuse_attention\(model\)"):
        autogrow.widen(model, "emb", 16, example_inputs=x)
    ref = model(x)
    assert autogrow.unfuse_attention(model) == ["mha"]  # the way out: then d_model grows through it
    autogrow.widen(model, "emb", 16, generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9 and (model.mha.embed_dim, model.mha.num_heads) == (16, 2)
    torch.manual_seed(0)
    enc, xb = Encoder(True, True), batch()  # traced by running it: the fused call is a function there
    opt = torch.optim.Adam(enc.parameters())
    before = snapshot(enc, opt)
    with pytest.raises(autogrow.AutogrowError, match=r"multi_head_attention_forward.*unfuse_attention"):
        autogrow.widen(enc, "emb", 16, optimizer=opt, example_inputs=xb)
    assert_unchanged(before, enc, opt)
    ref = enc(*xb)  # its feed-forward layers grow without unfusing
    autogrow.widen(enc, "enc.layers.0.linear1", 32, optimizer=opt, example_inputs=xb, generator=0)
    assert max_rel_error(ref, enc(*xb)) <= 1e-9


class Seq2Seq(nn.Module):
    """nn.Transformer between two Linear embeddings and a head, causal target mask."""

    def __init__(self) -> None:
        super().__init__()
        self.src, self.tgt, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)
        self.tf = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1], dtype=t.dtype)
        return self.head(self.tf(self.src(s), self.tgt(t), tgt_mask=mask, tgt_is_causal=True))


def test_nn_transformer_grows_its_cross_attention_and_refuses_its_d_model_untouched():
    torch.manual_seed(0)
    model = Seq2Seq()
    autogrow.unfuse_attention(model)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g))
    opt = torch.optim.Adam(model.parameters())
    ref = model(*x)
    for layer in ("tf.decoder.layers.0.multihead_attn.k", "tf.decoder.layers.0.self_attn.q"):
        autogrow.widen(model, layer, 16, generator=0, optimizer=opt, example_inputs=x)
        assert max_rel_error(ref, model(*x)) <= 1e-9
    before = snapshot(model, opt)  # nn.Transformer checks src.size(-1) against its d_model attribute
    with pytest.raises(autogrow.AutogrowError, match=r"must be equal to d_model; the growth was undone"):
        autogrow.widen(model, "src", 16, optimizer=opt, example_inputs=x)
    assert_unchanged(before, model, opt)


ENCODER = {"norm_first": True, "batch_first": True, "unfuse": True}


def test_the_callback_grows_an_unfused_encoder(tmp_path):
    from autogrow.callbacks import AutoGrow, load_grown
    from torch.utils.data import DataLoader, TensorDataset

    from autogrow.plateau import EveryN

    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 5, 4, generator=g), torch.randint(0, 3, (64, 5), generator=g))
    loader = DataLoader(data, batch_size=16)
    pl.seed_everything(0, verbose=False)
    model = TinyLM(arch=Encoder, **ENCODER)
    grow = AutoGrow(trigger=EveryN(every=1), max_events=1, policy="all")
    trainer = pl.Trainer(max_epochs=2, callbacks=[grow], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, loader, loader)
    layer = model.net.enc.layers[0]
    assert model.net.emb.out_features == 16 and layer.self_attn.num_heads == 4 and layer.linear1.out_features == 32
    assert len(grow.events) == 1 and grow.events[0].preservation_error < 1e-5
    path = tmp_path / "last.ckpt"  # the encoder unfuses when built: load_grown replays the growth on that
    trainer.save_checkpoint(path)
    loaded = load_grown(TinyLM, path, arch=Encoder, **ENCODER)
    x = data.tensors[0][:4]
    assert torch.equal(loaded.eval()(x), model.eval()(x))
