"""Transformers people actually train, written so that autogrow grows them exactly: a char-level GPT and a ViT.

* :class:`GPT`: a decoder-only language model (nanoGPT-sized): token + learned position embeddings, pre-LN
  blocks in an ``nn.ModuleList``, hand-written attention (separate q/k/v Linears, the number of heads read
  from the tensor with a FIXED head size, ``F.scaled_dot_product_attention(..., is_causal=True)``), a GELU
  MLP, a final LayerNorm and an untied head.
* :class:`ViT`: the same blocks (not causal) over 7x7 patches (reshape + Linear), mean pooling, a head.
* :class:`LMModule`: next-character cross-entropy, logs ``val_loss`` and counts training FLOPs;
  :class:`ViTClassifier`: :class:`~autogrow.experiments.models.Classifier` with attention FLOPs counted.
* :class:`CharDataModule`: characters of Python's own standard-library sources (no download).

Why these forwards grow exactly: the residual stream (embeddings, every ``o`` and ``fc2``) widens as one
tensor whose new units are orthogonal mixtures of the old ones (``init="mix"``: LayerNorm sees the same mean and
variance); the heads are whole ``head_size``
blocks of q/k/v (``view(B, T, -1, head_size)``), so widening q by whole heads adds heads; a stacked block
starts with its stream outputs (``o``, ``fc2``) at zero, the identity.

    >>> net = GPT(vocab=11, context=8, d=8, heads=2, head_size=4, hidden=16, layers=1)
    >>> net(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 11])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from autogrow.callbacks import GrowableMixin
from autogrow.experiments.models import Classifier
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from autogrow import num_params
from autogrow.shapes import eval_mode

__all__ = ["GPT", "Block", "CharDataModule", "LMModule", "SelfAttention", "ViT", "ViTClassifier",
           "forward_flops", "python_sources", "wsd_scheduler"]


class SelfAttention(nn.Module):
    """Multi-head self-attention: q/k/v/o Linears; heads = width / ``head_size``, read from the tensor.

        >>> SelfAttention(d=8, heads=2, head_size=4)(torch.zeros(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, d: int, heads: int, head_size: int, causal: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, heads * head_size) for _ in range(3))
        self.o = nn.Linear(heads * head_size, d)
        self.head_size, self.causal = head_size, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, -1, self.head_size).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, d: int, heads: int, head_size: int, hidden: int, causal: bool = True) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), SelfAttention(d, heads, head_size, causal)
        self.ln2, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Char-level decoder-only LM (the benchmark's sizes: :data:`autogrow.experiments.suite_transformers.TASKS`,
    the grown run starting at 1/4 of each of d_model, heads, MLP and depth)."""

    def __init__(self, vocab: int, context: int = 128, d: int = 128, heads: int = 4, head_size: int = 32,
                 hidden: int = 512, layers: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, head_size, hidden) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class ViT(nn.Module):
    """A small vision transformer: ``patch x patch`` patches (reshape + Linear), learned positions, the
    same pre-LN blocks (not causal), a final LayerNorm, mean pooling over patches, a linear head.

        >>> ViT(d=8, heads=2, head_size=4, hidden=16, layers=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, image_size: int = 28, patch: int = 7, channels: int = 1, classes: int = 10, d: int = 128,
                 heads: int = 4, head_size: int = 32, hidden: int = 512, layers: int = 4) -> None:
        super().__init__()
        self.side, self.patch, self.channels = image_size // patch, patch, channels
        self.embed = nn.Linear(channels * patch * patch, d)
        self.pos = nn.Embedding(self.side * self.side, d)
        self.blocks = nn.ModuleList(Block(d, heads, head_size, hidden, causal=False) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, s, p, c = x.shape[0], self.side, self.patch, self.channels
        patches = x.reshape(B, c, s, p, s, p).permute(0, 2, 4, 1, 3, 5).reshape(B, s * s, c * p * p)
        h = self.embed(patches) + self.pos(torch.arange(s * s, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h).mean(dim=1))


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


# torch's counter has no entry for the CPU kernel of scaled_dot_product_attention (it counts 0 there).
_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass of ``model`` on ``x`` (``torch.utils.flop_counter``, attention included,
    counted as dense: causal masking is not discounted), in eval mode and without gradients.

        >>> forward_flops(nn.Linear(4, 3), torch.zeros(2, 4))
        48.0
    """
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_ATTENTION)
    with counter, torch.no_grad(), eval_mode(model):
        model(x)
    return float(counter.get_total_flops())


def wsd_scheduler(optimizer: torch.optim.Optimizer, total: int, decay: float = 0.4) -> Any:
    """Warmup-free warmup-stable-decay: the LR held, then linearly to 0 over the last ``decay`` of ``total``
    steps (what ``Classifier(scheduler="wsd")`` does, and AutoGrow's default multiplier without growth).

        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> s = wsd_scheduler(opt, 10); [round(s.lr_lambdas[0](t), 2) for t in (0, 5, 6, 8, 10)]
        [1.0, 1.0, 1.0, 0.5, 0.0]
    """
    hold = (1 - decay) * total
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 1.0 if t < hold else max(0.0, (total - t) / max(1e-9, total - hold)))


class _CountsFlops:
    """Training FLOPs per sample, recounted whenever the parameter count (or the input shape) changes."""

    model: nn.Module
    _flops_key: tuple[int, tuple[int, ...]] | None = None
    _flops_per_sample: float = 0.0

    def count_flops(self, x: torch.Tensor) -> float:
        """Forward FLOPs for one sample of ``x``'s shape (cached until the parameter count changes)."""
        key = (num_params(self.model), tuple(x.shape[1:]))
        if key != self._flops_key:
            self._flops_key, self._flops_per_sample = key, forward_flops(self.model, x[:1])
        return self._flops_per_sample


class ViTClassifier(_CountsFlops, Classifier):
    """:class:`~autogrow.experiments.models.Classifier` whose FLOP count includes attention."""


class LMModule(_CountsFlops, GrowableMixin, pl.LightningModule):
    """Next-token cross-entropy on any ``(B, T) -> (B, T, vocab)`` model, AdamW.

    Logs ``train_loss``, ``val_loss``, ``train_flops`` (cumulative: 3x the forward FLOPs per training
    sample, counted at the size the model had at that step).

    Args:
        model: the network (not saved in hyper-parameters).
        lr, weight_decay, betas: AdamW's settings.
        scheduler: ``None`` (constant: AutoGrow's multiplier does the schedule) or ``"wsd"``.
        decay: the decay fraction of ``"wsd"``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.99), scheduler: str | None = None, decay: float = 0.4) -> None:
        super().__init__()
        if scheduler not in (None, "wsd"):
            raise ValueError(f"scheduler: {scheduler!r} is not one of (None, 'wsd')")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.train_flops = 0.0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.train_flops += 3 * self.count_flops(batch[0]) * len(batch[0])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> object:
        h = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        if h.scheduler is None:
            return opt
        sched = wsd_scheduler(opt, max(1, int(self.trainer.estimated_stepping_batches)), h.decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_flops"] = self.train_flops

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.train_flops = float(checkpoint.get("train_flops", 0.0))


def python_sources(max_bytes: int = 3_000_000, root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files directly in Python's standard-library folder (``root``), sorted by name, taken
    in order while their total stays within ``max_bytes`` (at least one).

        >>> all(p.suffix == ".py" for p in python_sources(100_000))
        True
    """
    files = sorted(Path(root or Path(os.__file__).parent).glob("*.py"))
    out, total = [], 0
    for f in files:
        size = f.stat().st_size
        if out and total + size > max_bytes:
            continue
        out.append(f)
        total += size
    return out


class _Windows(Dataset):
    """``(x, y)`` = ``data[i : i + T]``, ``data[i + 1 : i + T + 1]`` for a start index ``i``."""

    def __init__(self, data: torch.Tensor, context: int) -> None:
        self.data, self.context = data, context

    def __len__(self) -> int:
        return len(self.data) - self.context

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i: i + self.context], self.data[i + 1: i + self.context + 1]


class _RandomStarts(Sampler[int]):
    """``count`` random window starts in ``[0, n)``, depending only on (seed, epoch) (Lightning sets the epoch)."""

    def __init__(self, n: int, count: int, seed: int) -> None:
        self.n, self.count, self.seed, self.epoch = n, count, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randint(0, self.n, (self.count,), generator=g).tolist())

    def __len__(self) -> int:
        return self.count


