"""Find every layer coupled to a widened tensor by walking the traced graph.

Widening a layer's output changes the width of a tensor. Everything that tensor flows into must
follow: element-wise ops pass the new width on, BatchNorm/LayerNorm gain entries, the next weighted
layers gain input features (a flattened conv output brings an H*W block per channel), a residual add
forces its other operands (and their producers) to grow with the *same* unit mapping, a
concatenation shifts the mapping by an offset, a layer whose output is split into equal parts (a
fused q/k/v) grows every part alike, as if its output were the concatenation of the parts, one split into
unequal pieces (a multi-query ``c_attn``: the query heads, one key and one value head) grows one piece, and under
grouped-query attention a unit is a key/value head with the query heads it serves.
:func:`couple` is a small driver: it classifies each node once (``autogrow.ops``), moves the layout
with the per-op rules of ``autogrow.layout``, and returns a frozen :class:`Coupling`; whatever
cannot stay exact is refused, naming the node.

    >>> import torch.nn as nn
    >>> c = couple(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)), "0")
    >>> list(c.producers), list(c.channelwise), list(c.consumers), c.old_width
    (['0'], ['1'], ['3'], 8)
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autogrow.bound import BoundExpr, BoundSize, leaves
from autogrow.errors import SHAPES_HINT, UNFUSE_HINT, AutogrowError, NeedsShapes, check, fail
from autogrow.layout import (
    Layout,
    NeedsBlock,
    NeedsParts,
    NeedsPieces,
    NeedsRep,
    Refusal,
    arg,
    cat_axis,
    stacked,
    unstacked,
)
from autogrow.ops import Linearity, Op, OpKind, classify
from autogrow.registry import ChannelSpec, LayerSpec, channel_spec, channel_width, layer_spec
from autogrow.sizes import SizeReader
from autogrow.trace import call_sites, describe, not_called, trace

__all__ = ["CatParts", "Coupling", "couple", "not_single_units"]

MapKey = fx.Node | None  # None: the mapping drawn for the widened layer itself; a node: a concatenation's


@dataclass(frozen=True)
class CatParts:
    """The mapping of a concatenation: per input, (its mapping key, or ``False`` if untouched; old width)."""

    parts: tuple[tuple[MapKey | bool, int], ...]


@dataclass(frozen=True)
class Coupling:
    """Everything tied to one widened layer: who grows its output, its entries or its input."""

    target: str
    old_width: int
    producers: Mapping[str, MapKey]  # module -> mapping of its output
    channelwise: Mapping[str, MapKey]
    consumers: Mapping[str, tuple[MapKey, bool]]  # module -> (mapping, input is a flattened block)
    cats: Mapping[fx.Node, CatParts]  # in the order they were found (a cat may contain an earlier one)
    uniform_only: tuple[str, ...]  # channel-wise layers exact only under uniform replication
    unit_block: int = 1  # features per unit: 1, or the head size when the units are attention heads
    grouped: Mapping[str, int] = field(default_factory=dict)  # GroupNorm-like layers -> features per group
    # bare parameters and buffers combined with the widened tensor: (module, tensor name) -> (mapping, axis)
    tensors: Mapping[tuple[str, str], tuple[MapKey, int]] = field(default_factory=dict)
    # why new units mixed from the old ones (init="mix") would change the function; None: they would not
    mix_refusal: str | None = "not checked"
    parts: int = 1  # > 1: the target's output is that many equal pieces (a fused q/k/v), each grown alike
    # producers with several heads per unit: a grouped-query attention's query projection -> query heads per unit
    reps: Mapping[str, int] = field(default_factory=dict)
    # module attributes holding a size the widened units change (autogrow.bound): (module, attribute) -> new value
    rebinds: Mapping[tuple[str, str], int] = field(default_factory=dict)
    fixed: int = 0  # output features of the target that keep their size (unequal pieces: the ones not grown)
    # channel-wise layers over the features of all heads together (OLMo-2's q_norm) -> their entries per unit
    channel_blocks: Mapping[str, int] = field(default_factory=dict)

    def block(self, producer: str) -> int:
        """Rows of ``producer`` per unit (per piece of a fused output): a head's size, times the query heads
        that share one key/value head under grouped-query attention."""
        return self.unit_block * self.reps.get(producer, 1)

    @property
    def unit_features(self) -> int:
        """The target's output features per unit: a head's size (times the query heads of a group), times the
        pieces of a fused output."""
        return self.block(self.target) * self.parts

    def width_rule(self) -> str:
        """What the target's new width must be a multiple of, in words ("" for single units)."""
        if self.fixed:
            return (f" and {self.fixed} plus a multiple of {self.unit_features} (of its output's unequal parts only "
                    f"one grows, by whole units of {self.unit_features}; the other {self.fixed} features keep their "
                    "size)")
        if self.reps:
            return (f" and a multiple of {self.unit_features} (whole key/value heads of {self.unit_block} with "
                    f"their query heads: grouped-query attention, {max(self.reps.values())} query heads per "
                    "key/value head)")
        if self.parts > 1:
            heads = f" of whole heads of {self.unit_block}" if self.unit_block > 1 else ""
            return f" and a multiple of {self.unit_features} ({self.parts} equal parts{heads})"
        return f" and a multiple of its head size {self.unit_block}" if self.unit_block > 1 else ""

    def width(self, key: MapKey) -> int:
        """Old width of the tensor mapped by ``key``."""
        return self.old_width if key is None else sum(w for _, w in self.cats[key].parts)


