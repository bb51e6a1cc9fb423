"""Find every layer coupled to a widened tensor by tracing the model with ``torch.fx``.

Widening a layer's output changes the width of a tensor. Everything that tensor flows into must
follow: element-wise ops pass the new width on, BatchNorm/LayerNorm gain entries, the next weighted
layers gain input features (a flattened conv output brings an H*W block per channel), a residual add
forces its other operands (and their producers) to grow with the *same* unit mapping, and a
concatenation shifts the mapping by an offset. The walk below follows these rules and refuses,
naming the node, whatever it cannot keep exact.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from autogrow.errors import AutogrowError
from autogrow.registry import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    channel_spec,
    is_elementwise,
    layer_spec,
)

BASE = "base"  # key of the mapping drawn for the widened layer itself


try:  # torch.compile's wrapper; its original module holds the live parameters
    from torch._dynamo.eval_frame import OptimizedModule
except ImportError:  # pragma: no cover - torch builds without dynamo
    OptimizedModule = ()  # type: ignore[assignment,misc]


class _Tracer(fx.Tracer):
    def call_module(self, m: nn.Module, forward: object, args: tuple, kwargs: dict) -> object:
        if isinstance(m, OptimizedModule):  # trace what was compiled; surgery then triggers a recompile
            return self.call_module(m._orig_mod, m._orig_mod.forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Registered layers are atoms; everything else (Sequential, user blocks) is traced through.
        if layer_spec(m) or channel_spec(m) or is_elementwise(m):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The model's forward as an ``fx.Graph``, or an :class:`AutogrowError` saying why not."""
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises many types for data-dependent control flow
        raise AutogrowError(
            f"model: torch.fx could not trace {type(model).__name__}.forward ({type(e).__name__}: {e}). "
            "autogrow needs a forward without data-dependent Python control flow."
        ) from e


