"""Where the widened units sit in a tensor, and how each op that moves them does so: one rule per op.

A :class:`Layout` says which axis of a tensor holds the widened units (counted from the end, so
that the batch and other leading axes do not matter), the tensor's rank when it is known, which
unit mapping applies, whether the units have been flattened into channel-major blocks, and how many
entries of that axis each unit holds (``rep``: grouped-query attention repeats a key/value head for
each query head of its group, so there a unit is a group of query heads).

Each rule here is a pure function ``(layout of the input, node, module or None, context) -> layout
of the output`` that raises :class:`Refusal` when the op cannot follow a widening exactly, and
registers itself for the functions, tensor methods and modules it covers (``OpKind.LAYOUT``). The
context (:class:`Context`) gives recorded shapes and size values when example inputs were given.
Adding an op that moves the units' axis is one decorated function here (plus its test).

    >>> lay = Layout(dim=-3, ndim=4, key=None)          # conv output (N, C, H, W), C widened
    >>> flatten_axes(lay, 1, -1)                         # x.flatten(1): C-major blocks of H*W
    Layout(dim=-1, ndim=2, key=None, flat=True, rep=1)
    >>> reduce_axes(lay, (2, 3), keepdim=False)          # x.mean((2, 3)): global pooling
    Layout(dim=-1, ndim=2, key=None, flat=False, rep=1)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autogrow.bound import BoundExpr, BoundSize, leaves, resolve
from autogrow.errors import SHAPES_HINT
from autogrow.ops import LayoutRule, Linearity, OpKind, register_function, register_layout_module

__all__ = ["Context", "Layout", "NeedsBlock", "NeedsParts", "NeedsPieces", "NeedsRep", "Refusal", "arg", "cat_axis",
           "flatten_axes", "reduce_axes", "stacked", "unstacked"]


class Refusal(Exception):
    """An op cannot keep a widening exact: ``why`` (completes "node X ...") and an optional ``fix``;
    ``needs_shapes`` when example inputs (recorded shapes) would settle the question."""

    def __init__(self, why: str, fix: str = "", needs_shapes: bool = False) -> None:
        super().__init__(why)
        self.why, self.fix, self.needs_shapes = why, fix, needs_shapes


class NeedsBlock(Exception):
    """The units turn out to be blocks of ``block`` features (attention heads of that size): the walk
    restarts, counting whole blocks as units."""

    def __init__(self, block: int) -> None:
        super().__init__(int(block))
        self.block = int(block)  # a plain int: sizes read from tensors or attributes carry where they came from


class NeedsParts(Exception):
    """The widened layer's output is split into ``parts`` equal pieces along its units (a fused q/k/v or
    gate/up projection): the walk restarts, its units being one piece's, every piece growing alike."""

    def __init__(self, parts: int) -> None:
        super().__init__(int(parts))
        self.parts = int(parts)  # a plain int: sizes read from tensors or attributes carry where they came from


class NeedsPieces(Exception):
    """The widened layer's output is split into unequal pieces along its units (a multi-query ``c_attn``: all the
    query heads, one key head, one value head): the walk restarts, its units being one piece's, the others kept."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__(tuple(int(s) for s in sizes))
        self.sizes = tuple(int(s) for s in sizes)  # plain ints, in features


class NeedsRep(Exception):
    """The widened layer's units meet tensors whose units serve ``rep`` of them each (grouped-query attention:
    one key/value head for a group of query heads): the walk restarts, a unit being such a group."""

    def __init__(self, rep: int) -> None:
        super().__init__(int(rep))
        self.rep = int(rep)  # a plain int: sizes read from tensors or attributes carry where they came from


@dataclass(frozen=True)
class Layout:
    """Where the widened units sit in one tensor."""

    dim: int  # axis counted from the end
    ndim: int | None  # rank of the tensor when known (convolutions), else None
    key: fx.Node | None  # which unit mapping: None for the widened layer's own, else a concatenation node
    flat: bool = False  # features are channel-major blocks after a flatten (block size from the consumer)
    rep: int = 1  # entries per unit along its axis: > 1 where each unit is a group of query heads (GQA)

    def __post_init__(self) -> None:  # a plain int, not a size that remembers a tensor or an attribute
        object.__setattr__(self, "rep", int(self.rep))


class Context(Protocol):
    """What a rule may ask about the graph beyond the node itself (the coupling walk provides it)."""

    final: bool  # every layout is known (the walk's last pass): a check of sizes read from other tensors is due
    rebinds: Mapping[tuple[str, str], int]  # the attributes rewritten so far (autogrow.bound)

    def shape(self, node: object) -> tuple[int, ...] | None:
        """The recorded shape of a tensor node (``None`` without example inputs)."""

    def widths(self, lay: Layout) -> tuple[int, int]:
        """(old, new) size of the units' axis of a tensor with layout ``lay``."""

    def value(self, x: object, new: bool) -> Any:
        """The value of a size expression before/after widening (raises when it cannot be computed)."""

    def parts(self, key: object) -> int:
        """Into how many equal pieces, each mapped as the widened layer's own units, a mapping's units fall:
        more than 1 for a fused projection's output, else 1."""

    def pieces(self, key: object) -> tuple[tuple[int, ...], int] | None:
        """For a mapping whose units are one piece of a split into unequal pieces: the pieces' old sizes in
        features, and which piece grows (the others keep their size); else ``None``."""

    def one_piece(self) -> bool:
        """Whether the widened layer's output is split into unequal pieces of which one grows and the others keep
        their size (a multi-query ``c_attn``: one key/value head, which then serves every query head)."""

    def rebind(self, size: BoundSize, value: int) -> None:
        """Have the growth write ``value`` into the module attribute that held ``size`` (:mod:`autogrow.bound`);
        raises :class:`Refusal` if the walk needs another value for it elsewhere."""


