"""One classifier of graph nodes, used by every part of autogrow that reads a traced model.

``classify(node, model)`` says what kind of operation a ``torch.fx`` node is (a registered weighted
layer, a normalisation, an element-wise op, a concatenation, a reshape, ...). Modules are looked up
in the layer registry (``autogrow.registry``, by ``isinstance``); functions and tensor methods in the
op table below, which users extend with :func:`register_function`.

    >>> import torch, torch.fx as fx, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU())
    >>> [classify(n, net).kind.name for n in fx.symbolic_trace(net).graph.nodes]
    ['INPUT', 'WEIGHTED', 'CHANNELWISE', 'ELEMENTWISE', 'OUTPUT']

Ops that move the units' axis (flatten, reshape, reductions, ...) are ``OpKind.LAYOUT``; their rules
live, and register themselves, in ``autogrow.layout``.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autogrow.registry import ChannelSpec, Elementwise, LayerSpec, channel_spec, elementwise, layer_spec

__all__ = ["LayoutRule", "Linearity", "Op", "OpKind", "classify", "classify_module", "register_function",
           "register_layout_module"]


class OpKind(enum.Enum):
    """What a graph node does, as far as growing a tensor through it is concerned."""

    WEIGHTED = "weighted"  # a registered weighted layer (Linear, ConvNd, Embedding)
    CHANNELWISE = "channelwise"  # one value per feature (BatchNorm, LayerNorm)
    ELEMENTWISE = "elementwise"  # one tensor in, each feature on its own (activations, dropout, pooling)
    BINARY = "binary"  # element-wise over several tensors (add, sub, mul, div)
    CAT = "cat"
    LAYOUT = "layout"  # moves the units' axis (flatten, reshape, reduce, ...): its rule says how
    BATCHED = "batched"  # combines tensors independently along leading axes (matmul, attention)
    SHAPE = "shape"  # reads a size, rank, dtype or device
    INPUT = "input"
    OUTPUT = "output"
    OTHER = "other"


class Linearity(enum.Enum):
    """How an op depends on its tensor operands; ``init="mix"`` may mix units only through linear ops."""

    NONE = "none"  # nonlinear (activations, max, softmax, pow)
    JOINT = "joint"  # linear in all its tensor operands together (add, sub, views, dropout, average pooling)
    FACTOR = "factor"  # linear in one operand while the others stay fixed (mul, masked_fill)
    DIVIDEND = "dividend"  # linear in its first operand while the divisor stays fixed (div)


# (layout of the widened input, the node, its module or None, context) -> layout of the output
# (see autogrow.layout)
LayoutRule = Callable[[Any, fx.Node, "nn.Module | None", Any], Any]


@dataclass(frozen=True)
class Op:
    """The classification of one node; module-backed kinds carry the module and its spec."""

    kind: OpKind
    module: nn.Module | None = None
    spec: LayerSpec | ChannelSpec | None = None
    elementwise: Elementwise | None = None
    # For functional activations: the module a new Net2DeeperNet block uses in their place.
    factory: Callable[[], nn.Module] | None = None
    layout: LayoutRule | None = None
    inverse: LayoutRule | None = None  # the input's layout from the output's (following a residual backwards)
    linear: Linearity = Linearity.NONE


@dataclass(frozen=True)
class _Entry:
    kind: OpKind
    elementwise: Elementwise | None = None
    factory: Callable[[], nn.Module] | None = None
    layout: LayoutRule | None = None
    inverse: LayoutRule | None = None
    linear: Linearity = Linearity.NONE


_TABLE: dict[Callable | str, _Entry] = {}  # functions by identity, tensor methods by name
_LAYOUT_MODULES: dict[type, tuple[LayoutRule, LayoutRule | None]] = {}  # parameter-free modules moving the units


def register_function(target: Callable | str, kind: OpKind, *, activation: bool = False, idempotent: bool = False,
                      linear: Linearity = Linearity.NONE, module: Callable[[], nn.Module] | None = None,
                      layout: LayoutRule | None = None, inverse: LayoutRule | None = None) -> None:
    """Tell autogrow what a function (or a tensor method, by name) does to a widened tensor.

    For ``OpKind.ELEMENTWISE``: ``activation`` marks a nonlinearity, ``idempotent`` declares
    phi(phi(v)) = phi(v), and ``module`` builds the module a Net2DeeperNet block uses for it. For
    ``OpKind.LAYOUT``: ``layout`` is the rule (see ``autogrow.layout``).

        >>> import torch
        >>> register_function(torch.special.expit, OpKind.ELEMENTWISE, activation=True, module=torch.nn.Sigmoid)
    """
    ew = Elementwise(activation, idempotent, linear is Linearity.JOINT) if kind is OpKind.ELEMENTWISE else None
    _TABLE[target] = _Entry(kind, ew, module, layout, inverse, linear)


def register_layout_module(cls: type[nn.Module], rule: LayoutRule, inverse: LayoutRule | None = None) -> None:
    """A parameter-free module type that moves the units' axis (like ``nn.Flatten``), with its rule."""
    _LAYOUT_MODULES[cls] = (rule, inverse)


