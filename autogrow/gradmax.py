"""GradMax (Evci et al. 2022): point fresh units' incoming weights where the loss wants new features.

A widening with fresh units (``init="zero_out"``) gives them zero outgoing weights, so the function is the same
whatever their incoming weights are: those can be chosen from data. The gradient on fresh unit j's outgoing
weights is ``sum_b delta_b phi(w_j . a_b)`` (``delta``: the gradient at the consumers' outputs, ``a``: the
producer's input); with ``phi`` linearised it is ``M w_j`` with ``M = sum_b delta_b a_b^T``, largest along M's top
right singular vectors. GradMax sets the fresh rows to those directions (orthonormal, scaled to the old rows' mean
norm): the new units start where the gradient is largest instead of on random directions, which on the Fashion
MLP let late units learn more (see the README). ``M`` needs only tensors that exist before the growth.

Supported: one ``Linear`` producer whose fresh units reach ``Linear`` consumers through element-wise ops only;
anything else is refused, naming what is in the way.

    >>> import torch, torch.nn as nn, autogrow
    >>> net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    >>> x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    >>> g = autogrow.widen(net, "0", 8, init="zero_out", generator=0)
    >>> before = net(x)
    >>> gradmax(net, g, x, lambda out: nn.functional.cross_entropy(out, y))
    >>> bool((net(x) - before).abs().max() < 1e-6), net[0].weight.grad is None
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from autogrow.errors import fail
from autogrow.growth import Growth
from autogrow.shapes import as_args

__all__ = ["FreshRows", "GradMaxCapture", "fresh_rows", "gradmax"]


@dataclass(frozen=True)
class FreshRows:
    """The producer whose ``rows`` are fresh units, and the consumers whose matching input columns are zero."""

    producer: str
    rows: torch.Tensor
    consumers: tuple[str, ...]


def fresh_rows(model: nn.Module, growth: Growth) -> FreshRows:
    """Where GradMax acts for ``growth`` (a widening of ``model``), or an ``AutogrowError`` saying why it cannot."""
    what = f"gradmax: the widening of {growth.target!r}"
    if growth.kind != "widen":
        fail(f"{what} is a {growth.kind!r}: GradMax re-points the fresh units of a widening")
    if growth.buffers:
        fail(f"{what} also resizes the buffers {growth.buffers}: GradMax supports a Linear producer reaching Linear "
             "consumers through element-wise ops only")
    out, cons = {}, []
    for name, transforms in growth.params.items():
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        for t in transforms:
            ok = isinstance(module, nn.Linear) and t.block == 1 and (
                (t.role == "out" and t.dim == 0) or (t.role == "in" and t.dim == 1 and pname == "weight"))
            if not ok:
                fail(f"{what}: {module_name!r} ({type(module).__name__}) holds the widened units on dim {t.dim} of "
                     f"{pname!r} (role {t.role!r}); GradMax supports a Linear producer reaching Linear consumers "
                     "through element-wise ops only")
            if t.role == "out":
                out.setdefault(module_name, t.map)
            else:
                cons.append((module_name, t.map))
    if len(out) != 1:
        fail(f"{what} has {len(out)} producers ({sorted(out)}); GradMax needs exactly one")
    (producer, map_name), = out.items()
    if any(m != map_name for _, m in cons):
        fail(f"{what}: its consumers see the units through another mapping (a concatenation); GradMax needs one")
    if growth.maps[map_name].mix is not None:  # their rows are tied to the old ones: re-pointing them is not exact
        fail(f"{what} added mixtures of the old units (init='mix'), not free rows; use init='zero_out'")
    rows = torch.nonzero(growth.maps[map_name].fresh).flatten()
    if not len(rows):
        fail(f"{what} added no fresh units (init={growth.options.get('init')!r}); use init='zero_out'")
    return FreshRows(producer, rows, tuple(dict.fromkeys(c for c, _ in cons)))


@dataclass
class GradMaxCapture:
    """Accumulates ``M`` over the model's forward/backward passes while attached (hooks: the producer's input,
    the gradient at each consumer's output), then :meth:`apply` sets the fresh rows. Parameters' ``.grad`` are
    not touched. ``on_backward=False``: the consumers' outputs are kept in :attr:`outputs` instead, for a caller
    that differentiates them itself (:func:`gradmax`)."""

    model: nn.Module
    target: FreshRows
    on_backward: bool = True
    matrix: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _input: torch.Tensor | None = field(default=None, repr=False)
    misaligned: str | None = None  # why M cannot be formed (the units' rows do not line up with the input's)

    def attach(self) -> GradMaxCapture:
        producer = self.model.get_submodule(self.target.producer)
        self._handles.append(producer.register_forward_pre_hook(self._keep_input))
        for name in self.target.consumers:
            self._handles.append(self.model.get_submodule(name).register_forward_hook(self._watch(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._input = None

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        self._input = args[0].detach()

    def _watch(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self._input is None or not out.requires_grad:
                return
            if out.shape[:-1] != self._input.shape[:-1]:  # reported by apply, not raised inside a forward
                self.misaligned = (f"gradmax: the output {tuple(out.shape)} of {name!r} does not line up with the "
                                   f"input {tuple(self._input.shape)} of {self.target.producer!r} (a reduction or "
                                   "reshape between them); GradMax needs one row of each per example or token")
                return
            a = self._input.reshape(-1, self._input.shape[-1]).double()
            if self.on_backward:
                out.register_hook(lambda g: self._add(name, g, a))
            else:
                self.outputs.append((name, out, a))
        return hook

    def _add(self, name: str, grad: torch.Tensor, a: torch.Tensor) -> None:
        m = grad.detach().reshape(-1, grad.shape[-1]).double().T @ a
        self.matrix[name] = self.matrix[name] + m if name in self.matrix else m

    def stacked(self) -> torch.Tensor | None:
        """``M``: the consumers' blocks stacked (rows: their outputs; columns: the producer's input features)."""
        blocks = [self.matrix[c] for c in self.target.consumers if c in self.matrix]
        return torch.cat(blocks) if blocks else None

    def apply(self, m: torch.Tensor | None = None, generator: torch.Generator | int = 0) -> bool:
        """Set the fresh rows from ``m`` (default: what was captured; pass an all-reduced one under DDP); False
        when nothing was captured. Exact: the rows feed only zero outgoing weights.

        Raises:
            AutogrowError: a consumer's output did not line up with the producer's input (nothing changed).
        """
        if self.misaligned:
            fail(self.misaligned)
        m = self.stacked() if m is None else m
        if m is None:
            return False
        layer = self.model.get_submodule(self.target.producer)
        rows = self.target.rows.to(layer.weight.device)
        old = torch.ones(layer.out_features, dtype=torch.bool)
        old[self.target.rows] = False
        scale = layer.weight.detach()[old.to(layer.weight.device)].double().norm(dim=1).mean()
        with torch.no_grad():
            layer.weight[rows] = (_directions(m, len(rows), generator) * scale).to(layer.weight)
            if layer.bias is not None:
                layer.bias[rows] = 0.0
        return True


def _directions(m: torch.Tensor, k: int, generator: torch.Generator | int) -> torch.Tensor:
    """``k`` orthonormal rows: ``m``'s top right singular vectors, then (past its rank) random ones orthogonal
    to them."""
    gen = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(generator)
    _, s, vh = torch.linalg.svd(m.cpu().double(), full_matrices=False)
    rank = int((s > s[0] * 1e-6).sum()) if len(s) and s[0] > 0 else 0
    top = vh[:min(k, rank)]
    if len(top) < k:
        extra = torch.randn(k - len(top), m.shape[1], generator=gen, dtype=torch.float64)
        extra = extra - (extra @ top.T) @ top
        q, _ = torch.linalg.qr(extra.T)
        top = torch.cat([top, q.T[: k - len(top)]])
    return top


def gradmax(model: nn.Module, growth: Growth, inputs: Any, loss: Callable[[Any], torch.Tensor], *,
            generator: torch.Generator | int = 0) -> None:
    """GradMax for the fresh units of ``growth`` (just applied to ``model``), from one batch: ``loss(model(inputs))``
    is differentiated with respect to the consumers' outputs only (parameters' ``.grad`` untouched)."""
    capture = GradMaxCapture(model, fresh_rows(model, growth), on_backward=False).attach()
    try:
        value = loss(model(*as_args(inputs)))
        outs = [o for _, o, _ in capture.outputs]
        grads = torch.autograd.grad(value, outs, allow_unused=True) if outs else []
        for (name, _, a), g in zip(capture.outputs, grads):
            if g is not None:
                capture._add(name, g, a)
    finally:
        capture.detach()
        capture.outputs.clear()
    capture.apply(generator=generator)