class CharDataModule(pl.LightningDataModule):
    """Characters of Python's standard-library sources (:func:`python_sources`): no download.

    Every ``val_every``-th file (a fixed selection) is the validation split, the others the training
    split; the vocabulary is the training split's characters plus one id for characters it lacks. An
    "epoch" is ``steps_per_epoch`` batches of random contiguous windows (seeded by ``seed`` and the
    epoch); validation is ``val_windows`` fixed windows spread evenly over the validation text.

        >>> dm = CharDataModule(context=16, batch_size=4, steps_per_epoch=3, max_bytes=60_000)
        >>> x, y = next(iter(dm.train_dataloader())); x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        (torch.Size([4, 16]), True)
    """

    def __init__(self, context: int = 128, batch_size: int = 32, steps_per_epoch: int = 50, val_windows: int = 128,
                 max_bytes: int = 3_000_000, val_every: int = 10, seed: int = 0, root: str | None = None) -> None:
        super().__init__()
        self.context, self.batch_size, self.steps_per_epoch = context, batch_size, steps_per_epoch
        self.val_windows, self.max_bytes, self.val_every, self.seed, self.root = \
            val_windows, max_bytes, val_every, seed, root
        self.chars: list[str] = []
        self.train_data: torch.Tensor | None = None
        self.val_data: torch.Tensor | None = None
        self.files: list[Path] = []

    @property
    def vocab_size(self) -> int:
        """Characters of the training split, plus the unknown-character id."""
        self.setup()
        return len(self.chars) + 1

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        self.files = python_sources(self.max_bytes, self.root)
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in self.files]
        is_val = [i % self.val_every == self.val_every - 1 for i in range(len(texts))]
        train = "\n".join(t for t, v in zip(texts, is_val) if not v)
        val = "\n".join(t for t, v in zip(texts, is_val) if v) or train[-len(train) // 10:]
        self.chars = sorted(set(train))
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = len(self.chars)
        self.train_data, self.val_data = (torch.tensor([index.get(c, unknown) for c in t], dtype=torch.long)
                                          for t in (train, val))

    def describe(self) -> dict[str, Any]:
        """What the data is: files, characters, vocabulary (for the results files)."""
        self.setup()
        return {"files": len(self.files), "first": self.files[0].name, "last": self.files[-1].name,
                "train_chars": len(self.train_data), "val_chars": len(self.val_data), "vocab": self.vocab_size,
                "source": str(self.files[0].parent)}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        data = _Windows(self.train_data, self.context)
        return DataLoader(data, batch_size=self.batch_size,
                          sampler=_RandomStarts(len(data), self.steps_per_epoch * self.batch_size, self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        starts = torch.linspace(0, len(self.val_data) - self.context - 1, self.val_windows).long()
        idx = starts[:, None] + torch.arange(self.context + 1)
        windows = self.val_data[idx]
        return DataLoader(TensorDataset(windows[:, :-1], windows[:, 1:]), batch_size=64)
