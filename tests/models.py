"""Architectures the surgery tests run on: each exercises one coupling rule."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow


class Block(nn.Module):
    """ResNet basic block with an identity skip: conv2's output joins the residual stream."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(Block(c), Block(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer1(x)
        return self.fc(x.mean(dim=(2, 3)))


class CatNet(nn.Module):
    """Two branches concatenated on channels, then a conv, a global pool and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 5, 1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        h = F.max_pool2d(torch.relu(self.c(self.bn(h))), 2)
        return self.fc(h.view(h.size(0), -1))


class TransformerBlock(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class TinyTransformer(nn.Module):
    """Token embedding -> two pre-LN MLP blocks with residuals -> LayerNorm -> head."""

    def __init__(self, vocab: int = 11, d: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(TransformerBlock(d, hidden), TransformerBlock(d, hidden))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.blocks(self.emb(idx))))


def conv_nd(nd: int, bias: bool = True) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    return nn.Sequential(conv(2, 3, 3, padding=1, bias=bias), bn(3), nn.ReLU(),
                         conv(3, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4**nd, 3, bias=bias))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the tokens as their own targets."""
    return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def lm_steps(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int = 1) -> None:
    """``steps`` optimizer steps of :func:`lm_loss`."""
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()


def lm_snapshots(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> list[nn.Module]:
    """One :func:`lm_steps` step per batch; the model as it was before each (for :func:`assert_adam_state_replays`)."""
    snaps = []
    for ids in batches:
        snaps.append(copy.deepcopy(model))
        lm_steps(model, opt, ids)
    return snaps


def assert_adam_state_replays(model: nn.Module, opt: torch.optim.Optimizer, snaps: list[nn.Module],
                              batches: list[torch.Tensor], growths: list[autogrow.Growth], lr: float) -> None:
    """Adam's moments carried through ``growths`` equal those a fresh Adam (``lr``) builds from the grown model's own
    gradient history: each snapshot, replayed through the growths, gives its batch's gradient (tests/test_optim.py's
    check, on a language model)."""
    replayed = [nn.Parameter(torch.zeros_like(p)) for p in model.parameters()]
    ref = torch.optim.Adam(replayed, lr=lr)
    for snap, ids in zip(snaps, batches):
        autogrow.replay(snap, growths)
        for p, grad in zip(replayed, torch.autograd.grad(lm_loss(snap, ids), list(snap.parameters()))):
            p.grad = grad
        ref.step()
    for (name, p), q in zip(model.named_parameters(), replayed):
        for k in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][k], ref.state[q][k]
            assert float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) <= 1e-6, f"{name}.{k}"


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


class Attention(nn.Module):
    """Multi-head self-attention written by hand: q/k/v/o Linears, heads from the tensor's size."""

    def __init__(self, d: int = 8, heads: int = 2, head_size: int = 3, sdpa: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, heads * head_size) for _ in range(3))
        self.o = nn.Linear(heads * head_size, d)
        self.head_size, self.sdpa = head_size, sdpa
        self.register_buffer("causal", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, -1, self.head_size).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * k.size(-1) ** -0.5
            att = att.masked_fill(self.causal[:, :, :T, :T] == 0, float("-inf")).softmax(dim=-1)
            y = att @ v
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-LN blocks (attention + MLP), tied-free head."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, head_size: int = 3, hidden: int = 12,
                 layers: int = 2, sdpa: bool = True) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads, head_size, hidden, sdpa) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, head_size: int, hidden: int, sdpa: bool) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads, head_size, sdpa), nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class RMSNorm(nn.Module):
    """An RMSNorm written by hand, as Llama's is (no ``normalized_shape``); autogrow needs it registered."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    """Llama's attention: bias-free q/k/v/o, rotary position embeddings on q and k (per head), causal SDPA.

    ``kv_heads`` < ``heads``: grouped-query attention, each key/value head serving ``heads // kv_heads`` query
    heads, repeated the way the code people use does: ``"expand"`` (Hugging Face's ``repeat_kv``: a new axis,
    expanded, merged into the heads), ``"interleave"`` (``repeat_interleave``) or ``"sdpa"`` (``enable_gqa=True``).
    """

    def __init__(self, d: int, heads: int, head_size: int, kv_heads: int | None = None, repeat: str = "expand"
                 ) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        self.q = nn.Linear(d, heads * head_size, bias=False)
        self.k, self.v = (nn.Linear(d, kv_heads * head_size, bias=False) for _ in range(2))
        self.o = nn.Linear(heads * head_size, d, bias=False)
        self.head_size, self.n_rep, self.repeat = head_size, heads // kv_heads, repeat
        freqs = torch.outer(torch.arange(16.0), 1.0 / 10000 ** (torch.arange(0, head_size, 2.0) / head_size))
        self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos())
        self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, -1, self.head_size).transpose(1, 2) for f in (self.q, self.k, self.v))
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        gqa = self.n_rep > 1 and self.repeat == "sdpa"
        if self.n_rep > 1 and self.repeat == "expand":
            k, v = (repeat_kv(t, self.n_rep) for t in (k, v))
        elif self.n_rep > 1 and self.repeat == "interleave":
            k, v = (t.repeat_interleave(self.n_rep, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's: (B, kv_heads, T, d) -> (B, kv_heads * n_rep, T, d), each key/value head n_rep times."""
    b, kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


class TinyLlama(nn.Module):
    """Llama-style: RMSNorm (hand-written), rotary attention, SwiGLU MLP, no position embedding."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, head_size: int = 4, hidden: int = 12,
                 layers: int = 2, kv_heads: int | None = None, repeat: str = "expand") -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads, head_size, hidden, kv_heads, repeat) for _ in range(layers))
        self.norm, self.head = RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class LlamaBlock(nn.Module):
    def __init__(self, d: int, heads: int, head_size: int, hidden: int, kv_heads: int | None = None,
                 repeat: str = "expand") -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.attn = RotaryAttention(d, heads, head_size, kv_heads, repeat)
        self.gate, self.up, self.down = (nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False),
                                         nn.Linear(hidden, d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))
