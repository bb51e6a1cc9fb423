"""Where the widened units sit in a tensor, and how each op that moves them does so: one rule per op.

A :class:`Layout` says which axis of a tensor holds the widened units (counted from the end, so
that the batch and other leading axes do not matter), the tensor's rank when it is known, which
unit mapping applies, and whether the units have been flattened into channel-major blocks.

Each rule here is a pure function ``(layout of the input, node, module or None, context) -> layout
of the output`` that raises :class:`Refusal` when the op cannot follow a widening exactly, and
registers itself for the functions, tensor methods and modules it covers (``OpKind.LAYOUT``). The
context (:class:`Context`) gives recorded shapes and size values when example inputs were given.
Adding an op that moves the units' axis is one decorated function here (plus its test).

    >>> lay = Layout(dim=-3, ndim=4, key=None)          # conv output (N, C, H, W), C widened
    >>> flatten_axes(lay, 1, -1)                         # x.flatten(1): C-major blocks of H*W
    Layout(dim=-1, ndim=2, key=None, flat=True)
    >>> reduce_axes(lay, (2, 3), keepdim=False)          # x.mean((2, 3)): global pooling
    Layout(dim=-1, ndim=2, key=None, flat=False)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn as nn

from autogrow.errors import SHAPES_HINT
from autogrow.ops import LayoutRule, OpKind, register_function, register_layout_module

__all__ = ["Context", "Layout", "Refusal", "arg", "cat_axis", "flatten_axes", "reduce_axes"]


class Refusal(Exception):
    """An op cannot keep a widening exact: ``why`` (completes "node X ...") and an optional ``fix``;
    ``needs_shapes`` when example inputs (recorded shapes) would settle the question."""

    def __init__(self, why: str, fix: str = "", needs_shapes: bool = False) -> None:
        super().__init__(why)
        self.why, self.fix, self.needs_shapes = why, fix, needs_shapes


@dataclass(frozen=True)
class Layout:
    """Where the widened units sit in one tensor."""

    dim: int  # axis counted from the end
    ndim: int | None  # rank of the tensor when known (convolutions), else None
    key: fx.Node | None  # which unit mapping: None for the widened layer's own, else a concatenation node
    flat: bool = False  # features are channel-major blocks after a flatten (block size from the consumer)


class Context(Protocol):
    """What a rule may ask about the graph beyond the node itself (the coupling walk provides it)."""

    def shape(self, node: object) -> tuple[int, ...] | None:
        """The recorded shape of a tensor node (``None`` without example inputs)."""

    def widths(self, lay: Layout) -> tuple[int, int]:
        """(old, new) size of the units' axis of a tensor with layout ``lay``."""

    def value(self, x: object, new: bool) -> Any:
        """The value of a size expression before/after widening (raises when it cannot be computed)."""


def arg(node: fx.Node, pos: int, name: str, default: object) -> object:
    """Argument ``pos`` (or keyword ``name``) of a call node."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def layout_rule(*targets: Callable | str | type[nn.Module]) -> Callable[[LayoutRule], LayoutRule]:
    """Register the decorated rule for functions, tensor methods (by name) and module types."""
    def register(rule: LayoutRule) -> LayoutRule:
        for t in targets:
            if isinstance(t, type) and issubclass(t, nn.Module):
                register_layout_module(t, rule)
            else:
                register_function(t, OpKind.LAYOUT, layout=rule)
        return rule
    return register


# --- the arithmetic of axes ---------------------------------------------------------------------------

def flatten_axes(lay: Layout, start: int, end: int) -> Layout:
    """``flatten(start, end)``: the units stay an axis, or become the outer index of a flattened block."""
    if lay.ndim is None:
        if lay.dim == -1 and start == 1 and end == -1:
            return lay  # a Linear output in a 2-D batch: flatten(1) changes nothing (else consumers' sizes differ)
        raise Refusal("flattens a tensor of unknown rank", SHAPES_HINT, needs_shapes=True)
    nd = lay.ndim
    s, e, p = start % nd, end % nd, nd + lay.dim
    if s == e:
        return lay
    new_nd = nd - (e - s)
    if p < s:
        return Layout(p - new_nd, new_nd, lay.key, lay.flat)
    if p > e:
        return Layout(p - (e - s) - new_nd, new_nd, lay.key, lay.flat)
    if p == s and e == nd - 1 and not lay.flat:
        return Layout(-1, new_nd, lay.key, flat=True)
    raise Refusal(f"flattens axes {s}..{e} so that the units (axis {p}) are not the outer index")


def reduce_axes(lay: Layout, dims: int | Sequence[int] | None, keepdim: bool) -> Layout:
    """``mean/sum/amax(dims)``: allowed over any axes but the units'."""
    if lay.ndim is None and dims is not None and not lay.flat:
        raise Refusal("reduces a tensor of unknown rank", SHAPES_HINT, needs_shapes=True)
    if dims is None or lay.flat:
        raise Refusal("reduces over the units' axis")
    nd = lay.ndim
    pos = sorted(d % nd for d in ([dims] if isinstance(dims, int) else dims))
    p = nd + lay.dim
    if p in pos:
        raise Refusal("reduces over the widened units")
    if keepdim:
        return lay
    new_nd = nd - len(pos)
    new_p = p - sum(1 for d in pos if d < p)
    return replace(lay, dim=new_p - new_nd, ndim=new_nd)


