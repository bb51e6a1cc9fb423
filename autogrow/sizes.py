"""Sizes read from widened tensors: which values depend on the width, and what they become.

A forward may read sizes from tensors (``b, t, c = x.shape``, ``h / h.size(-1)``,
``y.view(b, t, c)``) and compute with them. When ``x`` is widened, every value that reads its
units' axis changes. :class:`SizeReader` answers, for any scalar node of the graph, whether it
depends on a widened width and (with the shapes recorded on example inputs) what its value is
before and after the widening, by re-evaluating the little integer program that computed it.
The coupling walk then accepts a use only where the new value keeps the forward exact (a reshape
whose target still matches the widened tensor) and refuses every other use, naming the node.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch.fx as fx

from autogrow.bound import BoundExpr, BoundSize, resolve
from autogrow.errors import SHAPES_HINT
from autogrow.layout import Layout, Refusal, arg

__all__ = ["SCALAR_OPS", "SizeReader", "Unknown"]

SCALAR_OPS: dict[Callable, Callable] = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.floordiv: operator.floordiv, operator.truediv: operator.truediv, operator.mod: operator.mod,
    operator.pow: operator.pow, operator.neg: operator.neg, math.sqrt: math.sqrt, int: int, float: float,
}


class Unknown(Exception):
    """The value of a node cannot be computed (no recorded shapes, or not an integer program)."""


class SizeReader:
    """Evaluates size expressions of one graph, before (``new=False``) and after (``new=True``) widening.

    Args:
        shapes: recorded shapes/values per node (``autogrow.shapes.propagate``), or ``None``.
        layout_of: the layout of a tensor node if it is widened, else ``None``.
        widths: ``(old, new)`` width of the tensor a layout describes (its units' axis, blocks included).
    """

    def __init__(self, shapes: dict[fx.Node, Any] | None, layout_of: Callable[[fx.Node], Layout | None],
                 widths: Callable[[Layout], tuple[int, int]], rebinds: Mapping[tuple[str, str], int] | None = None
                 ) -> None:
        self.shapes, self.layout_of, self.widths = shapes, layout_of, widths
        self.rebinds = rebinds if rebinds is not None else {}  # attributes the growth rewrites (autogrow.bound)

    # -- which axis a size query reads ---------------------------------------------------------------
    def _axis_of(self, lay: Layout, axis: int) -> bool:
        """Whether ``axis`` (from the front if >= 0) of a tensor with layout ``lay`` is its units' axis."""
        if axis < 0:
            return axis == lay.dim
        if lay.ndim is not None:
            return axis - lay.ndim == lay.dim
        if axis == 0:
            return False  # the batch axis (a widened tensor of unknown rank is at least 2-D)
        raise Refusal(f"reads axis {axis} of a widened tensor of unknown rank", SHAPES_HINT, needs_shapes=True)

    def is_size(self, x: object) -> bool:
        """Whether ``x`` is a size expression: literals, size queries and integer arithmetic on them."""
        if not isinstance(x, fx.Node):
            return not isinstance(x, (tuple, list)) or all(self.is_size(a) for a in x)
        if self._query(x)[0] is not None or (x.op == "call_method" and x.target == "dim"):
            return True
        if x.op == "call_function" and x.target is operator.getitem:
            return self._is_size_tuple(x.args[0])
        return x.op == "call_function" and x.target in SCALAR_OPS and all(self.is_size(a) for a in x.args)

    def reads_width(self, x: object) -> bool:
        """Whether size expression ``x`` is computed from a widened units' axis (False for tensors)."""
        if not isinstance(x, fx.Node):
            return isinstance(x, (tuple, list)) and any(self.reads_width(a) for a in x)
        if not self.is_size(x):
            return False
        tensor, axis = self._query(x)
        if tensor is not None:
            lay = self.layout_of(tensor)
            return lay is not None and (axis is None or self._axis_of(lay, axis))
        if x.op == "call_function" and x.target is operator.getitem and self._is_size_tuple(x.args[0]):
            tensor, _ = self._query(x.args[0])
            lay = self.layout_of(tensor)
            return lay is not None and self._axis_of(lay, x.args[1])
        if x.op == "call_function" and x.target in SCALAR_OPS:
            return any(self.reads_width(a) for a in x.args)
        return False

    def _query(self, x: fx.Node) -> tuple[fx.Node | None, int | None]:
        """(tensor, axis) read by a size query; axis ``None`` for the whole shape; (None, None) otherwise."""
        if x.op == "call_method" and x.target == "size":
            d = arg(x, 1, "dim", None)
            return x.args[0], d
        if x.op == "call_function" and x.target is getattr and x.args[1] == "shape":
            return x.args[0], None
        return None, None

    def _is_size_tuple(self, x: object) -> bool:
        return isinstance(x, fx.Node) and self._query(x)[0] is not None and self._query(x)[1] is None

    # -- values ----------------------------------------------------------------------------------------
    def value(self, x: object, new: bool) -> Any:
        """The value of ``x`` (a literal, a size query, or integer arithmetic on them).

        Raises:
            Unknown: no recorded shapes, or ``x`` is not an integer program.
        """
        if isinstance(x, (tuple, list)):
            return type(x)(self.value(a, new) for a in x)
        if isinstance(x, (BoundSize, BoundExpr)) and new:
            return resolve(x, self.rebinds)  # computed from attributes: their values after the growth rewrites them
        if not isinstance(x, fx.Node):
            return x
        if self.shapes is None:
            raise Unknown(x)
        tensor, axis = self._query(x)
        if tensor is not None:
            shape = self.tensor_shape(tensor, new)
            return shape if axis is None else shape[axis]
        if x.op == "call_function" and x.target is operator.getitem and self._is_size_tuple(x.args[0]):
            return self.value(x.args[0], new)[x.args[1]]
        if x.op == "call_function" and x.target in SCALAR_OPS:
            return SCALAR_OPS[x.target](*(self.value(a, new) for a in x.args))
        raise Unknown(x)

    def tensor_shape(self, tensor: fx.Node, new: bool) -> tuple[int, ...]:
        """The recorded shape of ``tensor``; with ``new``, its units' axis at the widened size."""
        shape = self.shapes.get(tensor) if self.shapes is not None else None
        if not isinstance(shape, tuple):
            raise Unknown(tensor)
        lay = self.layout_of(tensor)
        if not new or lay is None:
            return shape
        old, wide = self.widths(lay)
        out = list(shape)
        out[lay.dim] = shape[lay.dim] // old * wide
        return tuple(out)