def arg(node: fx.Node, pos: int, name: str, default: object) -> object:
    """Argument ``pos`` (or keyword ``name``) of a call node."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def layout_rule(*targets: Callable | str | type[nn.Module], inverse: LayoutRule | None = None, linear: bool = True
                ) -> Callable[[LayoutRule], LayoutRule]:
    """Register the decorated rule for functions, tensor methods (by name) and module types; ``inverse``
    gives the input's layout from the output's (to follow a residual path backwards through the op);
    ``linear=False`` for ops that are not linear in the tensor (a max, a softmax)."""
    def register(rule: LayoutRule) -> LayoutRule:
        for t in targets:
            if isinstance(t, type) and issubclass(t, nn.Module):
                register_layout_module(t, rule, inverse)
            else:
                register_function(t, OpKind.LAYOUT, layout=rule, inverse=inverse,
                                  linear=Linearity.JOINT if linear else Linearity.NONE)
        return rule
    return register


def _axis(dim: int, ndim: int | None) -> int:
    """``dim`` counted from the end; needs the rank for a dim counted from the front."""
    if dim < 0:
        return dim
    if ndim is None:
        raise Refusal(f"addresses axis {dim} of a tensor of unknown rank", SHAPES_HINT, needs_shapes=True)
    return dim - ndim


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
        return replace(lay, dim=p - new_nd, ndim=new_nd)
    if p > e:
        return replace(lay, dim=p - (e - s) - new_nd, ndim=new_nd)
    if p == s and e == nd - 1 and not lay.flat:
        return replace(lay, dim=-1, ndim=new_nd, flat=True)
    raise Refusal(f"flattens axes {s}..{e} so that the units (axis {p}) are not the outer index")


_NORM_FIX = ("If it is a normalisation written by hand (an RMSNorm's x.pow(2).mean(-1, keepdim=True)), register "
             "its module as what it computes: autogrow.register_channelwise(MyNorm, "
             "autogrow.registry.channel_spec(nn.RMSNorm(1))).")


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
        raise Refusal("reduces over the widened units", _NORM_FIX)
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

def _flatten_args(node: fx.Node, module: nn.Module | None) -> tuple[int, int]:
    if module is not None:
        return module.start_dim, module.end_dim
    return arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)


def _inverse_flatten(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Where the units sat before ``flatten(start, end)``: an axis outside the flattened block (a patch
    embedding's ``proj(x).flatten(2)``: the channels, before the flattened pixels)."""
    shape = ctx.shape(node.args[0])
    if shape is None:
        raise Refusal("flattens a tensor that must grow with the widened one", SHAPES_HINT, needs_shapes=True)
    nd = len(shape)
    start, end = _flatten_args(node, module)
    s, e = start % nd, end % nd
    p = nd - (e - s) + lay.dim
    if lay.flat or (p == s and e > s):
        raise Refusal("flattens the units into a block of a tensor that must grow with the widened one")
    return replace(lay, dim=(p if p < s else p + (e - s)) - nd, ndim=nd)