def classify(node: fx.Node, model: nn.Module | None) -> Op:
    """What ``node`` of a graph traced from ``model`` does (``model`` resolves ``call_module`` targets)."""
    if node.op == "placeholder":
        return Op(OpKind.INPUT)
    if node.op == "output":
        return Op(OpKind.OUTPUT)
    if node.op == "call_module":
        return classify_module(model.get_submodule(node.target)) if model is not None else Op(OpKind.OTHER)
    if node.op == "call_function" and node.target is getattr:
        return Op(OpKind.SHAPE if node.args[1] in ("shape", "dtype", "device", "ndim") else OpKind.OTHER)
    if node.op not in ("call_function", "call_method"):
        return Op(OpKind.OTHER)
    entry = _TABLE.get(node.target) if isinstance(node.target, str) or _hashable(node.target) else None
    if entry is None:
        return Op(OpKind.OTHER)
    ew = entry.elementwise
    if ew is not None and ew.idempotent and not _plain_call(node):
        ew = Elementwise(ew.activation, False, ew.linear)  # F.hardtanh(x, a, b): other bounds
    return Op(entry.kind, elementwise=ew, factory=entry.factory, layout=entry.layout, inverse=entry.inverse,
              linear=entry.linear)


def classify_module(m: nn.Module) -> Op:
    """What a module does (``OpKind.OTHER`` when its type is not registered)."""
    spec = layer_spec(m)
    if spec is not None:
        return Op(OpKind.WEIGHTED, m, spec)
    cspec = channel_spec(m)
    if cspec is not None:
        return Op(OpKind.CHANNELWISE, m, cspec)
    ew = elementwise(m)
    if ew is not None:
        return Op(OpKind.ELEMENTWISE, m, elementwise=ew, linear=Linearity.JOINT if ew.linear else Linearity.NONE)
    for cls in type(m).__mro__:
        if cls in _LAYOUT_MODULES:
            rule, inverse = _LAYOUT_MODULES[cls]
            return Op(OpKind.LAYOUT, m, layout=rule, inverse=inverse, linear=Linearity.JOINT)  # nn.Flatten
    return Op(OpKind.OTHER, m)


def _hashable(target: object) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _plain_call(node: fx.Node) -> bool:
    """One tensor argument and no options but ``inplace``: ``F.relu(x)`` yes, ``F.hardtanh(x, 0, 2)`` no."""
    return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}


# --- built-in op table -----------------------------------------------------------------------------

_ACTIVATIONS: list[tuple[list[Callable | str], Callable[[], nn.Module], bool]] = [
    ([torch.relu, F.relu, "relu"], nn.ReLU, True),
    ([F.relu6], nn.ReLU6, True),
    ([F.gelu], nn.GELU, False),
    ([F.silu], nn.SiLU, False),
    ([torch.tanh, "tanh"], nn.Tanh, False),
    ([torch.sigmoid, "sigmoid"], nn.Sigmoid, False),
    ([F.leaky_relu], nn.LeakyReLU, False),
    ([F.elu], nn.ELU, False),
    ([F.selu], nn.SELU, False),
    ([F.mish], nn.Mish, False),
    ([F.softplus], nn.Softplus, False),
    ([F.hardtanh], nn.Hardtanh, True),
    ([F.hardswish], nn.Hardswish, False),
    ([F.hardsigmoid], nn.Hardsigmoid, False),
]
for _targets, _module, _idem in _ACTIVATIONS:
    for _t in _targets:
        register_function(_t, OpKind.ELEMENTWISE, activation=True, idempotent=_idem, module=_module)
for _t in (torch.abs, torch.exp, "abs", "exp",  # not activations to copy
           F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
           F.adaptive_max_pool3d):
    register_function(_t, OpKind.ELEMENTWISE)
for _t in (operator.neg, torch.neg, "neg", F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
           F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
           F.adaptive_avg_pool3d, "contiguous", "clone", "detach", "float", "to", "type_as"):
    register_function(_t, OpKind.ELEMENTWISE, linear=Linearity.JOINT)
for _ts, _lin in (((operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub",
                    "add_", "sub_"), Linearity.JOINT),
                  ((operator.mul, operator.imul, torch.mul, "mul", "mul_", "masked_fill", torch.masked_fill),
                   Linearity.FACTOR),
                  ((operator.truediv, torch.div, "div", "div_"), Linearity.DIVIDEND),
                  ((operator.pow, torch.pow, "pow"), Linearity.NONE),  # x ** 3 (GPT-2's gelu_new): the scalar
                  # broadcasts like x * 0.5; where(mask, scores, -inf) and comparisons act entry by entry
                  ((torch.where, "where", operator.gt, operator.ge, operator.lt, operator.le, torch.gt, torch.ge,
                    torch.lt, torch.le, "gt", "ge", "lt", "le"), Linearity.NONE)):
    for _t in _ts:
        register_function(_t, OpKind.BINARY, linear=_lin)
for _t in (torch.cat, torch.concat, torch.concatenate, torch.stack):  # stack: a cat along a new axis
    register_function(_t, OpKind.CAT, linear=Linearity.JOINT)
for _t in (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", F.scaled_dot_product_attention):
    register_function(_t, OpKind.BATCHED)
for _t in ("size", "dim"):
    register_function(_t, OpKind.SHAPE)
