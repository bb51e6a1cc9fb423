"""Trace what actually ran: the graph of the ops a forward executed on example inputs.

torch.fx traces symbolically and fails on Python control flow over tensors or on ``**kwargs`` passed through
decorators (Hugging Face's models). :func:`capture` runs the forward once instead, under a
``TorchFunctionMode`` that records every torch call and with hooks that record each registered layer as one
``call_module``, and builds the same kind of ``fx.Graph`` the coupling walk reads, with every tensor's shape.
Sizes read from tensors (``x.size(-1)``, ``x.shape``) come back as ints that remember the graph node computing
them, so reshapes that follow the width stay recognisable. The graph is the path these inputs took: a branch
they did not take is not in it (which is why the grown model is checked on them, and why this is a fallback).

    >>> import torch, torch.nn as nn
    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         h = self.a(x)
    ...         return self.b(h if bool(h.sum() > -1e9) else -h)  # control flow on a value: fx cannot trace it
    >>> graph, shapes = capture(Gate(), torch.zeros(3, 4))
    >>> [n.target for n in graph.nodes if n.op == "call_module"]
    ['a', 'b']
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from autogrow.bound import BoundExpr, BoundSize, bound_sizes
from autogrow.errors import AutogrowError, NeedsShapes, fail
from autogrow.ops import OpKind, classify_module
from autogrow.shapes import as_args, eval_mode, propagate
from autogrow.trace import trace

__all__ = ["capture", "traced"]

_ARITH = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
          "mod": operator.mod, "pow": operator.pow}
_DUNDER = {"__add__": operator.add, "__sub__": operator.sub, "__mul__": operator.mul,
           "__truediv__": operator.truediv, "__matmul__": operator.matmul, "__getitem__": operator.getitem,
           "__neg__": operator.neg, "__pow__": operator.pow, "__floordiv__": operator.floordiv,
           "__mod__": operator.mod}
_REFLECTED = {f"__r{k[2:]}": v for k, v in _DUNDER.items() if k not in ("__getitem__", "__neg__")}


class _Size(int):
    """An int read from a tensor's shape (or computed from such ints) that remembers its graph node."""

    node: fx.Node

    def __new__(cls, value: int, node: fx.Node) -> _Size:
        out = int.__new__(cls, value)
        out.node = node
        return out

    def __neg__(self) -> _Size:
        return _Size(-int(self), self.node.graph.call_function(operator.neg, (self.node,)))


def _arith(fn: Any, reflected: bool) -> Any:
    def op(self: _Size, other: Any) -> Any:
        if not isinstance(other, int) or isinstance(other, bool):
            return NotImplemented
        a, b = (other, self) if reflected else (self, other)
        value = fn(int(a), int(b))
        node = self.node.graph.call_function(fn, tuple(x.node if isinstance(x, _Size) else x if isinstance(
            x, (BoundSize, BoundExpr)) else int(x) for x in (a, b)))  # an attribute's size: rewritable
        return _Size(value, node) if isinstance(value, int) else value
    return op


for _name, _fn in _ARITH.items():
    setattr(_Size, f"__{_name}__", _arith(_fn, False))
    setattr(_Size, f"__r{_name}__", _arith(_fn, True))