@layout_rule(torch.flatten, "flatten", nn.Flatten, inverse=_inverse_flatten)
def flatten(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Also ``flatten(2, 3)`` of (B, T, kv heads, group, d): the units, outermost, merged with axes before the last
    (Falcon's query heads of a key/value group): each unit then holds ``group`` entries of the merged axis."""
    start, end = _flatten_args(node, module)
    shape = ctx.shape(node.args[0])
    if shape is not None and not lay.flat:
        nd = len(shape)
        s, e, p = start % nd, end % nd, nd + lay.dim
        if p == s and s < e < nd - 1:
            merged = math.prod(int(v) for v in shape[s + 1:e + 1])  # plain ints: no arithmetic on recorded sizes
            return replace(lay, dim=s - (nd - (e - s)), ndim=nd - (e - s), rep=lay.rep * merged)
    return flatten_axes(lay, start, end)


def reshape_target(node: fx.Node) -> Sequence[object]:
    """The target shape of a ``view``/``reshape`` node, as written (literals and size nodes)."""
    shape = node.args[1:] if node.op == "call_method" else arg(node, 1, "shape", ())
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return shape


_FIXED = "Use x.flatten(1), x.view(x.size(0), -1) or nn.Flatten() instead."


def _inverse_reshape(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Where the units sat before a reshape, given where they are after it (needs recorded shapes)."""
    old_in, old_out = ctx.shape(node.args[0]), ctx.shape(node)
    if old_in is None or old_out is None:
        raise Refusal("reshapes a tensor that must grow with the widened one", SHAPES_HINT, needs_shapes=True)
    q = len(old_out) + lay.dim
    pre, acc, p = math.prod(old_out[:q]), 1, 0
    while p < len(old_in) and acc < pre:
        acc *= old_in[p]
        p += 1
    if acc == pre and p < len(old_in):
        at = {"dim": p - len(old_in), "ndim": len(old_in)}
        if old_in[p] == old_out[q] and not lay.flat:
            return replace(lay, **at)
        if not lay.flat and q + 1 < len(old_out) and old_in[p] == old_out[q] * old_out[q + 1]:
            return replace(lay, **at, flat=True)  # heads merged into features
        if (not lay.flat and p + 1 < len(old_in) and old_out[q] == old_in[p] * old_in[p + 1]
                and old_in[p + 2:] == old_out[q + 1:]):  # repeat_kv: (B, kv, n_rep, T, d) -> (B, kv * n_rep, T, d)
            if old_in[p] == 1 and ctx.one_piece():  # one key/value head that keeps its size (multi-query c_attn):
                # the query heads are the n_rep axis, copies of it
                return replace(lay, dim=p + 1 - len(old_in), ndim=len(old_in))
            return replace(lay, **at, rep=_fewer(lay, old_in[p + 1]))
    raise Refusal(f"reshapes {old_in} to {old_out} in a way autogrow cannot follow backwards")


def _fewer(lay: Layout, r: int) -> int:
    """The ``rep`` of a tensor each of whose entries on the units' axis serves ``r`` entries of a tensor laid out
    as ``lay`` (a key/value head repeated for ``r`` query heads). The widened layer's own units (``lay.key`` is
    ``None``) that are single query heads restart as groups (:class:`NeedsRep`)."""
    if lay.rep % r == 0:
        return lay.rep // r
    if lay.key is None:
        raise NeedsRep(r // math.gcd(lay.rep, r))
    raise Refusal(f"repeats each entry of a tensor {r} times along the units' axis, which splits the units of a "
                  "concatenation")


@layout_rule(torch.reshape, "view", "reshape", inverse=_inverse_reshape)
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
    try:
        out, q = _units_after_reshape(lay, old_in, old_out, ctx, node)
    except Refusal:
        if ctx.parts(lay.key) == 1:
            raise
        lay, old_in = _as_parts(lay, old_in, ctx.parts(lay.key))
        out, q = _units_after_reshape(lay, old_in, old_out, ctx, node)
    old, new = ctx.widths(lay)
    expected = list(old_out)
    expected[q] = old_out[q] // old * new
    if isinstance(shape[q], BoundSize) and shape[q] == old_out[q] != expected[q]:
        ctx.rebind(shape[q], expected[q])  # the number of heads held in a module attribute: autogrow.bound
    _rebind_unit_counts(shape, expected, q, ctx.widths(lay), ctx)
    try:
        target = [int(v) for v in ctx.value(list(shape), new=True)]
    except Exception:
        raise Refusal(f"reshapes the widened tensor to a shape computed in a way autogrow cannot follow "
                      f"{tuple(map(str, shape))}", _FIXED) from None
    if target.count(-1) == 1:
        rest = math.prod(v for v in target if v != -1)
        target[target.index(-1)] = math.prod(expected) // rest if rest else -1
    if target != expected and not ctx.final and any(isinstance(v, (fx.Node, BoundExpr)) for v in shape):
        return out  # sizes read from a tensor the walk may widen later, or from attributes it may rewrite later:
        # checked again in its last pass
    if target != expected:
        raise Refusal(f"reshapes the widened tensor to a fixed shape {tuple(map(str, shape))} (after widening "
                      f"it would need {tuple(expected)}, gets {tuple(target)})", _FIXED)
    return out


def _rebind_unit_counts(shape: Sequence[object], expected: list[int], q: int, widths: tuple[int, int],
                        ctx: Context) -> None:
    """An axis other than the units' written from attributes, one of them rewritten, that would change
    (Falcon's ``num_heads // num_kv_heads + 2``, ``num_heads`` rewritten): the attributes in it that equal the number
    of units count them too, and are rewritten with it where that keeps the axis as it must be."""
    old, new = widths
    for i, x in enumerate(shape):
        if i == q or not isinstance(x, BoundExpr) or resolve(x, ctx.rebinds) == expected[i]:
            continue
        counts = {(b.owner, b.attr): b for b in leaves(x) if b == old and (b.owner, b.attr) not in ctx.rebinds}
        if counts and resolve(x, {**ctx.rebinds, **dict.fromkeys(counts, new)}) == expected[i]:
            for b in counts.values():
                ctx.rebind(b, new)


def _as_parts(lay: Layout, old_in: tuple[int, ...], parts: int) -> tuple[Layout, tuple[int, ...]]:
    """A fused output seen as ``(..., parts, one part's units, ...)``: the part's units are the layer's own."""
    p = len(old_in) + lay.dim
    virtual = old_in[:p] + (parts, old_in[p] // parts) + old_in[p + 1:]
    return replace(lay, key=None, ndim=len(virtual)), virtual


def _fixed_parts(node: fx.Node, q: int, old_out: tuple[int, ...], units: int, ctx: Context) -> bool:
    """``qkv.reshape(B, N, 3, -1, head_size)``: the units' axis becomes a fixed number of parts (axis ``q``,
    the same after widening) followed by at least two axes that hold one part's units."""
    ends = [k for k in range(q + 3, len(old_out) + 1) if math.prod(old_out[q:k]) == units]
    if old_out[q] < 2 or not ends:
        return False
    try:
        return int(ctx.value(list(reshape_target(node)), new=True)[q]) == old_out[q]
    except Exception:
        return False


def _units_after_reshape(lay: Layout, old_in: tuple[int, ...], old_out: tuple[int, ...], ctx: Context,
                         node: fx.Node) -> tuple[Layout, int]:
    """Where the units land in the reshaped tensor (and which output axis holds them)."""
    p = len(old_in) + lay.dim
    pre, units, post = math.prod(old_in[:p]), old_in[p], math.prod(old_in[p + 1:])
    acc, q = 1, 0
    while q < len(old_out) and acc < pre:
        acc *= old_out[q]
        q += 1
    if acc == pre and q < len(old_out):
        n_units, at = ctx.widths(lay)[0], {"dim": q - len(old_out), "ndim": len(old_out)}
        if old_out[q] == units and (not lay.flat or q == len(old_out) - 1):
            return replace(lay, **at), q
        if old_out[q] == units * post and q == len(old_out) - 1 and not lay.flat:
            return replace(lay, **at, flat=True), q
        if (lay.flat and old_out[q] == n_units * lay.rep and q + 1 < len(old_out)
                and units in [math.prod(old_out[q:k]) for k in range(q + 2, len(old_out) + 1)]):
            return replace(lay, **at, flat=False), q  # blocks (heads) back to their own axis, or axes
        if (not lay.flat and p + 1 < len(old_in) and old_out[q] == units * old_in[p + 1]
                and old_out[q + 1:] == old_in[p + 2:]):  # repeat_kv: (B, kv, n_rep, T, d) -> (B, kv * n_rep, T, d)
            return replace(lay, **at, rep=lay.rep * old_in[p + 1]), q
        if not lay.flat and q + 1 < len(old_out) and old_out[q] * old_out[q + 1] == units:
            _split_units(node, q, old_out, ctx, lay)
        if not lay.flat and ctx.parts(lay.key) == 1 and _fixed_parts(node, q, old_out, units, ctx):
            raise NeedsParts(old_out[q])  # a fused q/k/v: (B, N, 3 * heads * size) -> (B, N, 3, heads, size)
        if not lay.flat and q + 2 < len(old_out) and units in [math.prod(old_out[q:k]) for k in range(q + 3,
                                                                                               len(old_out) + 1)]:
            _split_block(node, q, old_out, units, ctx, lay)
    raise Refusal(f"reshapes {old_in} to {old_out}, splitting the widened units (axis {p}) across several axes "
                  "or behind others", "Reshapes that keep the units one axis, or flatten them outermost, work.")


def _split_block(node: fx.Node, q: int, old_out: tuple[int, ...], units: int, ctx: Context, lay: Layout) -> None:
    """The units' axis split in three or more (Falcon's ``view(B, T, -1, group + 2, head_size)``: key/value heads,
    each a block of its query heads, its key and its value): if the first axis follows the width and the block's
    axes do not, units are whole blocks (restart counting them); else refused."""
    end = next(k for k in range(q + 3, len(old_out) + 1) if math.prod(old_out[q:k]) == units)
    block = math.prod(old_out[q + 1:end])
    new = ctx.widths(lay)[1]
    if new % block:
        raise Refusal(f"splits the widened units into blocks of {old_out[q + 1:end]}: the new width {new} is not a "
                      "whole number of them", f"Widen to a multiple of {block}.")
    target = _split_target(node, q, end, old_out, new, ctx)
    if target[q + 1:end] != list(old_out[q + 1:end]) or target[q] not in (-1, new // block):
        raise Refusal(f"splits the widened units into {old_out[q:end]} and the block {old_out[q + 1:end]} or their "
                      "number would not follow the width", "Compute the number of blocks from the tensor (-1).")
    raise NeedsBlock(block)


def _split_target(node: fx.Node, q: int, end: int, old_out: tuple[int, ...], new: int, ctx: Context) -> list[int]:
    """The target of a reshape splitting the units' axis into ``old_out[q:end]`` (heads, then a head's axes), at the
    new width ``new``; a number of heads held in an attribute (timm's ``self.num_heads``) is rewritten first to fit
    whole heads, so that sizes computed from it are evaluated with its new value."""
    written, block = reshape_target(node)[q], math.prod(old_out[q + 1:end])
    if isinstance(written, BoundSize) and written == old_out[q] and new % block == 0:
        ctx.rebind(written, new // block)
    try:
        return [int(v) for v in ctx.value(list(reshape_target(node)), new=True)]
    except Exception:
        raise Refusal(f"splits the widened units into {old_out[q:end]} with sizes autogrow cannot follow",
                      SHAPES_HINT, needs_shapes=True) from None


def _split_units(node: fx.Node, q: int, old_out: tuple[int, ...], ctx: Context, lay: Layout) -> None:
    """The units' axis is split in two (``view(b, t, heads, head_size)``): if the target makes the number
    of heads follow the width, units are whole heads (restart counting heads); head size growing: refused."""
    new = ctx.widths(lay)[1]
    target = _split_target(node, q, q + 2, old_out, new, ctx)
    heads, size = target[q], target[q + 1]
    if size == -1 and heads > 0 and new % heads == 0:
        size = new // heads  # view(B, T, self.n_head, -1): the head size the rewritten heads leave
    if size == old_out[q + 1] and new % size:
        raise Refusal(f"splits the widened units into heads of {size}: the new width {new} is not a whole number "
                      "of heads", f"Widen to a multiple of {size}.")
    if size == old_out[q + 1] and heads in (-1, new // size):
        raise NeedsBlock(size)
    if size == old_out[q + 1]:  # reshape(B, N, 3, 4, head_size): a literal (attributes are BoundSizes, above)
        raise Refusal(f"splits the widened units into {heads} heads of {size}, a number of heads fixed in the code (a "
                      "constant, not an attribute of the module that reshapes), so the new units fit no head",
                      "Compute the number of heads from the tensor: view(B, T, -1, head_size) or x.size(-1) // "
                      "head_size.")
    raise Refusal(f"splits the widened units into {old_out[q]} x {old_out[q + 1]} (heads x head size?) and the head "
                  f"size would change{f' to {size}' if size > 0 else ''} (it sets the attention's 1/sqrt(d) scale and "
                  "rotary frequencies)",
                  "Grow the number of heads: compute it from the tensor (x.size(-1) // head_size) with a fixed "
                  "head size, or widen another layer.")


@layout_rule(torch.mean, torch.sum, "mean", "sum")
def reduce(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    return reduce_axes(lay, arg(node, 1, "dim", None), bool(arg(node, 2, "keepdim", False)))


layout_rule(torch.amax, "amax", linear=False)(reduce)


def _swap(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    d0, d1 = _axis(arg(node, 1, "dim0", 0), lay.ndim), _axis(arg(node, 2, "dim1", 1), lay.ndim)
    dim = d1 if lay.dim == d0 else d0 if lay.dim == d1 else lay.dim
    return replace(lay, dim=dim)


layout_rule(torch.transpose, "transpose", inverse=_swap)(_swap)  # its own inverse


def _perm(node: fx.Node) -> list[int]:
    dims = node.args[1:] if node.op == "call_method" else arg(node, 1, "dims", ())
    return list(dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims)


def _unpermute(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    perm, nd = _perm(node), lay.ndim if lay.ndim is not None else len(_perm(node))
    return replace(lay, dim=perm[nd + lay.dim] % nd - nd)


@layout_rule(torch.permute, "permute", inverse=_unpermute)
def permute(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    perm = [d % len(_perm(node)) for d in _perm(node)]
    nd = len(perm)
    return replace(lay, dim=perm.index(nd + lay.dim) - nd, ndim=nd)


def _squeeze_at(lay: Layout, dim: int) -> Layout:
    """The layout after removing axis ``dim`` (from the end), which is not the units'."""
    if dim == lay.dim:
        raise Refusal("squeezes the widened units' axis")
    # an axis nearer the end than the units' moves them one nearer; one before them changes nothing
    return replace(lay, dim=lay.dim + (1 if dim > lay.dim else 0), ndim=None if lay.ndim is None else lay.ndim - 1)


def _unsqueeze_at(lay: Layout, node: fx.Node) -> Layout:
    d = arg(node, 1, "dim", 0)
    if d >= 0 and lay.ndim is None:
        raise Refusal(f"inserts axis {d} in a tensor of unknown rank", SHAPES_HINT, needs_shapes=True)
    nd = None if lay.ndim is None else lay.ndim + 1
    d = d - nd if d >= 0 else d  # type: ignore[operator]
    return replace(lay, dim=lay.dim - (1 if d >= lay.dim else 0), ndim=nd)


def stacked(lay: Layout, node: fx.Node) -> Layout:
    """The layout of ``torch.stack(tensors, dim)`` whose tensors are laid out as ``lay``: a new axis at ``dim``
    (GPT-J's interleaved rotary stacks the two halves of each head, ``stack((-x2, x1), -1)``)."""
    return _unsqueeze_at(lay, node)


def unstacked(lay: Layout, node: fx.Node) -> Layout:
    """The layout of each tensor ``torch.stack(tensors, dim)`` joins, its output laid out as ``lay``: the new axis
    gone (refused where it holds the units: their number would be the number of tensors)."""
    d = _axis(arg(node, 1, "dim", 0), lay.ndim)
    if d == lay.dim:
        raise Refusal("stacks tensors along the widened units' axis (their number is the number of tensors)")
    return _squeeze_at(lay, d)


def _inverse_unsqueeze(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    d = _axis(arg(node, 1, "dim", 0), lay.ndim)
    return _squeeze_at(lay, d)


@layout_rule(torch.unsqueeze, "unsqueeze", inverse=_inverse_unsqueeze)
def unsqueeze(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    return _unsqueeze_at(lay, node)


@layout_rule(torch.squeeze, "squeeze")
def squeeze(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Drops axes of size 1 other than the units' (whose size changes with the width)."""
    dims, shape = arg(node, 1, "dim", None), ctx.shape(node.args[0])
    if dims is None and shape is None:
        raise Refusal("squeezes every axis of size 1 of a tensor of unknown shape", SHAPES_HINT, needs_shapes=True)
    dims = [i for i, n in enumerate(shape) if n == 1] if dims is None else [dims] if isinstance(dims, int) else dims
    for d in sorted({_axis(d, lay.ndim) for d in dims}):  # the axis farthest from the end first: no shifts
        if d == lay.dim and (shape is None or ctx.widths(lay)[0] == 1):
            raise Refusal("squeezes the widened units' axis", "" if shape else SHAPES_HINT, needs_shapes=not shape)
        if d != lay.dim and (shape is None or shape[d] == 1):
            lay = _squeeze_at(lay, d)
    return lay


def softmax(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Normalises along one axis: exact for copies only when that axis is not the units'."""
    if _axis(arg(node, 1, "dim", -1), lay.ndim) == lay.dim:
        raise Refusal("normalises over the widened units (a softmax over features changes when units are copied)")
    return lay


layout_rule(torch.softmax, F.softmax, F.log_softmax, "softmax", "log_softmax", inverse=softmax, linear=False)(softmax)


_FUSED_FIX = "Split by sizes computed from the tensor (h.chunk(3, dim=-1) or h.split(h.size(-1) // 3, dim=-1))."


def _pieces(node: fx.Node, lay: Layout, ctx: Context) -> int:
    """How many equal pieces a split along the units makes, before and after widening (else refused)."""
    old, new = ctx.widths(lay)
    if node.target in (torch.chunk, "chunk"):
        n = arg(node, 1, "chunks", None)
        if not isinstance(n, int) or old % n:  # a new width that is not a multiple: refused by name (couple)
            raise Refusal(f"splits the widened units into {n} chunks, not equal at {old} units")
        return n
    shape = ctx.shape(node.args[0])
    if shape is None:
        raise Refusal("splits the widened units into parts", SHAPES_HINT, needs_shapes=True)
    features = (shape[lay.dim], shape[lay.dim] // old * new)
    given = _split_given(node)
    try:
        sizes = [ctx.value(given, new=w) for w in (False, True)]
    except Exception:
        raise Refusal("splits the widened units into parts of sizes autogrow cannot follow", _FUSED_FIX) from None
    if isinstance(given, BoundSize) and given > 0 and features[0] % given == 0:  # GPT-2's split(self.split_size)
        n = features[0] // given
        if features[1] % n and lay.key is None and ctx.parts(lay.key) == 1:
            raise NeedsParts(n)  # the layer's own units: couple() refuses the width, naming the whole rule
        if features[1] % n:
            raise Refusal(f"splits the widened units into {n} equal parts of {given} "
                          f"({given.owner or 'the model'}.{given.attr}); {features[1]} features make no {n} equal "
                          "parts", f"Widen to a multiple of {n}.")
        sizes[1] = features[1] // n  # the part size follows the width: the attribute is rewritten with it
        ctx.rebind(given, sizes[1])
    counts = []
    for f, sz in zip(features, sizes):
        if not isinstance(sz, (int, list, tuple)):
            raise Refusal(f"splits the widened units by {sz!r}, which autogrow cannot read", _FUSED_FIX)
        if isinstance(sz, int):
            parts = [sz] * (f // sz) if sz > 0 and f % sz == 0 else []
        else:
            parts = list(sz) if sum(sz) == f else []
        if not parts or len(set(parts)) > 1:
            raise Refusal(f"splits the widened units ({features[0]} features) into parts of {sizes[0]}: after "
                          f"widening to {features[1]} they would be {sizes[1]}, not equal parts", _FUSED_FIX)
        counts.append(len(parts))
    if counts[0] != counts[1]:
        raise Refusal(f"splits the widened units into parts of fixed size {sizes[0]}: {counts[0]} parts now, "
                      f"{counts[1]} after widening", _FUSED_FIX)
    return counts[0]


@layout_rule(torch.chunk, torch.split, "chunk", "split")
def split(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Pieces along another axis keep the layout (``getitem`` then picks one). Along the units, equal pieces
    (a fused q/k/v or gate/up projection) are each one copy of the widened layer's units, growing alike:
    the walk restarts counting one piece's units (:class:`NeedsParts`)."""
    if _axis(arg(node, 2, "dim", 0), lay.ndim) != lay.dim:
        return lay
    uneven = _uneven_sizes(node, ctx)
    if uneven is not None:
        return _split_uneven(lay, node, uneven, ctx)
    pieces = _pieces(node, lay, ctx)
    if ctx.parts(lay.key) == pieces:
        return lay
    if lay.key is None and pieces > 1:  # the layer's own units (after a restart: one part's, split again)
        raise NeedsParts(pieces)
    if ctx.parts(lay.key) == 1:
        raise Refusal("splits a concatenation that holds the widened units into parts",
                      "Split a layer's own output into equal parts.")
    raise Refusal(f"splits the widened units into {pieces} parts, not the {ctx.parts(lay.key)} parts they grow as")


def _split_given(node: fx.Node) -> Any:
    """The sizes argument of ``torch.split``/``Tensor.split`` as written (``split_size`` is Tensor.split's name)."""
    return node.kwargs.get("split_size", arg(node, 1, "split_size_or_sections", None))


def _uneven_sizes(node: fx.Node, ctx: Context) -> tuple[int, ...] | None:
    """The old sizes of ``t.split([a, b, ...])`` when they are not all equal, else ``None``."""
    given = _split_given(node)
    if node.target in (torch.chunk, "chunk") or not isinstance(given, (list, tuple)):
        return None
    try:
        sizes = tuple(int(v) for v in ctx.value(list(given), new=False))
    except Exception:
        return None  # _pieces refuses it by name
    return sizes if len(set(sizes)) > 1 else None


def _split_uneven(lay: Layout, node: fx.Node, sizes: tuple[int, ...], ctx: Context) -> Layout:
    """``q, k, v = c_attn(x).split((self.embed_dim, self.kv_dim, self.kv_dim), -1)`` (multi-query attention): the
    layer's own units are one piece's, the others keep their size (the walk restarts: :class:`NeedsPieces`). The
    grown piece's size must follow the width: a size attribute equal to it is rewritten."""
    mode = ctx.pieces(lay.key)
    if mode is None:
        if lay.key is None and ctx.parts(lay.key) == 1 and lay.rep == 1:
            raise NeedsPieces(sizes)
        raise Refusal(f"splits the widened units into unequal parts {sizes} after they were concatenated, fused or "
                      "grouped", "Split a layer's own output.")
    pieces, i = mode
    if sizes != pieces:
        raise Refusal(f"splits the widened units into parts of {sizes}, not the pieces {pieces} they grow as")
    shape, (old, new) = ctx.shape(node.args[0]), ctx.widths(lay)
    if shape is None:
        raise Refusal(f"splits the widened units into parts of {sizes}", SHAPES_HINT, needs_shapes=True)
    want = list(sizes)
    want[i] += (new - old) * (shape[lay.dim] // old)
    given = list(_split_given(node))
    if isinstance(given[i], BoundSize) and given[i] == sizes[i]:
        ctx.rebind(given[i], want[i])  # multi-query c_attn: self.embed_dim holds the query part's size
    got = [int(v) for v in ctx.value(given, new=True)]
    if got != want:
        raise Refusal(f"splits the widened units into parts of {sizes}: after widening part {i} they would need to "
                      f"be {tuple(want)}, but are {tuple(got)}", "Split by sizes held in attributes of the module "
                      "(self.embed_dim) or read from the tensor.")
    return lay


@layout_rule(torch.unbind, "unbind")
def unbind(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Slices along another axis (``q, k, v = qkv.unbind(0)``): ``getitem`` then drops that axis."""
    if _axis(arg(node, 1, "dim", 0), lay.ndim) == lay.dim:
        raise Refusal("unbinds the widened units' axis into separate tensors")
    return lay


def _index_items(node: fx.Node) -> list[object]:
    idx = node.args[1]
    return list(idx) if isinstance(idx, tuple) else [idx]


def _full_index(items: list[object], nd: int) -> list[object]:
    """An index into a tensor of rank ``nd`` with its ``...`` and its missing trailing axes written out as full
    slices (a ``None``, a new axis, kept where it is)."""
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: list[object] = []
    for i in items:
        out += [slice(None)] * (nd - used) if i is Ellipsis else [i]
    return out + [slice(None)] * (nd - sum(1 for i in out if i is not None))


def _inverse_getitem(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """Where the units sat before ``t[:, :, None]`` (repeat_kv's new axis) or ``t[..., :d]`` (a partial rotary's
    slice of the head size): ints, slices and new axes elsewhere; on the units' axis, a full slice only."""
    items, shape = _index_items(node), ctx.shape(node)
    if items.count(Ellipsis) > 1 or any(not (i is None or i is Ellipsis or isinstance(i, slice)
                                            or type(i) is int) for i in items):
        raise Refusal("indexes a tensor that must grow with the widened one by tensors or several ellipses")
    if shape is None:
        raise Refusal("indexes a tensor of unknown rank that must grow with the widened one", SHAPES_HINT, True)
    in_nd = len(shape) - items.count(None) + sum(type(i) is int for i in items)
    p, in_axis, out_axis = len(shape) + lay.dim, 0, 0  # p: the units' axis in the output
    for i in _full_index(items, in_nd):
        if out_axis == p and not isinstance(i, int):
            if i is None:
                raise Refusal("indexes a tensor that must grow with the widened one so that the units land on a "
                              "new axis")
            if i != slice(None):
                raise Refusal(f"indexes a tensor that must grow with the widened one with {i!r} on the units' axis")
            return replace(lay, dim=in_axis - in_nd, ndim=in_nd)
        in_axis += i is not None
        out_axis += not isinstance(i, int)
    raise AssertionError(f"{node.name}: the units' axis {p} is not an axis of the output")


@layout_rule(operator.getitem, inverse=_inverse_getitem)
def getitem(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout | None:
    """Indexing: picking a piece of a split keeps the layout (of unequal pieces, the one that grows holds the
    layer's own units, the others none: ``None``); on a tensor, ints, full slices, ``None`` and ``...`` are
    followed; anything but a full slice on the units' axis is refused."""
    src, pieces = node.args[0], ctx.pieces(lay.key)
    uneven = isinstance(src, fx.Node) and pieces is not None
    if uneven and src.target in (torch.split, "split") and _axis(arg(src, 2, "dim", 0), lay.ndim) == lay.dim:
        return replace(lay, key=None) if node.args[1] == pieces[1] else None  # type: ignore[index]
    if isinstance(src, fx.Node) and src.target in (torch.chunk, torch.split, "chunk", "split"):
        if ctx.parts(lay.key) > 1 and _axis(arg(src, 2, "dim", 0), lay.ndim) == lay.dim:
            return replace(lay, key=None)  # one piece of a fused output: the widened layer's own units
        return lay  # one piece of a split along another axis
    if isinstance(src, fx.Node) and src.target in (torch.unbind, "unbind"):
        return _squeeze_at(lay, _axis(arg(src, 1, "dim", 0), lay.ndim))  # one slice: that axis gone
    items, nd = _index_items(node), lay.ndim
    if nd is None:
        raise Refusal("indexes a widened tensor of unknown rank", SHAPES_HINT, needs_shapes=True)
    if sum(1 for i in items if i is Ellipsis) > 1 or any(isinstance(i, fx.Node) for i in items):
        raise Refusal("indexes the widened tensor with tensors or several ellipses")
    p, axis, out_axis, out_nd = nd + lay.dim, 0, None, 0
    for i in _full_index(items, nd):
        if i is None:
            out_nd += 1
            continue
        if axis == p:
            if i != slice(None):
                raise Refusal(f"indexes the widened units' axis with {i!r}")
            out_axis = out_nd
        if not isinstance(i, int):
            out_nd += 1
        axis += 1
    return replace(lay, dim=out_axis - out_nd, ndim=out_nd)  # type: ignore[operator]


def _expand_sizes(node: fx.Node) -> Sequence[object]:
    """The sizes of ``t.expand(*sizes)`` or ``t.expand(sizes)``."""
    return node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]


def _expand_keeps_units(lay: Layout, node: fx.Node, ctx: Context) -> Layout:
    """``t.expand(sizes)`` broadcasts other axes and may add leading ones; on the units' axis it must keep the
    size: -1, or a size read from a widened tensor (repeat_kv's ``expand(b, kv_heads, n_rep, t, d)``). Which
    tensors are widened is known once the walk is done: a size node passes until then, and is checked in its
    last pass."""
    sizes, shape = _expand_sizes(node), ctx.shape(node)
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and shape is not None and len(shape) > 1:
        whole, ndim, size = sizes[0], len(shape), None  # torch.broadcast_to(t, other.shape): a shape read whole
    else:
        whole, ndim, size = None, len(sizes), _expanded_units(sizes, lay)
    if whole is not None or (size != -1 and (ctx.final or not isinstance(size, fx.Node))):
        try:
            old, new = ctx.widths(lay)
            got = [ctx.value(size, new=n) if whole is None else ctx.value(whole, new=n)[lay.dim] for n in (False, True)]
            kept = shape is not None and got == [shape[lay.dim], shape[lay.dim] // old * new]
        except Exception:  # a size autogrow cannot evaluate (no recorded shapes, not an integer program)
            kept = False
        if not kept and (ctx.final or whole is None):  # a shape read whole from a tensor widened later: last pass
            raise Refusal("expands to a fixed size on the units' axis", "Expand with -1 there.")
    return replace(lay, ndim=ndim)


def _expanded_units(sizes: Sequence[object], lay: Layout) -> object:
    """The size ``t.expand(*sizes)`` gives the units' axis (``None``: the axis is not among them)."""
    return sizes[len(sizes) + lay.dim] if len(sizes) >= -lay.dim else None


def _inverse_expand(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    size, shape, src = _expanded_units(_expand_sizes(node), lay), ctx.shape(node), ctx.shape(node.args[0])
    if (ctx.one_piece() and isinstance(size, BoundSize) and shape is not None and src is not None
            and len(src) >= -lay.dim and src[lay.dim] == 1 and size == shape[lay.dim]):
        old, new = ctx.widths(lay)  # multi-query repeat_kv: n_rep copies of the one key/value head, one per query
        ctx.rebind(size, size // old * new)  # head (num_key_value_groups): as many as the query heads become
    out = _expand_keeps_units(lay, node, ctx)
    return replace(out, ndim=len(src) if src is not None else None)


@layout_rule("expand", torch.broadcast_to, inverse=_inverse_expand)
def expand(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    return _expand_keeps_units(lay, node, ctx)


def _repeats(node: fx.Node, lay: Layout) -> int | None:
    """How many times ``repeat_interleave`` repeats each entry of the units' axis (``None``: another axis)."""
    n, dim = arg(node, 1, "repeats", None), arg(node, 2, "dim", None)
    if dim is None or not isinstance(n, int):
        raise Refusal("repeats the widened tensor's entries by a tensor or over the flattened tensor",
                      "Repeat by an int along one axis (k.repeat_interleave(n_rep, dim=1)).")
    return n if _axis(dim, lay.ndim) == lay.dim else None


def _inverse_repeat_interleave(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    n = _repeats(node, lay)
    return lay if n is None else replace(lay, rep=_fewer(lay, n))


@layout_rule(torch.repeat_interleave, "repeat_interleave", inverse=_inverse_repeat_interleave)
def repeat_interleave(lay: Layout, node: fx.Node, module: nn.Module | None, ctx: Context) -> Layout:
    """``k.repeat_interleave(n_rep, dim=1)``: each key/value head serves ``n_rep`` query heads (GQA)."""
    if lay.flat:
        raise Refusal("repeats the entries of a flattened widened tensor")
    n = _repeats(node, lay)
    return lay if n is None else replace(lay, rep=lay.rep * n)
