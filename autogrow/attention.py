"""``nn.MultiheadAttention`` rebuilt from ``Linear``s, so that torch's own transformer layers can grow.

torch.fx records ``nn.MultiheadAttention`` as one call, and its forward runs one fused function over a packed
``in_proj_weight``: autogrow sees neither the heads nor the projections. :func:`unfuse_attention` replaces every
``nn.MultiheadAttention`` of a model (those inside ``nn.TransformerEncoderLayer``/``DecoderLayer`` included) by
:class:`SplitAttention`, which computes the same function from ``q``/``k``/``v``/``out_proj`` Linears and
``F.scaled_dot_product_attention``, with the same call signature and return value. Each replacement is checked
against the module it replaces on random inputs before anything changes. Do it before the optimizer is built
(the parameters are new ones); its heads, the model width through it and the layers around it then grow.

    >>> import torch, torch.nn as nn
    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    >>> unfuse_attention(layer)
    ['self_attn']
    >>> type(layer.self_attn).__name__, layer.self_attn.q.out_features
    ('SplitAttention', 8)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from autogrow.errors import fail

__all__ = ["SplitAttention", "unfuse_attention"]


class SplitAttention(nn.Module):
    """Multi-head attention with the call signature of ``nn.MultiheadAttention`` (``(query, key, value,
    key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal) -> (output, weights)``), computed
    from four Linears and SDPA, heads read from the tensor (``view(B, T, -1, head_dim)``) so that they can grow.

    ``in_proj_bias`` is ``None``: torch's transformer layers read it to choose their fused fast path, which
    packs the projections again, and skip it.
    """

    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            fail(f"num_heads: {num_heads} does not divide embed_dim={embed_dim}")
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.head_dim, self.dropout, self.batch_first = embed_dim // num_heads, dropout, batch_first
        self._qkv_same_embed_dim = kdim in (None, embed_dim) and vdim in (None, embed_dim)

    @property
    def num_heads(self) -> int:
        """The current number of heads (it changes as the heads grow)."""
        return self.q.out_features // self.head_dim

    @property
    def embed_dim(self) -> int:
        """The width of the query's features, which the output has too."""
        return self.q.in_features

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t, _ = query.shape
        s = key.shape[1]
        q = self.q(query).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(key).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(value).view(b, s, -1, self.head_dim).transpose(1, 2)
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, b, t, s)
        causal = is_causal and mask is None  # with a mask given, is_causal is only a hint that it is causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(y.transpose(1, 2).reshape(b, t, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = _weights(q, k, mask, causal)
        return out, weights.mean(1) if average_attn_weights else weights


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype,
                   b: int, t: int, s: int) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s masks as one float mask added to the scores, ``(B or 1, H or 1, T, S)``:
    boolean ``True`` there means *not* attended (the opposite of SDPA's boolean masks)."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    out = None
    if attn_mask is not None:  # (T, S), or (B * H, T, S): per head
        out = additive(attn_mask)
        out = out.view(1, 1, t, s) if out.dim() == 2 else out.view(b, -1, t, s)
    if key_padding_mask is not None:  # (B, S)
        pad = additive(key_padding_mask).view(b, 1, 1, s)
        out = pad if out is None else out + pad
    return out


def _weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """The attention weights ``(B, H, T, S)`` (``need_weights=True``), without dropout, as torch returns them."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1)


def _split(mha: nn.MultiheadAttention) -> SplitAttention:
    """A :class:`SplitAttention` with ``mha``'s weights, on its device and dtype."""
    if mha.bias_k is not None or mha.add_zero_attn:
        fail("model: an nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True cannot be unfused (its "
             "extra key/value positions have no SplitAttention counterpart)")
    e, bias = mha.embed_dim, mha.in_proj_bias is not None
    new = SplitAttention(e, mha.num_heads, mha.dropout, bias, mha.kdim, mha.vdim, mha.batch_first)
    new = new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.detach().chunk(3)
    else:
        weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
    biases = mha.in_proj_bias.detach().chunk(3) if bias else (None,) * 3
    with torch.no_grad():
        for lin, w, b in zip((new.q, new.k, new.v), weights, biases):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if bias:
            new.out_proj.bias.copy_(mha.out_proj.bias)
    new.train(mha.training)
    return new


def _check_same(name: str, old: nn.MultiheadAttention, new: SplitAttention) -> None:
    """Both modules on one random input (eval mode, masks included): outputs and weights must agree."""
    p = old.out_proj.weight
    gen = torch.Generator().manual_seed(0)
    shape = (2, 5) if old.batch_first else (5, 2)

    def rand(d: int) -> torch.Tensor:
        return torch.randn(*shape, d, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)

    q, k, v = rand(old.embed_dim), rand(old.kdim), rand(old.vdim)
    pad = torch.zeros(2, 5, dtype=torch.bool, device=p.device)
    pad[0, -2:] = True
    causal = torch.ones(5, 5, dtype=torch.bool, device=p.device).triu(1)
    was = old.training, new.training
    old.eval(), new.eval()
    try:
        with torch.no_grad():
            a = old(q, k, v, key_padding_mask=pad, attn_mask=causal)
            b = new(q, k, v, key_padding_mask=pad, attn_mask=causal)
    finally:
        old.train(was[0]), new.train(was[1])
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(p.dtype, 1e-2)  # half precision: a coarser check
    for x, y, what in ((a[0], b[0], "output"), (a[1], b[1], "attention weights")):
        err = float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))
        if not err <= tol:
            fail(f"model: unfusing {name!r} would change its {what} (relative error {err:.3g}); nothing was replaced")


def unfuse_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by an equivalent :class:`SplitAttention`; returns
    their names. Each is checked on random inputs first (outputs and attention weights, with a padding and a
    causal mask); if any would differ, or uses ``add_bias_kv``/``add_zero_attn``, nothing is replaced. Call it
    after loading pretrained weights (the ``state_dict`` keys change: ``in_proj_weight`` becomes ``q``/``k``/``v``)
    and before building the optimizer (the parameters are new ones). ``nn.TransformerEncoder``s holding them stop
    using nested tensors (torch's fast path, which needs the packed weights).

        >>> import torch.nn as nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), num_layers=2)
        >>> unfuse_attention(enc)
        ['layers.0.self_attn', 'layers.1.self_attn']
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if found and found[0][0] == "":
        fail("model: is itself an nn.MultiheadAttention, which cannot replace itself; unfuse the model holding it")
    new = {n: _split(m) for n, m in found}
    for n, m in found:
        _check_same(n, m, new[n])
    for n, _ in found:
        parent, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent), attr, new[n])
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return [n for n, _ in found]