def call_sites(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    sites: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            sites.setdefault(node.target, []).append(node)
    return sites


def describe(node: fx.Node, model: nn.Module | None = None) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    if model is not None and node.op == "call_module":
        target = f"{target}: {type(model.get_submodule(node.target)).__name__}"
    return f"node '{node.name}' ({node.op} {target})"


@dataclass(frozen=True)
class Layout:
    """Where the widened units sit in one tensor."""

    dim: int  # axis counted from the end
    ndim: int | None  # rank of the tensor when known (convolutions), else None
    map: str  # key into the walk's mappings
    flat: bool = False  # features are channel-major blocks after a flatten (block size from consumer)


@dataclass(frozen=True)
class CatMap:
    """A mapping for a concatenation: each part is (mapping key or None if untouched, old width)."""

    parts: tuple[tuple[str | None, int], ...]


_BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                 operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_SHAPE_METHODS = {"size", "dim"}


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device")


def _arg(node: fx.Node, pos: int, name: str, default: object) -> object:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _is_batch_size(x: object, of: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` of tensor ``of``."""
    if not isinstance(x, fx.Node):
        return False
    if x.op == "call_method" and x.target == "size" and x.args[0] is of and _arg(x, 1, "dim", None) == 0:
        return True
    return (x.op == "call_function" and x.target is operator.getitem and x.args[1] == 0
            and isinstance(x.args[0], fx.Node) and x.args[0].op == "call_function"
            and x.args[0].target is getattr and x.args[0].args == (of, "shape"))


class CouplingWalk:
    """Collects the producers, channel-wise layers and consumers tied to one widened layer."""

    def __init__(self, model: nn.Module, target: str, graph: fx.Graph | None = None) -> None:
        self.model = model
        self.target = target
        self.graph = graph if graph is not None else trace(model)
        self.sites = call_sites(self.graph)
        self.layouts: dict[fx.Node, Layout] = {}
        self.maps: dict[str, CatMap | None] = {BASE: None}
        self.old_width: int | None = None
        self.producers: dict[str, str] = {}  # module -> mapping key of its output
        self.channelwise: dict[str, str] = {}  # module -> mapping key
        self.consumers: dict[str, tuple[str, bool]] = {}  # module -> (mapping key, flat)
        self.uniform_only: list[str] = []
        self._queue: deque[fx.Node] = deque()

    # -- entry -----------------------------------------------------------------------------
    def run(self) -> CouplingWalk:
        if self.target not in self.sites:
            names = [n for n, m in self.model.named_modules() if layer_spec(m) is not None]
            raise AutogrowError(f"target: {self.target!r} is not a module called in forward; "
                                f"growable layers: {names}")
        module = self.model.get_submodule(self.target)
        if layer_spec(module) is None:
            raise AutogrowError(f"target: {self.target!r} is a {type(module).__name__}, which has no registered "
                                "LayerSpec; widen a Linear/ConvNd/Embedding or register the type with "
                                "autogrow.register_layer")
        self._add_producer(self.target, self.sites[self.target][0])
        while self._queue:
            node = self._queue.popleft()
            for user in list(node.users):
                self._forward(node, user)
        self._check_cats()
        return self

    def fail(self, node: fx.Node, why: str, fix: str = "") -> None:
        msg = f"target: cannot widen {self.target!r} exactly: {describe(node, self.model)} {why}."
        raise AutogrowError(msg + (f" {fix}" if fix else ""))

    # -- bookkeeping ----------------------------------------------------------------------
    def width(self, key: str) -> int:
        m = self.maps[key]
        assert self.old_width is not None
        return self.old_width if m is None else sum(w for _, w in m.parts)

    def _mark(self, node: fx.Node, layout: Layout) -> None:
        old = self.layouts.get(node)
        if old is None:
            self.layouts[node] = layout
            self._queue.append(node)
        elif old != layout:
            self.fail(node, f"is reached with two different feature layouts ({old} and {layout})")

    def _module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(node.target)

    def _add_producer(self, name: str, node: fx.Node) -> None:
        m = self.model.get_submodule(name)
        spec = layer_spec(m)
        assert spec is not None
        reason = spec.check(m)
        if reason:
            self.fail(node, f"is a producer with {reason}")
        width = getattr(m, spec.out_attr)
        if self.old_width is None:
            self.old_width = width
        elif width != self.old_width:
            self.fail(node, f"must grow with {self.target!r} but has {width} units, not {self.old_width}")
        self.producers[name] = BASE
        ndim = -spec.out_dim + 1 if spec.out_dim < -1 else None
        for site in self.sites[name]:  # a module called twice shares its parameters: both outputs grow
            self._mark(site, Layout(spec.out_dim, ndim, BASE))

    # -- forward: what a widened tensor flows into ---------------------------------------------
    def _forward(self, node: fx.Node, user: fx.Node) -> None:
        lay = self.layouts[node]
        if user in self.layouts and not (user.op == "call_module" and layer_spec(self._module(user))):
            return  # already handled when first reached (merges, cats, residual paths)
        if user.op == "output":
            self.fail(user, "is the model's output, whose width would change",
                      "Widen a hidden layer, not the last one.")
        if _is_shape_query(user):
            return
        if user.op == "call_module":
            self._forward_module(node, user, lay)
        elif user.op in ("call_function", "call_method"):
            self._forward_op(node, user, lay)
        else:
            self.fail(user, "cannot take a widened input")

    def _forward_module(self, node: fx.Node, user: fx.Node, lay: Layout) -> None:
        name, m = user.target, self._module(user)
        if user.args[0] is not node or any(a is node for a in user.args[1:]):
            self.fail(user, "takes the widened tensor in an argument other than its first")
        spec = layer_spec(m)
        if spec is not None:
            return self._add_consumer(name, user, lay)
        cspec = channel_spec(m)
        if cspec is not None:
            return self._add_channelwise(name, user, lay)
        if is_elementwise(m):
            return self._mark(user, lay)
        if isinstance(m, nn.Flatten):
            return self._mark(user, self._flatten(user, lay, m.start_dim, m.end_dim))
        self.fail(user, f"is a {type(m).__name__}, which autogrow does not know how to widen",
                  "Register it with autogrow.register_layer, register_channelwise or register_elementwise.")

    def _forward_op(self, node: fx.Node, user: fx.Node, lay: Layout) -> None:
        t = user.target
        fn = t if user.op == "call_function" else None
        meth = t if user.op == "call_method" else None
        if fn in ELEMENTWISE_FUNCTIONS or meth in ELEMENTWISE_METHODS:
            if user.args[0] is not node or _tensor_args(user)[1:]:
                self.fail(user, "mixes the widened tensor with another tensor")
            return self._mark(user, lay)
        if fn in _BINARY_FUNCS or meth in _BINARY_METHODS:
            return self._merge(user, lay)
        if fn is torch.cat:
            return self._cat(user, lay)
        if fn is torch.flatten or meth == "flatten":
            start, end = _arg(user, 1, "start_dim", 0), _arg(user, 2, "end_dim", -1)
            return self._mark(user, self._flatten(user, lay, start, end))
        if meth in ("view", "reshape") or fn is torch.reshape:
            shape = user.args[1:] if meth else user.args[1]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = shape[0]
            if len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], node):
                return self._mark(user, self._flatten(user, lay, 1, -1))
            self.fail(user, f"reshapes the widened tensor to a fixed shape {tuple(map(str, shape))}",
                      "Use x.flatten(1), x.view(x.size(0), -1) or nn.Flatten() instead.")
        if fn in _REDUCE_FUNCS or meth in _REDUCE_METHODS:
            return self._mark(user, self._reduce(user, lay))
        self.fail(user, "is an operation that autogrow cannot keep exact on a widened tensor",
                  "Supported: registered modules, element-wise ops, add/sub/mul, cat, flatten, "
                  "view(x.size(0), -1), mean/sum over other axes.")

    def _add_consumer(self, name: str, node: fx.Node, lay: Layout) -> None:
        m = self._module(node)
        spec = layer_spec(m)
        assert spec is not None
        if spec.in_attr is None:
            self.fail(node, f"is a {type(m).__name__}, which takes indices, not features")
        reason = spec.check(m)
        if reason:
            self.fail(node, f"is a consumer with {reason}")
        in_width, width = getattr(m, spec.in_attr), self.width(lay.map)
        if lay.flat:
            if spec.in_dim != -1 or in_width % width:
                self.fail(node, f"reads a flattened tensor of {width} channels but has {spec.in_attr}="
                          f"{in_width}, not a multiple")
        elif lay.dim != spec.in_dim:
            self.fail(node, f"expects features on axis {spec.in_dim}, but the widened units are on axis {lay.dim}")
        elif in_width != width:
            self.fail(node, f"has {spec.in_attr}={in_width}, but the widened tensor has {width} features")
        entry = (lay.map, lay.flat)
        if self.consumers.setdefault(name, entry) != entry:
            self.fail(node, "is reached with two different feature layouts")
        for site in self.sites[name]:  # shared weights: every call's input must grow the same way
            if site.args[0] not in self.layouts:
                self._backward(site.args[0], lay, site)

    def _add_channelwise(self, name: str, node: fx.Node, lay: Layout) -> None:
        m = self._module(node)
        cspec = channel_spec(m)
        assert cspec is not None
        reason = cspec.check(m)
        if reason:
            self.fail(node, f"has {reason}")
        if lay.flat or lay.dim not in cspec.dims:
            self.fail(node, f"normalises axes {cspec.dims}, but the widened units are on axis {lay.dim}"
                      + (" (flattened)" if lay.flat else ""))
        if cspec.uniform_only and name not in self.uniform_only:
            self.uniform_only.append(name)
        self.channelwise[name] = lay.map
        for site in self.sites[name]:
            self._mark(site, lay)
            if site.args[0] not in self.layouts:
                self._backward(site.args[0], lay, site)

    def _merge(self, user: fx.Node, lay: Layout) -> None:
        """Element-wise op over several tensors: all of them must grow with the same mapping."""
        self._mark(user, lay)
        for a in _tensor_args(user):
            if a not in self.layouts:
                self._backward(a, lay, user)
            if self.layouts[a].map != lay.map or self.layouts[a].dim != lay.dim:
                self.fail(user, f"combines tensors whose units are mapped differently ({a.name})")

    def _backward(self, node: fx.Node, lay: Layout, via: fx.Node) -> None:
        """``node`` must become widened with ``lay`` because ``via`` combines it with a widened tensor."""
        if node in self.layouts:
            return
        if not isinstance(node, fx.Node):
            self.fail(via, "combines the widened tensor with a constant of fixed width")
        if node.op == "call_module":
            m = self._module(node)
            spec = layer_spec(m)
            if spec is not None:
                if lay.map != BASE or spec.out_dim != lay.dim or lay.flat:
                    self.fail(via, f"joins {node.target!r} to a tensor it cannot be mapped onto")
                return self._add_producer(node.target, node)
            if channel_spec(m) is not None:
                return self._add_channelwise(node.target, node, lay)
            if is_elementwise(m):
                self._mark(node, lay)
                return self._backward(node.args[0], lay, node)
        elif node.op in ("call_function", "call_method"):
            t = node.target
            if t in ELEMENTWISE_FUNCTIONS or t in ELEMENTWISE_METHODS:
                self._mark(node, lay)
                return self._backward(node.args[0], lay, node)
            if t in _BINARY_FUNCS or t in _BINARY_METHODS:
                return self._merge(node, lay)
        self.fail(via, f"adds or multiplies the widened tensor with {describe(node, self.model)}, whose width is fixed",
                  "Residual paths can be widened when every operand comes from a registered layer.")

    def _cat(self, user: fx.Node, lay: Layout) -> None:
        tensors, dim = user.args[0], _arg(user, 1, "dim", 0)
        if dim < 0:
            neg = dim
        elif lay.ndim is not None:
            neg = dim - lay.ndim
        elif dim == 1 and lay.dim == -1:
            neg = -1  # features of a Linear output in a 2-D batch
        else:
            self.fail(user, f"concatenates on dim={dim} of a tensor of unknown rank")
        if neg != lay.dim:
            return self._merge(user, lay)  # along another axis: an element-wise merge
        parts = []
        for t in tensors:
            if t in self.layouts:
                tl = self.layouts[t]
                if tl.flat or tl.dim != lay.dim:
                    self.fail(user, f"concatenates {t.name}, whose units sit on another axis")
                parts.append((tl.map, self.width(tl.map)))
            else:
                parts.append((None, self._width_of(t, user)))
        key = f"cat:{user.name}"
        self.maps[key] = CatMap(tuple(parts))
        self._mark(user, Layout(lay.dim, lay.ndim, key))

    def _check_cats(self) -> None:
        for key, m in self.maps.items():
            if m is None:
                continue
            node = next(n for n in self.graph.nodes if f"cat:{n.name}" == key)
            for (k, _), t in zip(m.parts, node.args[0]):
                if k is None and t in self.layouts:
                    self.fail(node, f"concatenates {t.name}, which became widened by a later residual path")

    def _width_of(self, node: fx.Node, via: fx.Node) -> int:
        if node.op == "call_module":
            m = self._module(node)
            spec = layer_spec(m)
            if spec is not None:
                return getattr(m, spec.out_attr)
            if channel_spec(m) is not None or is_elementwise(m):
                return self._width_of(node.args[0], via)
        elif node.target in ELEMENTWISE_FUNCTIONS or node.target in ELEMENTWISE_METHODS:
            return self._width_of(node.args[0], via)
        self.fail(via, f"concatenates {describe(node, self.model)}, whose width autogrow cannot determine")
        raise AssertionError  # unreachable

    def _flatten(self, node: fx.Node, lay: Layout, start: int, end: int) -> Layout:
        if lay.ndim is None:
            if lay.dim == -1 and start == 1 and end == -1:
                return lay  # a Linear output in a 2-D batch: flatten(1) changes nothing
            self.fail(node, "flattens a tensor of unknown rank")
        nd = lay.ndim
        s, e, p = start % nd, end % nd, nd + lay.dim
        if s == e:
            return lay
        new_nd = nd - (e - s)
        if p < s:
            return Layout(p - new_nd, new_nd, lay.map, lay.flat)
        if p > e:
            return Layout(p - (e - s) - new_nd, new_nd, lay.map, lay.flat)
        if p == s and e == nd - 1 and not lay.flat:
            return Layout(-1, new_nd, lay.map, flat=True)
        self.fail(node, f"flattens axes {s}..{e} so that the units (axis {p}) are not the outer index")
        raise AssertionError  # unreachable

    def _reduce(self, node: fx.Node, lay: Layout) -> Layout:
        dims, keep = _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False)
        if dims is None or lay.ndim is None or lay.flat:
            self.fail(node, "reduces over the units' axis (or over a tensor of unknown rank)")
        dims = [dims] if isinstance(dims, int) else list(dims)
        nd = lay.ndim
        pos = sorted(d % nd for d in dims)
        p = nd + lay.dim
        if p in pos:
            self.fail(node, "reduces over the widened units")
        if keep:
            return lay
        new_nd = nd - len(pos)
        new_p = p - sum(1 for d in pos if d < p)
        return Layout(new_p - new_nd, new_nd, lay.map)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node) and not _is_shape_query(a):
            out.append(a)
    return out