def couple(model: nn.Module, target: str, width: int | None = None, *, graph: fx.Graph | None = None,
           shapes: dict[fx.Node, Any] | None = None) -> Coupling:
    """The :class:`Coupling` of widening module ``target`` of ``model`` to ``width`` units.

    ``shapes`` (recorded on example inputs, ``autogrow.shapes.propagate`` over the same ``graph``) let
    the walk follow reshapes and size queries exactly; without them it refuses what depends on a
    tensor's unknown rank.

    Raises:
        AutogrowError: naming the node that cannot follow the widening exactly.
    """
    graph = graph if graph is not None else trace(model)
    try:
        return _couple(model, target, width, graph, shapes, None)
    except NeedsPieces as np:  # q, k, v = c_attn(x).split((embed_dim, kv_dim, kv_dim))
        return _couple_pieces(model, target, width, graph, shapes, np.sizes)


def _couple_pieces(model: nn.Module, target: str, width: int | None, graph: fx.Graph,
                   shapes: dict[fx.Node, Any] | None, sizes: tuple[int, ...]) -> Coupling:
    """``target``'s output is split into unequal pieces: the first piece that can grow exactly, the others kept (the
    first piece's refusal if none can)."""
    errors: list[AutogrowError] = []
    for piece in ((sizes, i) for i in range(len(sizes))):
        probe, error = None, None
        try:  # at double the piece's width: it finds the unit (whole heads) a width must fit
            probe = _couple(model, target, None, graph, shapes, piece)
        except AutogrowError as e:
            error = e
        if width is None:
            if probe is not None:
                return probe
            errors.append(error)  # type: ignore[arg-type]
            continue
        if probe is not None and (width - probe.fixed) % probe.unit_features:
            check("width", width, False, probe.width_rule().removeprefix(" and "))
        try:
            return _couple(model, target, width, graph, shapes, piece)
        except AutogrowError as e:
            errors.append(e)
    raise errors[0] from None


def _couple(model: nn.Module, target: str, width: int | None, graph: fx.Graph, shapes: dict[fx.Node, Any] | None,
            pieces: tuple[tuple[int, ...], int] | None) -> Coupling:
    block, parts, rep = 1, 1, 1
    while True:  # restarts: the units turn out to be heads, groups of query heads, or a fused projection's pieces
        try:
            return _Walk(model, target, graph, shapes, width, block, parts, rep, pieces).run()
        except NeedsRep as nr:  # grouped-query attention: a unit is a key/value head's group of query heads
            rep *= nr.rep  # (more than the target's rows: refused by name when the walk restarts)
        except NeedsBlock as nb:  # the units are heads of nb.block features: count whole heads
            if block > 1:
                raise AssertionError(f"{target}: heads of {nb.block} found after heads of {block}") from None
            block = nb.block
        except NeedsPieces as np:
            if pieces is None and parts == 1:
                raise
            fail(f"target: cannot widen {target!r} exactly: its output is split into parts, and a part again into "
                 f"unequal parts {np.sizes}; split it once")
        except NeedsParts as np:  # q, k, v = fused(x).chunk(3, -1): count one piece's units
            if parts > 1 or pieces is not None:
                fail(f"target: cannot widen {target!r} exactly: its output is split into {parts} parts, and a part "
                     f"again into {np.parts}; split it once, into equal parts")
            parts = np.parts
            if width is not None and width % parts:
                check("width", width, False, _parts_rule(model, target, graph, shapes, parts))


def _parts_rule(model: nn.Module, target: str, graph: fx.Graph, shapes: dict[fx.Node, Any] | None, parts: int
                ) -> str:
    """What a width must be a multiple of for a fused output in ``parts`` equal parts: found by a probe walk at
    double the width, which also counts whole heads (timm's qkv: 3 parts of whole heads)."""
    try:
        return couple(model, target, None, graph=graph, shapes=shapes).width_rule().removeprefix(" and ")
    except AutogrowError:
        return f"a multiple of {parts}: {target!r}'s output is split into {parts} equal parts, which grow alike"


def _is_expand(node: fx.Node) -> bool:
    """``t.expand(...)``: a broadcast view, which the walk follows back to ``t`` (a class token over the batch)."""
    return node.op == "call_method" and node.target == "expand"


def _same_units(a: Layout, b: Layout) -> bool:
    """Whether two tensors hold the units alike: on the same axis, mapped, flattened and repeated the same way."""
    return (a.dim, a.key, a.flat, a.rep) == (b.dim, b.key, b.flat, b.rep)


def _tensor_args(node: fx.Node, w: _Walk) -> list[fx.Node]:
    args = list(node.args) + list(node.kwargs.values())
    flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else [x])]
    return [a for a in flat if isinstance(a, fx.Node) and not w.sizes.is_size(a)]


