"""A Parameter tied between a writer and a reader of the widened units: a language model's token embedding and
its output layer (``lm_head.weight = wte.weight``).

Widening the residual stream draws the embedding's new columns (the new units' values) and would give the output
layer zero new columns (its new inputs must not change the logits): two transforms of one tensor. Where the output
layer reads the stream only through a norm (the final LayerNorm or RMSNorm) whose output goes nowhere else, the
norm's new scale and shift entries start dark instead of neutral (at zero, or at the value its ``ChannelSpec.dark``
names: -1 for Gemma's ``x * (1 + weight)``): its new outputs are zero whatever the stream holds, so the output
layer's new columns may be anything, and the one tensor takes the embedding's transform. The norm's old outputs are
unchanged (its statistics are kept by the initialiser, as for any norm), so the model computes the same function;
the new columns of the logits start dark and learn through the norm's scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx
import torch.nn as nn

from autogrow.coupling import Coupling
from autogrow.ops import Linearity, OpKind, classify
from autogrow.registry import channel_spec

if TYPE_CHECKING:
    from autogrow.widen import TensorChange

__all__ = ["free_tied_readers"]


def free_tied_readers(model: nn.Module, c: Coupling, graph: fx.Graph, changes: dict[str, TensorChange]) -> None:
    """Give a tied tensor's reader the writer's transform where a norm can darken the reader's new inputs (the
    norm's new entries are filled with their dark value). Call only for initialisers whose new units are all fresh
    (mixtures, zero_out), where the fill is what the norm's new entries get. Changes ``changes`` in place; a tie it
    cannot resolve is left as it is, for :func:`autogrow.widen.tie_changes` to refuse by name.

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> class LM(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb, self.ln, self.head = nn.Embedding(11, 4), nn.LayerNorm(4), nn.Linear(4, 11, bias=False)
        ...         self.head.weight = self.emb.weight
        ...     def forward(self, idx):
        ...         return self.head(self.ln(self.emb(idx)))
        >>> lm, idx = LM(), torch.arange(6).view(2, 3)
        >>> before = lm(idx)
        >>> _ = autogrow.widen(lm, "emb", 8, init="mix", generator=0)
        >>> lm.head.weight is lm.emb.weight, bool(torch.allclose(lm(idx), before, atol=1e-5))
        (True, True)
    """
    by_tensor: dict[int, list[TensorChange]] = {}
    for ch in changes.values():
        by_tensor.setdefault(id(getattr(model.get_submodule(ch.module), ch.tensor)), []).append(ch)
    for group in by_tensor.values():
        readers = [ch for ch in group if all(t.role == "in" for t in ch.transforms)]
        writers = [ch for ch in group if all(t.role == "out" for t in ch.transforms)]
        if not readers or not writers or len(readers) + len(writers) < len(group):
            continue
        norms = [_dark_norm(model, c, graph, ch.module) for ch in readers]
        fills = [[changes.get(f"{n}.{t}") for t in ("weight", "bias")] if n else [] for n in norms]
        if not all(norms) or not all(f[0] is not None and f[0].fill is not None for f in fills):
            continue  # a reader fed otherwise, or a norm without a scale: tie_changes refuses
        for ch in readers:
            ch.transforms = list(writers[0].transforms)
        for n, f in zip(norms, fills):
            dark = channel_spec(model.get_submodule(n)).dark  # type: ignore[arg-type, union-attr]
            for ch in f:
                if ch is not None:
                    ch.fill = dark.get(ch.tensor, 0.0)


def _passes_zeros(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` maps a zero feature of its first argument to a zero feature (views, indexing, dropout)."""
    op = classify(node, model)
    return op.kind in (OpKind.LAYOUT, OpKind.ELEMENTWISE) and op.linear is Linearity.JOINT


def _dark_norm(model: nn.Module, c: Coupling, graph: fx.Graph, reader: str) -> str | None:
    """The one channel-wise layer of ``c`` that every call of ``reader`` reads through zero-passing ops, if its
    output reaches nothing but readers of the widened units (else ``None``)."""
    found = set()
    for call in (n for n in graph.nodes if n.op == "call_module" and n.target == reader):
        node = call.args[0] if call.args else None
        while isinstance(node, fx.Node) and node.op != "call_module" and node.args and _passes_zeros(node, model):
            node = node.args[0]
        if not (isinstance(node, fx.Node) and node.op == "call_module" and node.target in c.channelwise):
            return None
        found.add(node)
    if len({n.target for n in found}) != 1 or not all(_only_readers(n, c, model) for n in found):
        return None
    return str(next(iter(found)).target)


def _only_readers(node: fx.Node, c: Coupling, model: nn.Module) -> bool:
    """Whether every use of ``node``'s output, through zero-passing ops, is a layer reading the widened units."""
    for user in node.users:
        if user.op == "call_module" and user.target in c.consumers and user.args and user.args[0] is node:
            continue
        if classify(user, model).kind is OpKind.SHAPE:  # x.size(-1): reads no values
            continue
        if user.op == "call_module" or not user.args or user.args[0] is not node or not _passes_zeros(user, model):
            return False
        if not _only_readers(user, c, model):
            return False
    return True