class _Recorder(TorchFunctionMode):
    """Every torch call made outside a registered layer, as graph nodes; tensors and sizes mapped to nodes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}  # id(tensor) -> node (tensors kept alive in self.keep)
        self.shapes: dict[fx.Node, Any] = {}
        self.keep: list[torch.Tensor] = []
        self.inside = 0  # > 0: within a registered layer, recorded as one call_module
        self.attrs: dict[int, str] = {}
        for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            self.attrs.setdefault(id(t), n)
        self.names: dict[int, str] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), n)

    def arg(self, x: Any) -> Any:
        """``x`` with tensors and sizes replaced by their nodes."""
        if isinstance(x, _Size):
            return x.node
        if isinstance(x, torch.Tensor):
            if id(x) not in self.nodes:  # a parameter, a buffer, or a tensor made where nothing was recorded
                name = self.attrs.get(id(x), f"_autogrow_constant_{len(self.keep)}")  # a constant: fixed width
                self.bind(x, self.graph.get_attr(name))
            return self.nodes[id(x)]
        if isinstance(x, (tuple, list)):
            return type(x)(self.arg(v) for v in x) if not isinstance(x, torch.Size) else tuple(map(self.arg, x))
        if isinstance(x, dict):
            return {k: self.arg(v) for k, v in x.items()}
        return x

    def bind(self, out: Any, node: fx.Node) -> None:
        if isinstance(out, torch.Tensor):
            self.nodes[id(out)] = node
            self.shapes[node] = tuple(out.shape)
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.bind(o, self.graph.call_function(operator.getitem, (node, i)))

    def sizes(self, out: Any, node: fx.Node) -> Any:
        """A size query's result as ints that remember their nodes."""
        if isinstance(out, torch.Size):
            return torch.Size([_Size(v, self.graph.call_function(operator.getitem, (node, i))) for i, v in
                               enumerate(out)])
        return _Size(out, node)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        name = getattr(func, "__name__", "")
        prop = getattr(getattr(func, "__self__", None), "__name__", "") if name == "__get__" else ""  # x.shape, x.T
        if (name == "size" or prop == "shape") and args and isinstance(args[0], torch.Tensor):
            src = self.arg(args[0])
            node = (self.graph.call_method("size", (src, *self.arg(args[1:])), self.arg(kwargs)) if name == "size"
                    else self.graph.call_function(getattr, (src, "shape")))
            self.shapes[node] = tuple(out) if isinstance(out, torch.Size) else int(out)
            return self.sizes(out, node)
        if name == "__setitem__" and isinstance(args[0], torch.Tensor):  # x[i] = v writes into x: x is now this
            self.bind(args[0], self.graph.call_function(operator.setitem, self.arg(tuple(args))))
            return out
        if not isinstance(out, torch.Tensor) and not (isinstance(out, (tuple, list)) and
                                                      any(isinstance(o, torch.Tensor) for o in out)):
            return out  # metadata (dtype, device, dim, numel...): not part of the graph
        a, k = self.arg(tuple(args)), self.arg(kwargs)
        if prop:  # a tensor-valued property: autogrow knows none of them as an op (refused where it matters)
            node = self.graph.call_function(getattr, (a[0], prop))
        elif name in _DUNDER or name in _REFLECTED:
            fn = _DUNDER.get(name) or _REFLECTED[name]
            node = self.graph.call_function(fn, a if name in _DUNDER else (a[1], a[0]), k)
        elif getattr(func, "__qualname__", "").startswith(("Tensor.", "TensorBase.", "_TensorBase.")):
            node = self.graph.call_method(name, a, k)
        else:
            node = self.graph.call_function(func, a, k)
        self.bind(out, node)
        return out


def capture(model: nn.Module, example_inputs: Any) -> tuple[fx.Graph, dict[fx.Node, Any]]:
    """The graph of what ``model``'s forward ran on ``example_inputs`` (eval mode, no gradients), registered
    layers as ``call_module`` nodes, and the shape of every tensor node (the value of every size node)."""
    rec = _Recorder(model)
    args = as_args(example_inputs)
    for i, x in enumerate(args):
        rec.bind(x, rec.graph.placeholder(f"input_{i}"))

    def enter(m: nn.Module, a: tuple, k: dict) -> None:
        rec.inside += 1

    def leave(m: nn.Module, a: tuple, k: dict, out: Any) -> None:
        rec.inside -= 1
        if rec.inside == 0:
            if not a and len(k) == 1:  # layer(hidden_states=x): its input, as the walk expects it, first
                a, k = tuple(k.values()), {}
            rec.bind(out, rec.graph.call_module(rec.names[id(m)], rec.arg(tuple(a)), rec.arg(k)))

    leaves = [m for m in model.modules() if m is not model and classify_module(m).kind is not OpKind.OTHER]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                           m.register_forward_hook(leave, with_kwargs=True))]
    try:
        with torch.no_grad(), eval_mode(model), bound_sizes(model), rec:
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    tensors = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
    rec.graph.output(tuple(rec.arg(t) for t in tensors) if len(tensors) != 1 else rec.arg(tensors[0]))
    return rec.graph, rec.shapes


def traced(model: nn.Module, example_inputs: Any = None, shapes: bool = True
           ) -> tuple[fx.Graph, dict[fx.Node, Any] | None]:
    """The model's graph and, with example inputs, every node's shape: torch.fx's symbolic trace, or where that
    fails and ``example_inputs`` are given, :func:`capture` (warning that it holds the path they took).
    ``shapes=False``: the caller needs the graph only (a captured graph still comes with them, for free).

    Raises:
        NeedsShapes: fx cannot trace the model and there are no example inputs (the message says to pass them).
        AutogrowError: the forward fails on the example inputs.
    """
    try:
        graph = trace(model)
    except AutogrowError as e:
        if example_inputs is None:  # with a batch it may work: NeedsShapes (the callback plans again with one)
            raise NeedsShapes(f"{e} Or pass example_inputs: autogrow then traces what the forward runs on them.") \
                from None
        warnings.warn(f"torch.fx could not trace {type(model).__name__}: autogrow traced what its forward ran on "
                      "example_inputs; growth is checked on them, and exact on the path they take", stacklevel=3)
        try:
            return capture(model, example_inputs)
        except Exception as err:
            fail(f"example_inputs: the model's forward failed on them ({type(err).__name__}: {err})")
    return graph, propagate(model, graph, example_inputs) if example_inputs is not None and shapes else None