class _Walk:
    """The walk's state: the layout of every tensor reached so far, and what it found."""

    def __init__(self, model: nn.Module, target: str, graph: fx.Graph, shapes: dict[fx.Node, Any] | None,
                 new_width: int | None, unit_block: int = 1, parts: int = 1, rep: int = 1,
                 pieces: tuple[tuple[int, ...], int] | None = None) -> None:
        self.model, self.target, self.graph, self.shapes = model, target, graph, shapes
        self.unit_block, self.n_parts, self.rep, self.piece = unit_block, parts, rep, pieces
        self.fixed = sum(pieces[0]) - pieces[0][pieces[1]] if pieces else 0  # features of the pieces that keep size
        self.new_width = (new_width - self.fixed) // (unit_block * parts * rep) if new_width is not None else None
        self.reps: dict[str, int] = {}
        self.final = False  # set for the last pass, once every layout is known (autogrow.layout.Context)
        self.fused: fx.Node | None = None  # the mapping key of a fused target's output (parts > 1)
        self.rebinds: dict[tuple[str, str], int] = {}
        self.sizes = SizeReader(shapes, self.layouts_get, self.widths, self.rebinds)
        self.sites = call_sites(graph)
        self.layouts: dict[fx.Node, Layout] = {}
        self.old_width: int | None = None
        self.producers: dict[str, MapKey] = {}
        self.channelwise: dict[str, MapKey] = {}
        self.consumers: dict[str, tuple[MapKey, bool]] = {}
        self.cats: dict[fx.Node, CatParts] = {}
        self.uniform_only: list[str] = []
        self.grouped: dict[str, int] = {}
        self.per_row: set[fx.Node] = set()  # norms over another axis than the units' (per-head norms): pass-through
        self.channel_blocks: dict[str, int] = {}  # channel-wise layers over all heads' features -> entries per unit
        self.tensors: dict[tuple[str, str], tuple[MapKey, int]] = {}
        self._queue: deque[fx.Node] = deque()

    def run(self) -> Coupling:
        if self.target not in self.sites:
            fail("target: " + not_called(self.model, self.target, self.sites, "growable layers"))
        module = self.model.get_submodule(self.target)
        if layer_spec(module) is None:
            if channel_spec(module) is not None:  # a depthwise conv, a PReLU: they follow their input's producer
                fail(f"target: {self.target!r} is a channel-wise {type(module).__name__} (one filter or value per "
                     "channel): it grows with the layer that produces its input; widen that layer")
            fail(f"target: {self.target!r} is a {type(module).__name__}, which has no registered LayerSpec; "
                 "widen a Linear/ConvNd/Embedding or register the type with autogrow.register_layer")
        self._add_producer(self.target, self.sites[self.target][0], self.rep)
        while self._queue:
            node = self._queue.popleft()
            for user in list(node.users):
                self._forward(node, user)
        _check_cats(self)
        _check_size_uses(self)
        assert self.old_width is not None
        return Coupling(self.target, self.old_width, dict(self.producers), dict(self.channelwise),
                        dict(self.consumers), dict(self.cats), tuple(self.uniform_only), self.unit_block,
                        dict(self.grouped), dict(self.tensors), _mix_refusal(self), self.n_parts, dict(self.reps),
                        dict(self.rebinds), self.fixed, dict(self.channel_blocks))

    def fail(self, node: fx.Node, why: str, fix: str = "", needs_shapes: bool = False) -> NoReturn:
        msg = f"target: cannot widen {self.target!r} exactly: {describe(node, self.model)} {why}." + (
            f" {fix}" if fix else "")
        if self.n_parts > 1:
            msg += (f" (Widths here count one of the {self.n_parts} equal parts {self.target!r}'s output is split "
                    f"into; its own width is {self.n_parts} times that.)")
        if self.piece is not None:
            msg += (f" (Widths here count part {self.piece[1]} of the unequal parts {self.piece[0]} "
                    f"{self.target!r}'s output is split into; the others keep their size.)")
        raise (NeedsShapes if needs_shapes else AutogrowError)(msg)

    def classify(self, node: fx.Node) -> Op:
        return classify(node, self.model)

    def width(self, key: MapKey) -> int:
        assert self.old_width is not None
        return self.old_width if key is None else sum(w for _, w in self.cats[key].parts)

    def _new(self, key: MapKey) -> int:
        assert self.old_width is not None
        if key is None:
            return self.new_width if self.new_width is not None else 2 * self.old_width  # a probe: doubled
        return sum(self._new(k) if k is not False else w for k, w in self.cats[key].parts)

    # -- the context layout rules see (autogrow.layout.Context) --------------------------------------------
    def widths(self, lay: Layout) -> tuple[int, int]:
        return self.width(lay.key), self._new(lay.key)

    def shape(self, node: object) -> tuple[int, ...] | None:
        meta = self.shapes.get(node) if self.shapes is not None and isinstance(node, fx.Node) else None
        return meta if isinstance(meta, tuple) else None

    def value(self, x: object, new: bool) -> Any:
        return self.sizes.value(x, new)

    def parts(self, key: object) -> int:
        return self.n_parts if key is not None and key is self.fused else 1

    def pieces(self, key: object) -> tuple[tuple[int, ...], int] | None:
        return self.piece if key is not None and key is self.fused else None

    def one_piece(self) -> bool:
        return self.piece is not None

    def rebind(self, size: BoundSize, value: int) -> None:
        key, value = (size.owner, size.attr), int(value)  # a plain int (recorded shapes may hold capture's)
        if self.rebinds.setdefault(key, value) != value:
            raise Refusal(f"needs {size.owner or 'the model'}.{size.attr} (now {int(size)}) to become both "
                          f"{self.rebinds[key]} and {value}", "Compute these sizes from the tensors instead.")

    def layouts_get(self, node: fx.Node) -> Layout | None:
        return self.layouts.get(node)

    def mark(self, node: fx.Node, layout: Layout) -> None:
        shape = self.shape(node)
        if shape is not None:
            layout = replace(layout, ndim=len(shape))  # the recorded rank: no guessing
        old = self.layouts.get(node)
        if old is None:
            self.layouts[node] = layout
            self._queue.append(node)
        elif old != layout:
            self.fail(node, f"is reached with two different feature layouts ({old} and {layout})")

    # -- forward: what a widened tensor flows into -------------------------------------------------
    def _forward(self, node: fx.Node, user: fx.Node) -> None:
        op = self.classify(user)
        if user in self.layouts and op.kind is not OpKind.WEIGHTED:
            return  # already handled when first reached (merges, cats, residual paths)
        rule = _FORWARD.get(op.kind)
        if rule is None and user.op == "call_module":
            self.fail(user, f"is a {type(op.module).__name__}, which autogrow does not know how to widen",
                      _unknown_module_fix(op.module))
        if user.op == "call_module" and (not user.args or user.args[0] is not node
                                         or any(a is node for a in user.args[1:])):
            self.fail(user, "takes the widened tensor in an argument other than its first")
        if rule is None and user.target is F.multi_head_attention_forward:  # nn.MultiheadAttention, traced by running
            self.fail(user, "is nn.MultiheadAttention's fused forward", UNFUSE_HINT)
        if rule is None:
            self.fail(user, "is an operation that autogrow cannot keep exact on a widened tensor",
                      "Supported: registered modules, element-wise ops, add/sub/mul, cat, flatten, "
                      "view(x.size(0), -1), mean/sum over other axes.")
        try:
            rule(self, node, user, op, self.layouts[node])
        except Refusal as r:
            self.fail(user, r.why, r.fix, r.needs_shapes)

    def _add_producer(self, name: str, node: fx.Node, rep: int = 1) -> None:
        m = self.model.get_submodule(name)
        spec = layer_spec(m)
        assert spec is not None
        reason = spec.check(m)
        if reason:
            self.fail(node, f"is a producer with {reason}")
        features = getattr(m, spec.out_attr)
        if self.piece is not None and name == self.target and features != sum(self.piece[0]):
            self.fail(node, f"has {features} output features, but the widened units are split into unequal parts "
                      f"{self.piece[0]} elsewhere", "Split a layer's own output into unequal parts (a multi-query "
                      "c_attn), or a tensor of the layer's width into equal ones.")
        per = self.unit_block * rep * (self.n_parts if name == self.target else 1)
        own = features - self.fixed if name == self.target else features  # a piece's: the others keep their size
        if own % per or (name == self.target and self.piece and any(n % per for n in self.piece[0])):
            what = f"{self.n_parts} equal parts of whole" if self.n_parts > 1 else "a whole number of"
            self.fail(node, f"has {own} units, not {what} heads of {self.unit_block * rep}")
        width = own // per
        if self.old_width is None:
            self.old_width = width
        elif width != self.old_width:
            self.fail(node, f"must grow with {self.target!r} but has {width} units, not {self.old_width}")
        key: MapKey = None
        if self.n_parts > 1 and name == self.target:  # a fused output: its pieces, each the target's own units
            key = self.fused = self.sites[name][0]
            self.cats[key] = CatParts(((None, width),) * self.n_parts)
        if self.piece is not None and name == self.target:  # unequal pieces: one grows, the others keep their rows
            key = self.fused = self.sites[name][0]
            sizes, grown = self.piece
            self.cats[key] = CatParts(tuple((None, width) if i == grown else (False, n // per)
                                            for i, n in enumerate(sizes)))
        self.producers[name] = key
        if rep > 1:
            self.reps[name] = rep
        ndim = -spec.out_dim + 1 if spec.out_dim < -1 else None
        for site in self.sites[name]:  # a module called twice shares its parameters: both outputs grow
            self.mark(site, Layout(spec.out_dim, ndim, key, flat=self.unit_block > 1, rep=rep))

    def add_consumer(self, user: fx.Node, lay: Layout, spec: LayerSpec, m: nn.Module) -> None:
        if spec.in_attr is None:
            raise Refusal(f"is a {type(m).__name__}, which takes indices, not features")
        reason = spec.check(m)
        if reason:
            raise Refusal(f"is a consumer with {reason}")
        in_width, width = getattr(m, spec.in_attr), self.width(lay.key)
        if lay.flat:
            if spec.in_dim != -1 or in_width % width:
                raise Refusal(f"reads a flattened tensor of {width} channels but has {spec.in_attr}={in_width}, "
                              "not a multiple")
        elif lay.dim != spec.in_dim:
            raise Refusal(f"expects features on axis {spec.in_dim}, but the widened units are on axis {lay.dim}")
        elif in_width != width * lay.rep:
            raise Refusal(f"has {spec.in_attr}={in_width}, but the widened tensor has {width * lay.rep} features")
        entry = (lay.key, lay.flat or lay.rep > 1)  # several features per unit: a block, as after a flatten
        if self.consumers.setdefault(user.target, entry) != entry:
            raise Refusal("is reached with two different feature layouts")
        for site in self.sites[user.target]:  # shared weights: every call's input must grow the same way
            if site.args[0] not in self.layouts:
                self.backward(site.args[0], lay, site)

    def add_channelwise(self, node: fx.Node, lay: Layout, spec: ChannelSpec, m: nn.Module) -> None:
        reason = spec.check(m)
        if reason:
            self.fail(node, f"has {reason}")
        if spec.rows and not lay.flat and not any(self._is_axis(lay, d, node) for d in spec.dims):
            self.per_row.add(node)  # the units on another axis, each treated on its own: they pass, nothing grows
            self.mark(node, lay)
            if node.args[0] not in self.layouts:
                self.backward(node.args[0], lay, node)
            return
        n, w, per = channel_width(m), self.width(lay.key), self.unit_block * lay.rep
        heads = n is not None and lay.flat and per > 1 and n == w * per  # OLMo-2's q_norm: all heads' features
        if heads and spec.group_size is not None and spec.group_size(m) > 1:
            self.fail(node, f"acts on groups of the {n} features of {w} heads of {per}: new heads would land inside "
                      "its groups", "Normalise each head on its own, or the whole projection.")
        if lay.rep > 1 and not heads:
            self.fail(node, f"acts on units that hold {lay.rep} entries each (a repeat, as of key/value heads for "
                      "their query heads)", "Normalise or scale the tensor before it is repeated.")
        if n is not None and n != w * (per if heads else 1):
            self.fail(node, f"has {n} features, but the widened tensor has {w}")
        if heads:  # its entries grow head by head (a norm over them: only under uniform copies, uniform_only)
            self.channel_blocks[node.target] = per
        if (lay.flat and not heads) or not any(self._is_axis(lay, d, node) for d in spec.dims):
            where = f"axis {lay.dim} of {lay.ndim}" if lay.ndim is not None else f"axis {lay.dim}"
            self.fail(node, f"normalises axis {' or '.join(map(str, spec.dims))} (counted from the front if >= 0), "
                      f"but the widened units are on {where} (from the end)" + (" (flattened)" if lay.flat else ""))
        if spec.uniform_only and node.target not in self.uniform_only:
            self.uniform_only.append(node.target)
        if spec.group_size is not None and spec.group_size(m) > 1:  # groups of one channel constrain nothing
            if lay.key is not None:
                self.fail(node, "acts on groups of channels of a concatenation: the new channels would land "
                          "inside its groups", "Widen a layer whose output reaches it whole.")
            self.grouped[node.target] = spec.group_size(m)
        self.channelwise[node.target] = lay.key
        for site in self.sites[node.target]:
            self.mark(site, lay)
            if site.args[0] not in self.layouts:
                self.backward(site.args[0], lay, site)

    def _is_axis(self, lay: Layout, axis: int, node: fx.Node) -> bool:
        if axis < 0:
            return lay.dim == axis
        if lay.ndim is None:
            self.fail(node, f"normalises axis {axis}, and the rank of its input is unknown", SHAPES_HINT, True)
        return lay.ndim + lay.dim == axis

    def merge(self, user: fx.Node, lay: Layout) -> None:
        """Element-wise op over several tensors: all of them must grow with the same mapping (a tensor that
        broadcasts along the units' axis, size 1 there, needs nothing)."""
        self.mark(user, lay)
        for a in _tensor_args(user, self):
            if a not in self.layouts:
                if self._broadcasts(a, lay):
                    continue
                self.backward(a, lay, user)
            if not _same_units(self.layouts[a], lay):
                self.fail(user, f"combines tensors whose units are mapped differently ({a.name})")

    def _add_tensor(self, node: fx.Node, lay: Layout, via: fx.Node) -> None:
        """A bare parameter or buffer combined with the widened tensor (a class token, a learned position
        embedding): its entries along the units' axis grow with the same mapping."""
        mod, _, name = str(node.target).rpartition(".")
        t = getattr(self.model.get_submodule(mod), name, None)
        axis = t.dim() + lay.dim if isinstance(t, torch.Tensor) else -1
        if (axis < 0 or not t.is_floating_point() or lay.key is not None or lay.flat or self.unit_block > 1
                or lay.rep > 1):
            self.fail(via, f"combines the widened tensor with {_origin(node, self.model)}, whose width is fixed")
        if t.shape[axis] != self.width(lay.key):
            self.fail(via, f"combines the widened tensor with {node.target!r}, whose {t.shape[axis]} entries on the "
                      f"units' axis are not the {self.width(lay.key)} units")
        self.tensors[(mod, name)] = (lay.key, axis)
        self.mark(node, lay)

    def _broadcasts(self, a: fx.Node, lay: Layout) -> bool:
        """``a`` has no units' axis, or size 1 there while the widened tensor has more (with a width of 1
        that size says nothing: the tensor must grow with the others)."""
        shape = self.shape(a)
        return shape is not None and (len(shape) < -lay.dim or (shape[lay.dim] == 1 and self.width(lay.key) > 1))

    # -- backward: a tensor combined with a widened one must itself become widened ----------------------
    def backward(self, node: object, lay: Layout, via: fx.Node) -> None:
        if node in self.layouts:  # reached before: it must be laid out as ``via`` needs it
            if not _same_units(self.layouts[node], lay):
                self.fail(via, f"combines tensors whose units are mapped differently ({node.name})")
            return
        if not isinstance(node, fx.Node):
            self.fail(via, "combines the widened tensor with a constant of fixed width")
        if node.op == "get_attr":
            return self._add_tensor(node, lay, via)
        op = self.classify(node)
        if op.kind is OpKind.WEIGHTED:
            assert isinstance(op.spec, LayerSpec)
            if lay.key is not None or op.spec.out_dim != lay.dim or lay.flat != (self.unit_block > 1):
                self.fail(via, f"joins {node.target!r} to a tensor it cannot be mapped onto")
            return self._add_producer(node.target, node, lay.rep)
        if op.kind is OpKind.CHANNELWISE:
            return self.add_channelwise(node, lay, op.spec, op.module)  # type: ignore[arg-type]
        if op.kind is OpKind.ELEMENTWISE:
            self.mark(node, lay)
            return self.backward(node.args[0], lay, node)
        if op.kind is OpKind.BINARY:
            return self.merge(node, lay)
        if op.kind is OpKind.CAT and node.target is torch.stack:
            try:
                return self.stack(node, unstacked(lay, node), lay)
            except Refusal as r:
                self.fail(node, r.why, r.fix, r.needs_shapes)
        if op.kind is OpKind.CAT and cat_axis(lay, arg(node, 1, "dim", 0)) != lay.dim:
            return self.merge(node, lay)  # along another axis (a class token before the patches): all grow alike
        if op.kind is OpKind.BATCHED:
            try:
                return _fwd_batched(self, node, node, op, lay)
            except Refusal as r:
                self.fail(node, r.why, r.fix, r.needs_shapes)
        if op.kind is OpKind.LAYOUT and isinstance(node.args[0], fx.Node) and node.args[0] in self.layouts:
            return self._forward_early(node, op, lay, via)
        picks = node.target is operator.getitem and self.shape(node.args[0]) is None  # an item of a tuple output
        if op.kind is OpKind.LAYOUT and op.inverse is not None and isinstance(node.args[0], fx.Node) and not picks:
            try:
                before = op.inverse(lay, node, op.module, self)
            except Refusal as r:
                self.fail(node, r.why, r.fix, r.needs_shapes)
            self.mark(node, lay)
            if _is_expand(node) and self._broadcasts(node.args[0], before):
                return  # copies of a tensor of size 1 there (multi-query repeat_kv): it keeps its size
            return self.backward(node.args[0], before, node)
        fused = _source(node).target is F.multi_head_attention_forward  # nn.MultiheadAttention, traced by running
        self.fail(via, f"combines the widened tensor with {_origin(node, self.model)}, whose width is fixed",
                  UNFUSE_HINT if fused else "Residual paths can be widened when every operand comes from a registered "
                  "layer.")

    def _forward_early(self, node: fx.Node, op: Op, lay: Layout, via: fx.Node) -> None:
        """A view of a tensor the walk has already reached, met first from the op it flows into (rotary
        embeddings: ``cat((-x[..., d // 2:], x[..., :d // 2]), -1)`` joins two slices of the widened tensor):
        its layout is the forward rule's, and must be the one ``via`` needs."""
        try:
            fwd = op.layout(self.layouts[node.args[0]], node, op.module, self)  # type: ignore[misc]
        except Refusal as r:
            self.fail(node, r.why, r.fix, r.needs_shapes)
        if fwd is None:
            self.fail(via, f"combines the widened tensor with {node.name}, a part of the output that keeps its size")
        if not _same_units(fwd, lay):
            self.fail(via, f"combines tensors whose units are mapped differently ({node.name})")
        self.mark(node, fwd)

    # -- concatenations -------------------------------------------------------------------------------
    def stack(self, node: fx.Node, inner: Layout, out: Layout) -> None:
        """``torch.stack``: every tensor it joins holds the units as ``inner`` (an element-wise join along a new
        axis); the output holds them as ``out``."""
        if inner.flat:
            self.fail(node, "stacks a flattened widened tensor")
        self.mark(node, out)
        for t in arg(node, 0, "tensors", None):
            if not isinstance(t, fx.Node):
                self.fail(node, "stacks the widened tensor with a constant of fixed width")
            if t not in self.layouts:
                self.backward(t, inner, node)
            elif not _same_units(self.layouts[t], inner):
                self.fail(node, f"stacks tensors whose units are mapped differently ({t.name})")

    def cat(self, user: fx.Node, lay: Layout) -> None:
        if user.target is torch.stack:
            return self.stack(user, lay, stacked(lay, user))
        tensors, dim = arg(user, 0, "tensors", None), arg(user, 1, "dim", 0)
        if any(isinstance(t, fx.Node) and t in self.layouts and self.layouts[t].flat for t in tensors):
            raise Refusal("concatenates a flattened widened tensor")
        if cat_axis(lay, dim) != lay.dim:
            return self.merge(user, lay)  # along another axis: an element-wise merge
        if lay.rep > 1:
            raise Refusal("concatenates units that hold several entries each (groups of query heads)")
        parts: list[tuple[MapKey | bool, int]] = []
        for t in tensors:
            if t in self.layouts:
                tl = self.layouts[t]
                if tl.flat or tl.dim != lay.dim or tl.rep > 1:
                    self.fail(user, f"concatenates {t.name}, whose units sit on another axis")
                parts.append((tl.key, self.width(tl.key)))
            else:
                parts.append((False, self.width_of(t, user, lay.dim)))
        self.cats[user] = CatParts(tuple(parts))
        self.mark(user, Layout(lay.dim, lay.ndim, user))

    def width_of(self, node: fx.Node, via: fx.Node, axis: int) -> int:
        """The size of an unwidened concatenation operand along the concatenated axis."""
        shape = self.shape(node)
        if shape is not None:
            return shape[axis]
        op = self.classify(node)
        if op.kind is OpKind.WEIGHTED:
            return getattr(op.module, op.spec.out_attr)  # type: ignore[union-attr]
        if op.kind in (OpKind.CHANNELWISE, OpKind.ELEMENTWISE):
            return self.width_of(node.args[0], via, axis)
        self.fail(via, f"concatenates {describe(node, self.model)}, whose width autogrow cannot determine",
                  SHAPES_HINT, needs_shapes=True)


# --- checks once every layout is known -----------------------------------------------------------

def _check_cats(w: _Walk) -> None:
    for node, cp in w.cats.items():
        if node is w.fused:
            continue  # a fused layer's output, not a concatenation
        for (k, _), t in zip(cp.parts, arg(node, 0, "tensors", None)):
            if k is False and t in w.layouts:
                w.fail(node, f"concatenates {t.name}, which became widened by a later residual path")


def not_single_units(c: Coupling | _Walk) -> str | None:
    """Why the units of ``c`` are not single features that only the coupled layers see (``None``: they are), which
    initialisers acting unit by unit through the norms (mixtures, ramps) need."""
    if c.cats or c.grouped or c.unit_block > 1:
        return "its units are concatenated with others, a fused projection's parts, grouped, or attention heads"
    return None


def _mix_refusal(w: _Walk) -> str | None:
    """Why new units that mix the old ones linearly (``init="mix"``) would change the function, or ``None``.

    A mixed unit's value is a fixed combination of the old units' values wherever the tensor is linear in
    them: from the producers (whose rows are mixed) through sums, scalings and views. A LayerNorm/RMSNorm
    over the units sees the same statistics (the mixing preserves mean and mean square), and what comes after
    it reaches only readers, whose columns for the new units start at zero. A nonlinearity before the norm,
    or a path that joins the tensors before and after a norm (a post-norm residual), breaks this.
    """
    if (why := not_single_units(w)) is not None:
        return why
    post: set[fx.Node] = set()  # after a normalisation over the units: only readers see these
    for node in w.graph.nodes:
        if node not in w.layouts or node.op == "get_attr":
            continue  # a bare parameter added to the tensor: its entries are mixed like a producer's rows
        if _is_expand(node):
            continue  # a broadcast view (a class token expanded over the batch): linear
        op = w.classify(node)
        if op.kind is OpKind.WEIGHTED:
            continue  # a producer: its rows are mixed
        if node in w.per_row:  # a norm of each unit's own entries (a per-head norm): not linear in the units
            return f"{describe(node, w.model)} normalises or scales each unit on its own"
        ins = [a for a in _tensor_args(node, w) if a in w.layouts]
        after = [a in post for a in ins]
        if (op.kind is OpKind.CHANNELWISE and op.spec.uniform_only) or (after and all(after)):  # type: ignore[union-attr]
            post.add(node)
            continue
        where = describe(node, w.model)
        if any(after):
            return f"{where} joins the tensor before and after a normalisation over its units (a post-norm residual)"
        if op.kind is OpKind.CHANNELWISE:
            return f"{where} scales or normalises each unit on its own"
        if op.linear is Linearity.FACTOR and len(ins) > 1:
            return f"{where} multiplies the units by a factor that grows with them (a per-unit scale, LayerScale?)"
        linear = (op.linear is Linearity.JOINT or (op.linear is Linearity.FACTOR and len(ins) == 1)
                  or (op.linear is Linearity.DIVIDEND and ins == [node.args[0]]))
        if not linear:
            return f"{where} is not linear in the units"
    return None


def _reads_sizes(args: list[Any], w: _Walk) -> bool:
    """Whether ``args`` hold a size read from some tensor (``x.size(0)``, ``b, t, c = x.shape``)."""
    return any(_reads_sizes(list(a), w) if isinstance(a, (tuple, list)) else
               isinstance(a, BoundExpr) or isinstance(a, fx.Node) and w.sizes.is_size(a) for a in args)


def _check_size_uses(w: _Walk) -> None:
    """Every use of a size read from a widened axis must still be right after widening."""
    w.final = True
    for node in w.graph.nodes:
        if w.sizes.is_size(node):
            continue  # arithmetic on sizes: its uses are checked where they land
        op = w.classify(node)
        args = list(node.args) + list(node.kwargs.values())
        try:
            dependent = [a for a in args if w.sizes.reads_width(a)]
        except Refusal as r:
            w.fail(node, r.why, r.fix, r.needs_shapes)
        if op.kind is OpKind.LAYOUT and node.args[0] in w.layouts and _reads_sizes(args, w):
            try:  # a reshape or expand of a widened tensor: re-check with every layout final
                op.layout(w.layouts[node.args[0]], node, op.module, w)  # type: ignore[misc]
                continue
            except Refusal as r:
                w.fail(node, r.why, r.fix, r.needs_shapes)
        if not dependent:
            continue
        names = ", ".join(a.name if isinstance(a, fx.Node) else str(a) for a in dependent)
        w.fail(node, f"uses a size read from the widened units' axis ({names}), which changes with the width",
               "Reshapes of the widened tensor itself (view/reshape) can follow it; compute other sizes "
               "from fixed quantities (module attributes, config values).")


# --- forward rules, one per op kind: (walk, widened input, user node, its classification, layout) ----------

def _fwd_output(w: _Walk, node: fx.Node, user: fx.Node, op: Op, lay: Layout) -> None:
    w.fail(user, "is the model's output, whose width would change", "Widen a hidden layer, not the last one.")


def _fwd_shape(w: _Walk, node: fx.Node, user: fx.Node, op: Op, lay: Layout) -> None:
    pass  # a size/dtype query: the widened tensor's value does not flow on


def _fwd_weighted(w: _Walk, node: fx.Node, user: fx.Node, op: Op, lay: Layout) -> None:
    w.add_consumer(user, lay, op.spec, op.module)  # type: ignore[arg-type]


def _unknown_module_fix(m: nn.Module | None) -> str:
    if isinstance(m, nn.MultiheadAttention):  # one fused call over a packed in_proj_weight
        return UNFUSE_HINT
    if m is not None and type(m).__module__.startswith("torch.nn") and any(True for _ in m.children()):
        return ("torch.fx records torch.nn's own composite layers as one opaque call. Write the block from "
                "Linear/LayerNorm and F.scaled_dot_product_attention (as autogrow.experiments.transformers does).")
    return "Register it with autogrow.register_layer, register_channelwise or register_elementwise."


def _fwd_channelwise(w: _Walk, node: fx.Node, user: fx.Node, op: Op, lay: Layout) -> None:
    w.add_channelwise(user, lay, op.spec, op.module)  # type: ignore[arg-type]


def _fwd_elementwise(w: _Walk, node: fx.Node, user: fx.Node, op: Op, lay: Layout) -> None:
    if user.op != "call_module" and (user.args[0] is not node or _tensor_args(user, w)[1:]):
        raise Refusal("mixes the widened tensor with another tensor")
    w.mark(user, lay)


def _fwd_layout(w: _Walk, node: fx.Node, user: fx.Node, op: Op, lay: Layout) -> None:
    if user.args[0] is not node:
        raise Refusal("takes the widened tensor in an argument other than its first")
    out = op.layout(lay, user, op.module, w)  # type: ignore[misc]
    if out is not None:  # None: a piece of the output that holds none of the units (a multi-query key)
        w.mark(user, out)


def _fwd_batched(w: _Walk, node: fx.Node, user: fx.Node, op: Op, lay: Layout) -> None:
    """matmul / attention: independent along the leading axes; the units must be one of them (heads)."""
    if lay.flat or lay.dim > -3:
        raise Refusal("contracts or mixes the widened units (matmul over features)",
                      "Units on a leading (batch-like) axis, such as attention heads, can grow.")
    mask = arg(user, 3, "attn_mask", None)
    if w.shapes is not None and w.shapes.get(mask, ()) is None:
        mask = None  # not a tensor on the example inputs: an optional mask argument left at None (timm's)
    if isinstance(mask, fx.Node) and mask not in w.layouts and not w._broadcasts(mask, lay):
        raise Refusal("uses an attention mask with a size along the widened heads", SHAPES_HINT, w.shapes is None)
    sdpa = user.target is F.scaled_dot_product_attention
    operands = list(user.args[:3] if sdpa else user.args[:2])
    reps = _gqa_reps(w, user, node, operands, lay) if sdpa and user.kwargs.get("enable_gqa") else [lay.rep] * 3
    for a, rep in zip(operands, reps):
        if isinstance(a, fx.Node) and a not in w.layouts and not w._broadcasts(a, lay):
            w.backward(a, replace(lay, rep=rep), user)
    w.mark(user, replace(lay, rep=reps[0]))  # the output has the query's heads


def _gqa_reps(w: _Walk, user: fx.Node, node: fx.Node, operands: list[Any], lay: Layout) -> list[int]:
    """``scaled_dot_product_attention(q, k, v, enable_gqa=True)``: each of k's and v's heads serves a group of
    q's; the ``rep`` of q, k and v given the widened operand ``node``'s layout."""
    heads = [w.shape(a)[lay.dim] if isinstance(a, fx.Node) and w.shape(a) else None for a in operands]
    if None in heads:
        raise Refusal("is a grouped-query attention whose numbers of heads are unknown", SHAPES_HINT, True)
    if node is operands[0] and heads[1] == heads[2] == 1 and w.one_piece():  # the key/value head keeps its size:
        _unread_group_size(w, heads[0], heads[0] // w.widths(lay)[0] * w.widths(lay)[1])
        return [lay.rep, 1, 1]  # multi-query: it serves every query head, old and new alike
    group = heads[0] // heads[1]
    q = lay.rep if node is operands[0] else lay.rep * group
    if q % group:  # the widened layer's units are single query heads: they grow as whole groups
        raise NeedsRep(group // math.gcd(q, group)) if lay.key is None else Refusal(
            "is a grouped-query attention reached through a concatenation of query heads")
    return [q, q // group, q // group]


def _unread_group_size(w: _Walk, old: int, new: int) -> None:
    """Multi-query attention through SDPA's ``enable_gqa``: the query heads per key/value head grow from ``old`` to
    ``new``, and this forward reads no attribute holding that number, so none is rewritten. One that the attention
    module keeps would go stale (transformers' ``num_key_value_groups``, which ``repeat_kv`` reads when a mask is
    passed): refused, naming it."""
    owner = w.target.rpartition(".")[0]
    read = {(b.owner, b.attr) for n in w.graph.nodes for b in leaves([n.args, list(n.kwargs.values())])}
    stale = [k for k, v in vars(w.model.get_submodule(owner)).items()
             if isinstance(v, int) and not isinstance(v, bool) and v == old and (owner, k) not in read]
    if stale:
        raise Refusal(f"is a multi-query attention (enable_gqa, one key/value head) whose query heads grow from {old} "
                      f"to {new}; {owner or 'the model'} keeps {old} in {', '.join(stale)}, which this forward did not "
                      "read, so autogrow cannot tell whether it holds that number and would leave it stale",
                      "Grow it on a forward that reads the number (transformers: attn_implementation='eager', where "
                      "repeat_kv reads num_key_value_groups), or drop the attribute.")


def _source(node: fx.Node) -> fx.Node:
    """The node whose tuple output ``node`` picks an item of (``getitem`` of a module's outputs), else ``node``."""
    while node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _origin(node: fx.Node, model: nn.Module) -> str:
    """Describe a fixed-width tensor by where it comes from (``getitem`` of a module's tuple output)."""
    return describe(_source(node), model)


_FORWARD: dict[OpKind, Callable[[_Walk, fx.Node, fx.Node, Op, Layout], None]] = {
    OpKind.OUTPUT: _fwd_output,
    OpKind.SHAPE: _fwd_shape,
    OpKind.WEIGHTED: _fwd_weighted,
    OpKind.CHANNELWISE: _fwd_channelwise,
    OpKind.ELEMENTWISE: _fwd_elementwise,
    OpKind.LAYOUT: _fwd_layout,
    OpKind.BATCHED: _fwd_batched,
    OpKind.BINARY: lambda w, node, user, op, lay: w.merge(user, lay),
    OpKind.CAT: lambda w, node, user, op, lay: w.cat(user, lay),
}
