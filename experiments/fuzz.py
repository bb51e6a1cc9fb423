"""Fuzzing the surgery: random architectures x random growth sequences; nothing may be silently wrong.

Each case builds a random network (an MLP, a token model on ``(B, T, C)``, a CNN, or a token model on ids with
a tied output layer, in half of them GPT-2's shape: residual blocks and a final LayerNorm) from blocks that
include the constructs that once grew wrongly: sizes read from tensors (``x / x.size(-1)``,
``b, t, c = x.shape`` and reshapes with them, splitting the units into heads, counted in the code or in an
attribute), ``BatchNorm1d`` on 3-D input,
concatenations in keyword form and along other axes, tied weights, residual streams, fused projections split
into equal parts (chunk, split by a size read or kept in an attribute, a reshape into (parts, heads, size)
unbound, the heads counted with -1 or kept in an attribute: autogrow rewrites such attributes),
grouped-query attention (key/value heads repeated for their query heads as Hugging Face's ``repeat_kv`` does, by
``repeat_interleave``, or by SDPA's ``enable_gqa``; Falcon's fused groups of query heads, key and value, broadcast
and flattened), flatten,
pooling over tokens, LayerNorm, RMSNorm (torch's, and one written by hand as Llama's is, registered as
``nn.RMSNorm``) and every activation; one network in five branches on its input's value, which
torch.fx cannot trace (autogrow then traces what the forward runs). Then it widens or deepens random layers,
with and without example inputs, and classifies every operation:

* ``exact``: no error, the output is unchanged (<= 1e-9 relative in float64) and a training step runs;
* ``refused``: an ``AutogrowError``, with the model (its int attributes too) and optimizer byte-identical;
* ``silently wrong`` / ``broken`` / ``foreign exception`` / ``dirty refusal``: failures.

    python -m autogrow.experiments.fuzz --cases 5000
"""

from __future__ import annotations

import argparse
import random
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.actions import width_of
from autogrow.shapes import eval_mode

__all__ = ["Draw", "Outcome", "build", "run_case"]

ACTS: dict[str, Any] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky": nn.LeakyReLU, "elu": nn.ELU,
    "sigmoid": nn.Sigmoid, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "mish": nn.Mish, "f.relu": F.relu,
    "f.gelu": F.gelu, "torch.tanh": torch.tanh, "method.relu": "relu",
}
BAD = ("silently wrong", "broken", "foreign exception", "dirty refusal")
WIDEN_INITS = ("net2wider", "mix", "ramp", "fade", "auto")  # the initialisers a widening draws


