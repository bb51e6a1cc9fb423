"""Where the widened units sit in a tensor, and how each kind of op moves them: one pure function per op.

A :class:`Layout` says which axis of a tensor holds the widened units (counted from the end, so
that the batch and other leading axes do not matter), the tensor's rank when it is known, which
unit mapping applies, and whether the units have been flattened into channel-major blocks. The
rules below take a layout and an op's arguments and return the layout of the op's output, or raise
:class:`Refusal` saying why the op cannot follow a widening exactly.

    >>> lay = Layout(dim=-3, ndim=4, key=None)          # conv output (N, C, H, W), C widened
    >>> flatten(lay, 1, -1)                              # x.flatten(1): C-major blocks of H*W
    Layout(dim=-1, ndim=2, key=None, flat=True)
    >>> reduce(lay, (2, 3), keepdim=False)               # x.mean((2, 3)): global pooling
    Layout(dim=-1, ndim=2, key=None, flat=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch.fx as fx

__all__ = ["Layout", "Refusal", "cat_axis", "flatten", "reduce", "view_as_flatten"]


class Refusal(Exception):
    """An op cannot keep a widening exact: ``why`` (completes "node X ...") and an optional ``fix``."""

    def __init__(self, why: str, fix: str = "") -> None:
        super().__init__(why)
        self.why, self.fix = why, fix


@dataclass(frozen=True)
class Layout:
    """Where the widened units sit in one tensor."""

    dim: int  # axis counted from the end
    ndim: int | None  # rank of the tensor when known (convolutions), else None
    key: fx.Node | None  # which unit mapping: None for the widened layer's own, else a concatenation node
    flat: bool = False  # features are channel-major blocks after a flatten (block size from the consumer)


def flatten(lay: Layout, start: int, end: int) -> Layout:
    """``flatten(start, end)``: the units stay an axis, or become the outer index of a flattened block."""
    if lay.ndim is None:
        if lay.dim == -1 and start == 1 and end == -1:
            return lay  # a Linear output in a 2-D batch: flatten(1) changes nothing
        raise Refusal("flattens a tensor of unknown rank")
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


def reduce(lay: Layout, dims: int | Sequence[int] | None, keepdim: bool) -> Layout:
    """``mean/sum/amax(dims)``: allowed over any axes but the units'."""
    if dims is None or lay.ndim is None or lay.flat:
        raise Refusal("reduces over the units' axis (or over a tensor of unknown rank)")
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


def view_as_flatten(lay: Layout, shape: Sequence[object], batch_first: bool) -> Layout:
    """``view/reshape(x.size(0), -1)`` (``batch_first``: the first size is the batch size) is a flatten;
    any other target shape is fixed and refused."""
    if len(shape) == 2 and shape[1] == -1 and batch_first:
        return flatten(lay, 1, -1)
    raise Refusal(f"reshapes the widened tensor to a fixed shape {tuple(map(str, shape))}",
                  "Use x.flatten(1), x.view(x.size(0), -1) or nn.Flatten() instead.")


def cat_axis(lay: Layout, dim: int) -> int:
    """The axis (from the end) a ``cat(dim=dim)`` joins, in the terms of ``lay``."""
    if dim < 0:
        return dim
    if lay.ndim is not None:
        return dim - lay.ndim
    if dim == 1 and lay.dim == -1:
        return -1  # features of a Linear output in a 2-D batch
    raise Refusal(f"concatenates on dim={dim} of a tensor of unknown rank")