def cat_axis(lay: Layout, dim: int) -> int:
    """The axis (from the end) a ``cat(dim=dim)`` joins, in the terms of ``lay``."""
    if dim < 0:
        return dim
    if lay.ndim is not None:
        return dim - lay.ndim
    raise Refusal(f"concatenates on dim={dim} of a tensor of unknown rank (features or another axis?)",
                  SHAPES_HINT, needs_shapes=True)


def _is_batch_size(x: object, of: fx.Node) -> bool:
    """``of.size(0)`` or ``of.shape[0]``."""
    if not isinstance(x, fx.Node):
        return False
    if x.op == "call_method" and x.target == "size" and x.args[0] is of and arg(x, 1, "dim", None) == 0:
        return True
    return (x.op == "call_function" and x.target is operator.getitem and x.args[1] == 0
            and isinstance(x.args[0], fx.Node) and x.args[0].op == "call_function"
            and x.args[0].target is getattr and x.args[0].args == (of, "shape"))


# --- the rules ----------------------------------------------------------------------------------------

@layout_rule(torch.flatten, "flatten", nn.Flatten)
def flatten(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    if module is not None:
        return flatten_axes(lay, module.start_dim, module.end_dim)
    return flatten_axes(lay, arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1))


def reshape_target(node: fx.Node) -> Sequence[object]:
    """The target shape of a ``view``/``reshape`` node, as written (literals and size nodes)."""
    shape = node.args[1:] if node.op == "call_method" else arg(node, 1, "shape", ())
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return shape


_FIXED = "Use x.flatten(1), x.view(x.size(0), -1) or nn.Flatten() instead."


@layout_rule(torch.reshape, "view", "reshape")
def reshape(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """A reshape that keeps the units an axis (or merges them, outermost, with the trailing axes) and
    whose target, re-evaluated at the new width, still fits; ``view(x.size(0), -1)`` without shapes."""
    shape = reshape_target(node)
    old_in, old_out = ctx.shape(node.args[0]), ctx.shape(node)
    if old_in is None or old_out is None:
        if len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], node.args[0]):
            return flatten_axes(lay, 1, -1)
        if any(isinstance(v, fx.Node) for v in shape):
            raise Refusal(f"reshapes the widened tensor to a shape computed from sizes {tuple(map(str, shape))}",
                          SHAPES_HINT, needs_shapes=True)
        raise Refusal(f"reshapes the widened tensor to a fixed shape {tuple(map(str, shape))}", _FIXED)
    out, q = _units_after_reshape(lay, old_in, old_out)
    old, new = ctx.widths(lay)
    expected = list(old_out)
    expected[q] = old_out[q] // old * new
    try:
        target = [int(v) for v in ctx.value(list(shape), new=True)]
    except Exception:
        raise Refusal(f"reshapes the widened tensor to a shape computed in a way autogrow cannot follow "
                      f"{tuple(map(str, shape))}", _FIXED) from None
    if target.count(-1) == 1:
        rest = math.prod(v for v in target if v != -1)
        target[target.index(-1)] = math.prod(expected) // rest if rest else -1
    if target != expected:
        raise Refusal(f"reshapes the widened tensor to a fixed shape {tuple(map(str, shape))} (after widening "
                      f"it would need {tuple(expected)}, gets {tuple(target)})", _FIXED)
    return out


def _units_after_reshape(lay: Layout, old_in: tuple[int, ...], old_out: tuple[int, ...]) -> tuple[Layout, int]:
    """Where the units land in the reshaped tensor (and which output axis holds them)."""
    p = len(old_in) + lay.dim
    pre, units, post = math.prod(old_in[:p]), old_in[p], math.prod(old_in[p + 1:])
    acc, q = 1, 0
    while q < len(old_out) and acc < pre:
        acc *= old_out[q]
        q += 1
    if acc == pre and q < len(old_out):
        if old_out[q] == units and (not lay.flat or q == len(old_out) - 1):
            return Layout(q - len(old_out), len(old_out), lay.key, lay.flat), q
        if old_out[q] == units * post and q == len(old_out) - 1 and not lay.flat:
            return Layout(-1, len(old_out), lay.key, flat=True), q
    raise Refusal(f"reshapes {old_in} to {old_out}, splitting the widened units (axis {p}) across several axes "
                  "or behind others", "Reshapes that keep the units one axis, or flatten them outermost, work.")


@layout_rule(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax")
def reduce(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    return reduce_axes(lay, arg(node, 1, "dim", None), bool(arg(node, 2, "keepdim", False)))