class OwnRMSNorm(nn.Module):
    """An RMSNorm written by hand, as Llama's is (its eps under a name of its own, no ``normalized_shape``),
    registered as ``nn.RMSNorm`` below, as a user would."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


autogrow.register_channelwise(OwnRMSNorm, autogrow.registry.channel_spec(nn.RMSNorm(1)))
NORMS: dict[str, type[nn.Module]] = {"ln": nn.LayerNorm, "rms": nn.RMSNorm, "rms_own": OwnRMSNorm}


class Draw(Protocol):
    """Where random choices come from (``random.Random`` in the benchmark, hypothesis in the tests)."""

    def choice(self, options: Sequence[Any]) -> Any: ...

    def integer(self, low: int, high: int) -> int: ...


class RandomDraw:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choice(self, options: Sequence[Any]) -> Any:
        return self.rng.choice(list(options))

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)


def activate(x: torch.Tensor, act: Any) -> torch.Tensor:
    if isinstance(act, str):
        return getattr(x, act)()
    return act(x)


class Block(nn.Module):
    """One drawn block: ``kind`` selects the forward; layers are created as needed."""

    def __init__(self, kind: str, w: int, out: int, act: str, draw: Draw, tokens: int) -> None:
        super().__init__()
        self.kind, self.act_name, self.width_out = kind, act, out
        self.tokens_out = 2 * tokens if kind == "cat_other" else tokens + 1 if kind == "bare" and tokens else tokens
        act_obj = ACTS[act]
        self.act = act_obj() if isinstance(act_obj, type) else None
        self._fn = None if self.act is not None else act_obj
        if kind in ("dense", "scale", "roundtrip", "heads", "bare"):
            self.fc = nn.Linear(w, out, bias=bool(draw.integer(0, 1)))
        if kind == "heads":  # 2 heads: written in the code, or kept in an attribute (rewritten by a growth)
            self.n_split, self.split_how = 2, draw.choice(["literal", "attr"])
        if kind == "bare":  # bare Parameters on the widened tensor: LayerScale; on tokens a class token and positions
            self.gamma = nn.Parameter(torch.randn(out))
            self.cls = nn.Parameter(torch.randn(1, 1, out)) if tokens else None
            self.pos = nn.Parameter(torch.randn(tokens + 1, out)) if tokens else None
        if kind == "bn":  # on tokens, BatchNorm1d normalises the T axis: the trap
            self.fc = nn.Linear(w, out)
            self.bn = nn.BatchNorm1d(tokens if tokens else out)
        if kind in NORMS:
            self.fc, self.ln = nn.Linear(w, out), NORMS[kind](out)
        if kind == "residual":
            self.fc1, self.fc2 = nn.Linear(w, draw.integer(1, 6)), None
            self.fc2 = nn.Linear(self.fc1.out_features, w)
        if kind in ("cat", "cat_kw"):
            a = draw.integer(1, 5)
            self.a, self.b = nn.Linear(w, a), nn.Linear(w, max(1, out - a))
            self.width_out = a + max(1, out - a)
        if kind == "cat_other":
            self.a, self.b = nn.Linear(w, out), nn.Linear(w, out)
        if kind == "tied":
            self.a, self.b = nn.Linear(w, out), nn.Linear(w, out)
            self.b.weight = self.a.weight
        if kind == "fused":  # one layer, two equal parts (a gate and a value; q and k), split in one of five ways
            self.fc = nn.Linear(w, 2 * out)
            self.how = draw.choice(["chunk", "split_size", "split_const", "heads", "heads_attr"])
            self.n_heads = out // 2  # heads_attr: timm's self.num_heads (autogrow.bound rewrites it)
        if kind == "falcon":  # Falcon's fused qkv: 1-2 key/value groups of 1-2 query heads, a key, a value (of 2)
            self.n_kv, group = draw.integer(1, 2), draw.integer(1, 2)
            self.n_heads, self.group_from = self.n_kv * group, draw.choice(["heads", "attr"])
            self.group = group
            self.qkv, self.o = nn.Linear(w, self.n_kv * (group + 2) * 2), nn.Linear(self.n_heads * 2, out)
        if kind == "rope":  # attention, heads of 4: q and k normalised per head, rotary on their first 2 entries
            self.n_heads, self.rot = draw.integer(1, 2), draw.choice(["none", "half", "interleaved"])
            self.q, self.k, self.v = (nn.Linear(w, 4 * self.n_heads) for _ in range(3))
            self.o, norm = nn.Linear(4 * self.n_heads, out), draw.choice(["none", *NORMS])
            self.whole = bool(draw.integer(0, 1))  # the norm over the whole projection (OLMo-2), not per head
            size = 4 * self.n_heads if self.whole else 4
            self.q_norm, self.k_norm = (NORMS[norm](size), NORMS[norm](size)) if norm != "none" else (None, None)
            angles = torch.outer(torch.arange(16.0), torch.tensor([1.0, 0.5]))
            self.register_buffer("cos", angles.cos())
            self.register_buffer("sin", angles.sin())
        if kind == "mqa":  # GPTBigCode's c_attn: 1-3 query heads of 2, one key and one value head, split unequally
            n, self.how = draw.integer(1, 3), draw.choice(["expand", "sdpa", "sdpa_count", "literal"])
            self.q_size, self.sizes = 2 * n, (2 * n, 2, 2)  # read from an attribute (rewritten), or a literal
            self.c_attn, self.o = nn.Linear(w, 2 * n + 4), nn.Linear(2 * n, out)
            if self.how == "expand":
                self.n_rep = n  # repeat_kv's count, rewritten to the new number of query heads
            if self.how == "sdpa_count":
                self.num_key_value_groups = n  # kept, never read: refused by name
        if kind == "gqa":  # attention, heads of 2: 1-2 key/value heads, each serving 1-3 query heads
            kv, self.n_rep = 2 * draw.integer(1, 2), draw.integer(1, 3)
            self.q, self.k, self.v = nn.Linear(w, kv * self.n_rep), nn.Linear(w, kv), nn.Linear(w, kv)
            self.o, self.how = nn.Linear(kv * self.n_rep, out), draw.choice(["expand", "interleave", "sdpa"])

    def nonlin(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.act is not None else activate(x, self._fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "dense":
            return self.nonlin(self.fc(x))
        if k == "bn":
            return self.nonlin(self.bn(self.fc(x)))
        if k in NORMS:
            return self.nonlin(self.ln(self.fc(x)))
        if k == "scale":
            h = self.nonlin(self.fc(x))
            return h / h.size(-1)
        if k == "bare":
            h = self.nonlin(self.fc(x)) * self.gamma
            if self.cls is not None:
                h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
            return h
        if k == "roundtrip":
            h = self.nonlin(self.fc(x))
            b, t, c = h.shape
            return h.reshape(b * t, c).view(b, t, c)
        if k == "heads":
            h = self.fc(x)
            b, t, d = h.shape
            n = self.n_split if self.split_how == "attr" else 2
            return self.nonlin(h.view(b, t, n, d // n).flip(2).reshape(b, t, d))
        if k == "residual":
            return x + self.fc2(self.nonlin(self.fc1(x)))
        if k == "cat":
            return self.nonlin(torch.cat([self.a(x), self.b(x)], dim=-1))
        if k == "cat_kw":
            return self.nonlin(torch.cat(tensors=[self.a(x), self.b(x)], dim=-1))
        if k == "cat_other":  # along the tokens: an element-wise merge, not a feature concat
            return self.nonlin(torch.cat([self.a(x), self.b(x)], dim=1))
        if k == "tied":
            return self.nonlin(self.a(x) + self.b(2 * x))
        if k == "fused":
            return self.fused(self.fc(x))
        if k == "gqa":
            return self.nonlin(self.attend(x))
        if k == "rope":
            return self.nonlin(self.rotary(x))
        if k == "falcon":
            return self.nonlin(self.falcon(x))
        if k == "mqa":
            return self.nonlin(self.multi_query(x))
        raise AssertionError(k)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.how == "expand":  # Hugging Face's repeat_kv
            bb, kv, tt, d = k.shape
            k, v = (y[:, :, None, :, :].expand(bb, kv, self.n_rep, tt, d).reshape(bb, kv * self.n_rep, tt, d)
                    for y in (k, v))
        elif self.how == "interleave":
            k, v = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.how == "sdpa")
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def multi_query(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        sizes = self.sizes if self.how == "literal" else (self.q_size, 2, 2)
        q, k, v = self.c_attn(x).unsqueeze(1).split(sizes, dim=3)
        q = q.view(b, t, -1, 2).transpose(1, 2)
        if self.how == "expand":
            k, v = (y[:, :, None].expand(b, 1, self.n_rep, t, 2).reshape(b, self.n_rep, t, 2) for y in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.how != "expand")
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def rotary(self, x: torch.Tensor) -> torch.Tensor:
        """Qwen3's per-head norms (or OLMo-2's over the whole projection) and Phi's or GPT-J's rotary on part of each
        head (half-split or interleaved)."""
        b, t, _ = x.shape
        q, k, v = (f(x) for f in (self.q, self.k, self.v))
        if self.q_norm is not None and self.whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(b, t, -1, 4) for y in (q, k, v))
        if self.q_norm is not None and not self.whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        if self.rot != "none":
            q, k = self.rope(q), self.rope(k)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def rope(self, y: torch.Tensor) -> torch.Tensor:
        rot, keep = y[..., :2], y[..., 2:]
        if self.rot == "half":
            turn = torch.cat((-rot[..., 1:], rot[..., :1]), dim=-1)
        else:
            turn = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
        t = y.shape[-2]
        return torch.cat((rot * self.cos[:t] + turn * self.sin[:t], keep), dim=-1)

    def falcon(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped heads as Falcon writes them: sizes from attributes (``n_heads // n_kv``, or one of its own)."""
        b, t, _ = x.shape
        group = self.n_heads // self.n_kv if self.group_from == "heads" else self.group
        qkv = self.qkv(x).view(b, t, -1, group + 2, 2)
        q = qkv[:, :, :, :-2]
        k, v = (torch.broadcast_to(qkv[:, :, :, [i]], q.shape) for i in (-2, -1))
        q, k, v = (y.flatten(2, 3).transpose(1, 2).reshape(b, self.n_heads, t, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)
        return self.o(y.reshape(b, t, self.n_heads * 2))

    def fused(self, h: torch.Tensor) -> torch.Tensor:
        if self.how in ("heads", "heads_attr"):  # timm's qkv: (B, T, parts, heads, size), the parts unbound
            b, t, _ = h.shape
            gate, value = h.reshape(b, t, 2, self.n_heads if self.how == "heads_attr" else -1, 2).unbind(2)
            return (self.nonlin(gate) * value).flatten(2)
        if self.how == "chunk":
            gate, value = h.chunk(2, dim=-1)
        else:  # by a size read from the tensor, or held in an attribute (GPT-2's self.split_size: rewritten)
            gate, value = h.split(h.size(-1) // 2 if self.how == "split_size" else self.width_out, dim=-1)
        return self.nonlin(gate) * value


class Net(nn.Module):
    """The drawn network: an input stage per mode, the blocks, a head."""

    def __init__(self, mode: str, blocks: list[Block], w_in: int, w: int, classes: int, tied: bool,
                 pool: str, branch: bool = False, final_norm: str | None = None) -> None:
        super().__init__()
        self.mode, self.pool, self.branch = mode, pool, branch
        self.norm, self.norm_kind = (NORMS[final_norm](w) if final_norm else None), final_norm
        if mode == "image":
            self.conv1, self.bn1 = nn.Conv2d(2, w_in, 3, padding=1), nn.BatchNorm2d(w_in)
            self.conv2 = nn.Conv2d(w_in, w_in, 3, padding=1)
        if mode == "ids":
            self.emb = nn.Embedding(classes, w_in)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(w, classes, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch and bool(x.abs().sum() < 0):  # never taken; torch.fx cannot trace it: traced by running
            x = -x
        if self.mode == "image":
            h = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
            h = torch.relu(self.conv2(h))
            x = h.mean((2, 3)) if self.pool == "mean" else h.flatten(1)
        if self.mode == "ids":
            x = self.emb(x)
        h = self.blocks(x)
        if self.norm is not None:
            h = self.norm(h)
        if self.mode in ("tokens", "ids") and self.pool == "mean":
            h = h.mean(dim=1)
        return self.head(h)


@dataclass
class Outcome:
    """What one growth operation did."""

    kind: str  # "exact", "refused", or one of BAD
    op: str
    detail: str = ""
    blocks: list[str] = field(default_factory=list)


def build(draw: Draw) -> tuple[nn.Module, torch.Tensor]:
    """A random float64 network and a batch for it."""
    mode = draw.choice(["flat", "tokens", "image", "ids"])
    tokens = 4 if mode in ("tokens", "ids") else 0
    kinds = ["dense", "bn", *NORMS, "residual", "cat", "cat_kw", "tied", "scale", "bare"]
    if mode in ("tokens", "ids"):
        kinds += ["roundtrip", "heads", "cat_other", "fused", "gqa", "falcon", "rope", "mqa"]
    pool = draw.choice(["mean", "none"]) if mode != "flat" else "none"
    w_in = draw.integer(2, 6)
    classes, w = 5, w_in
    w = w_in * 16 if mode == "image" and pool == "none" else w_in  # a 4x4 image after pooling, flattened
    blocks = []
    for _ in range(draw.integer(1, 3)):
        kind = draw.choice(kinds)
        out = w if kind == "residual" else 2 * draw.integer(1, 4)
        blocks.append(Block(kind, w, out, draw.choice(list(ACTS)), draw, tokens))
        w, tokens = blocks[-1].width_out, blocks[-1].tokens_out
    tied = mode == "ids" and bool(draw.integer(0, 1))
    final_norm = draw.choice(list(NORMS)) if tied and bool(draw.integer(0, 1)) else None
    if final_norm:  # GPT-2's shape: residual blocks on the embedding's width, a final norm, the tied head
        blocks = [Block("residual", w_in, w_in, draw.choice(list(ACTS)), draw, 4) for _ in range(draw.integer(1, 2))]
        w = w_in
    elif tied:  # the head shares the embedding's weight: the last block returns to the embedding's width
        blocks.append(Block("dense", w, w_in, draw.choice(list(ACTS)), draw, tokens))
        w = w_in
    model = Net(mode, blocks, w_in, w, classes, tied, pool, branch=draw.integer(0, 4) == 0,
                final_norm=final_norm).double()
    gen = torch.Generator().manual_seed(draw.integer(0, 2**20))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # statistics a wrong copy would show
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    shape = {"flat": (6, w_in), "tokens": (6, 4, w_in), "image": (6, 2, 8, 8)}.get(mode)
    x = torch.randint(0, classes, (6, 4), generator=gen) if mode == "ids" else \
        torch.randn(shape, generator=gen, dtype=torch.float64)
    return model, x


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple:
    ints = [(n, k, type(v).__name__, int(v)) for n, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, int)]  # sizes in attributes (autogrow.bound): a refusal leaves them as they were
    return (repr(model), [(k, v.clone()) for k, v in model.state_dict(keep_vars=True).items()],
            [id(p) for p in model.parameters()], repr(opt.state_dict()), ints)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[4] == b[4] and len(a[1]) == len(b[1]) and all(
        ka == kb and va.shape == vb.shape and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a[1], b[1]))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        return model(x)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite loss")


def _operation(model: nn.Module, draw: Draw, x: torch.Tensor) -> tuple[str, dict[str, Any]]:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    target = draw.choice(names)
    kw: dict[str, Any] = {"generator": draw.integer(0, 999)}
    if draw.integer(0, 2):
        kw["example_inputs"] = x
    if isinstance(model.get_submodule(target), nn.Embedding) or draw.integer(0, 2):
        m = model.get_submodule(target)
        n = width_of(m)
        kw.update(width=n * draw.choice([2, 3]) if draw.integer(0, 1) else n + draw.integer(1, 4),
                  split=draw.choice([0.0, 0.3]), init=draw.choice(WIDEN_INITS))
        if kw["init"] in ("ramp", "fade") or (kw["init"] == "auto" and draw.integer(0, 1)):
            kw["ramp_steps"] = draw.integer(1, 3)  # short: the case's later operations meet ramps midway and ended
        return f"widen {target} init={kw['init']}", {"target": target, **kw}
    kw.update(residual=draw.choice([None, True, False]), batch_norm=bool(draw.integer(0, 3) == 0))
    return f"deepen {target}", {"after": target, **kw}


def run_op(model: nn.Module, opt: torch.optim.Optimizer, draw: Draw, x: torch.Tensor) -> Outcome:
    """One random growth of ``model``, classified."""
    name, kw = _operation(model, draw, x)
    blocks = [b.kind for b in model.blocks] if hasattr(model, "blocks") else []
    blocks += ["(traced by running it)"] if getattr(model, "branch", False) else []
    norm = getattr(model, "norm_kind", None)
    blocks += [f"(tied head after a final {norm})"] if norm else []
    before, ref = _state(model, opt), _outputs(model, x)
    try:
        if name.startswith("widen"):
            autogrow.widen(model, kw.pop("target"), kw.pop("width"), optimizer=opt, **kw)
        else:
            autogrow.deepen(model, kw.pop("after"), optimizer=opt, **kw)
    except autogrow.AutogrowError as e:
        ok = _same(before, _state(model, opt))
        return Outcome("refused" if ok else "dirty refusal", name, str(e)[:300], blocks)
    except Exception as e:  # noqa: BLE001 - classified, not swallowed
        return Outcome("foreign exception", name, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}", blocks)
    try:
        out = _outputs(model, x)
    except Exception as e:  # noqa: BLE001
        return Outcome("broken", name, f"forward raised {type(e).__name__}: {e}", blocks)
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if out.shape == ref.shape else 1.0
    if err > 1e-9:
        return Outcome("silently wrong", name, f"relative error {err:.3g}", blocks)
    try:
        _step(model, opt, x)
    except Exception as e:  # noqa: BLE001
        return Outcome("broken", name, f"training step raised {type(e).__name__}: {e}", blocks)
    return Outcome("exact", name, "", blocks)


def run_case(draw: Draw, ops: int = 4) -> list[Outcome]:
    """Build a network, take one optimizer step, then ``ops`` random growths (a failure ends the case), the norms'
    ramps (and readers' fades) advanced by 0-2 steps after each."""
    model, x = build(draw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, opt, x)
    out, step = [], 0
    for _ in range(ops):
        out.append(run_op(model, opt, draw, x))
        if out[-1].kind in BAD:
            break
        step += draw.integer(0, 2)
        autogrow.advance_ramps(model, step)
    return out


def report(outcomes: list[Outcome], cases: int, seconds: float) -> str:
    counts = Counter(o.kind for o in outcomes)
    by_block: Counter = Counter()
    for o in outcomes:
        for b in set(o.blocks):
            by_block[(b, o.kind)] += 1
    kinds = ["exact", "refused", *BAD]
    lines = [f"### Surgery fuzz: {cases} random networks, {len(outcomes)} growth operations ({seconds:.0f} s)\n",
             "| outcome | operations |", "|---|---|"] + [f"| {k} | {counts[k]} |" for k in kinds]
    blocks = sorted({b for b, _ in by_block})
    lines += ["", "Operations on networks containing each block:", "",
              "| block | " + " | ".join(kinds[:2]) + " | failures |", "|---|---|---|---|"]
    lines += [f"| {b} | {by_block[(b, 'exact')]} | {by_block[(b, 'refused')]} | "
              f"{sum(by_block[(b, k)] for k in BAD)} |" for b in blocks]
    by_op = Counter((o.op.split(" init=")[1] if " init=" in o.op else "deepen", o.kind) for o in outcomes)
    lines += ["", "Operations by kind (widen: by initialiser):", "", "| operation | exact | refused | failures |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {by_op[(k, 'exact')]} | {by_op[(k, 'refused')]} | {sum(by_op[(k, b)] for b in BAD)} |"
              for k in (*WIDEN_INITS, "deepen")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown report (default experiments/results/fuzz.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, outcomes = time.perf_counter(), []
    for case in range(args.cases):
        outcomes += run_case(RandomDraw(args.seed * 1_000_003 + case))
    text = report(outcomes, args.cases, time.perf_counter() - t0)
    bad = [o for o in outcomes if o.kind in BAD]
    for o in bad[:10]:
        text += f"\n\n- {o.kind}: {o.op} on {o.blocks}: {o.detail}"
    out = Path(args.out or Path(__file__).parent / "results" / "fuzz.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + f"\n\n_Measured {time.strftime('%Y-%m-%d')}, torch {torch.__version__}._\n")
    print(text)
    return dict(Counter(o.kind for o in outcomes))


if __name__ == "__main__":
    main()
