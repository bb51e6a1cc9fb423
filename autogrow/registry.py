"""Which layers autogrow knows how to resize, keyed by type and looked up with ``isinstance``.

Three kinds of layer matter to surgery:

* *weighted* layers (``Linear``, ``ConvNd``, ``Embedding``) own a weight indexed by output units
  and (except ``Embedding``) by input features: they start a widened tensor and end one;
* *channel-wise* layers (``BatchNormNd``, ``LayerNorm``) hold one value per feature and pass the
  feature axis through;
* *element-wise* layers (activations, dropout, pooling) have no per-feature state at all.

Users extend the same tables for their own layers::

    >>> import torch.nn as nn
    >>> import autogrow
    >>> class Swish(nn.Module):
    ...     def forward(self, x):
    ...         return x * x.sigmoid()
    >>> autogrow.register_elementwise(Swish)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn as nn

__all__ = ["ChannelSpec", "Elementwise", "LayerSpec", "channel_spec", "channel_width", "elementwise",
           "identity_kernel_size", "identity_spec",
           "layer_spec", "register_channelwise", "register_elementwise", "register_layer"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class LayerSpec:
    """How a weighted layer's tensors are indexed by its output units and its input features.

    Args:
        out_params: parameter name -> dimension indexed by output unit.
        in_params: parameter name -> dimension indexed by input feature (empty for producers only,
            such as ``Embedding``).
        out_attr: attribute that holds the number of output units (updated on widening).
        in_attr: attribute that holds the number of input features, or ``None``.
        out_dim: axis of the layer's *output tensor* that holds the units, counted from the end.
        in_dim: axis of the layer's *input tensor* that holds the features, counted from the end.
        check: returns why a given instance cannot be resized, or ``None`` when it can.
        identity: builds a new layer of this type that computes the identity on ``n`` features
            (Net2DeeperNet), or ``None`` when the type cannot be deepened.
        applies: whether an instance is a weighted layer at all (a depthwise conv is channel-wise).
    """

    out_params: Mapping[str, int]
    in_params: Mapping[str, int]
    out_attr: str
    in_attr: str | None
    out_dim: int
    in_dim: int
    check: Callable[[nn.Module], str | None] = lambda m: None
    identity: Callable[[nn.Module, int | None], nn.Module] | None = None
    applies: Callable[[nn.Module], bool] = lambda m: True


@dataclass(frozen=True)
class ChannelSpec:
    """A layer with one value per feature along ``dim`` of its input (and output) tensor.

    Args:
        tensors: parameter/buffer name -> neutral value for a brand-new feature (``None``: drawn like a
            weight), indexed by the features on axis 0.
        attr_update: writes the new width into the layer's attributes.
        dims: the axis the features sit on: counted from the front if >= 0 (BatchNorm: 1), from the
            end if < 0 (LayerNorm: -1); several entries for layers that accept either.
        uniform_only: exact only when every feature is replicated the same number of times
            (``LayerNorm``: then the mean and variance over the features are unchanged).
        applies: whether an instance is channel-wise at all (a ``PReLU`` with one shared slope is
            element-wise: register the type as both).
        group_size: for a layer acting on contiguous groups of features (``GroupNorm``, a grouped conv), the
            features per group: exact only when whole new groups of fresh units (zero outgoing weights) are
            appended (a size of 1 constrains nothing).
        rows: the layer treats every position of its input's other axes on its own (``LayerNorm``/``RMSNorm``
            normalise one vector of features at a time, ``PReLU`` acts entry by entry): widened units on another
            axis pass through it as through an element-wise op (a per-head norm over the head size, Qwen3's
            ``q_norm``). Not so for ``BatchNorm``, ``InstanceNorm``, ``GroupNorm`` or a depthwise conv, whose
            statistics or filters span the other axes.
        dark: the value of each of ``tensors`` at which a feature's output is 0, where it is not 0 (Gemma's
            RMSNorm computes ``x * (1 + weight)``: its weight is dark at -1, neutral at 0); a tied output layer
            that reads the widened units through the layer needs its new features dark (:mod:`autogrow.tied`).
    """

    tensors: Mapping[str, float | None]
    attr_update: Callable[[nn.Module, int], None]
    dims: tuple[int, ...]
    uniform_only: bool = False
    check: Callable[[nn.Module], str | None] = lambda m: None
    applies: Callable[[nn.Module], bool] = lambda m: True
    group_size: Callable[[nn.Module], int] | None = None
    rows: bool = False
    dark: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Elementwise:
    """A layer acting on each feature separately: is it a nonlinearity, is it idempotent, and is it linear
    (``f(a x + b y) = a f(x) + b f(y)``: then it commutes with mixing features, as ``init="mix"`` does)?"""

    activation: bool = True
    idempotent: bool = False
    linear: bool = False


_WEIGHTED: dict[type, LayerSpec] = {}
_CHANNELWISE: dict[type, ChannelSpec] = {}
_ELEMENTWISE: dict[type, Elementwise] = {}


def _lookup(table: Mapping[type, _T], module: nn.Module) -> _T | None:
    # Walk the MRO so that subclasses of a registered type are handled too, most specific first; but a
    # subclass with its own forward may compute something else (timm's LayerNorm2d normalises channels,
    # not the last axis): it must be registered itself.
    forward = type(module).forward
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls] if cls is type(module) or getattr(cls, "forward", None) is forward else None
    return None


def register_layer(cls: type[nn.Module], spec: LayerSpec) -> None:
    """Teach autogrow to widen (and, with ``spec.identity``, deepen after) a weighted layer type."""
    _WEIGHTED[cls] = spec


def register_channelwise(cls: type[nn.Module], spec: ChannelSpec) -> None:
    """Teach autogrow a layer with one parameter/buffer entry per feature (a normalisation)."""
    _CHANNELWISE[cls] = spec


def register_elementwise(cls: type[nn.Module], *, activation: bool = True, idempotent: bool = False,
                         linear: bool = False) -> None:
    """Mark a parameter-free layer that acts on each feature separately (activation, dropout, pooling).

    ``activation=False`` for layers that are not a nonlinearity (dropout, pooling, identity):
    Net2DeeperNet looks past them for the activation. ``idempotent=True`` declares phi(phi(v)) =
    phi(v), which makes Net2DeeperNet's identity insertion exact after it (ReLU is; GELU is not).
    ``linear=True`` declares that the layer is linear in its input (identity, dropout, average pooling):
    ``init="mix"`` may then mix the units before it.
    """
    _ELEMENTWISE[cls] = Elementwise(activation=activation, idempotent=idempotent, linear=linear)


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The registered :class:`LayerSpec` of ``module``'s type, or ``None`` (also when it does not apply to
    this instance)."""
    spec = _lookup(_WEIGHTED, module)
    return spec if spec is not None and spec.applies(module) else None


def identity_spec(module: nn.Module) -> LayerSpec | None:
    """The :class:`LayerSpec` whose ``identity`` builds a layer after ``module``: that of any registered weighted
    type, also where the instance is channel-wise (after a depthwise conv comes a full identity conv)."""
    return _lookup(_WEIGHTED, module)


def channel_spec(module: nn.Module) -> ChannelSpec | None:
    """The registered :class:`ChannelSpec` of ``module``'s type, or ``None`` (also when it does not apply to
    this instance)."""
    spec = _lookup(_CHANNELWISE, module)
    return spec if spec is not None and spec.applies(module) else None


def channel_width(module: nn.Module) -> int | None:
    """The number of features of a channel-wise layer, read from its first tensor (None if it has none)."""
    spec = channel_spec(module)
    for name in spec.tensors if spec is not None else ():
        t = getattr(module, name, None)
        if t is not None:
            return t.shape[0]
    return None


def elementwise(module: nn.Module) -> Elementwise | None:
    """How a registered element-wise module behaves, or ``None`` if its type is not registered."""
    return _lookup(_ELEMENTWISE, module)


# --- built-in layers -------------------------------------------------------------------------


def _linear_identity(m: nn.Module, kernel_size: int | None) -> nn.Module:
    n = m.out_features
    # Built on the meta device: PyTorch's default init would draw from the global RNG for nothing.
    new = nn.Linear(n, n, bias=m.bias is not None, device="meta", dtype=m.weight.dtype)
    new = new.to_empty(device=m.weight.device)
    with torch.no_grad():
        new.weight.copy_(torch.eye(n, device=m.weight.device, dtype=m.weight.dtype))
        if new.bias is not None:
            new.bias.zero_()
    return new


def identity_kernel_size(m: nn.Module, kernel_size: int | None) -> int:
    """Kernel of a new identity conv after ``m``: ``kernel_size``, else ``m``'s, made odd (a centred tap)."""
    k = kernel_size if kernel_size is not None else max(m.kernel_size)
    return k + 1 - k % 2


def _conv_identity(m: nn.Module, kernel_size: int | None, conv: type[nn.Module] | None = None) -> nn.Module:
    k = identity_kernel_size(m, kernel_size)
    n, nd = m.out_channels, len(m.kernel_size)
    cls = conv or getattr(type(m), "_autogrow_plain", type(m))  # a layer fading inputs in (autogrow.ramp): its class
    new = cls(n, n, k, padding=k // 2, bias=m.bias is not None, padding_mode=m.padding_mode, device="meta",
              dtype=m.weight.dtype).to_empty(device=m.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        centre = (k // 2,) * nd  # integer index: (k - 1) / 2 as a float would be a bug
        ar = torch.arange(n, device=m.weight.device)
        new.weight[(ar, ar, *centre)] = 1.0
        if new.bias is not None:
            new.bias.zero_()
    return new


def _grouped_channelwise(m: nn.Module) -> bool:
    """Groups of as many out as in channels (depthwise: groups == in == out): each output channel reads only its
    own group's inputs, so the conv follows its input's width and grows by whole groups (depthwise: one channel)."""
    return m.groups > 1 and m.in_channels == m.out_channels


def _grouped_update(m: nn.Module, n: int) -> None:
    per_group = m.in_channels // m.groups
    m.in_channels = m.out_channels = n
    m.groups = n // per_group


def _conv_check(m: nn.Module) -> str | None:
    if m.groups != 1:
        return (f"groups={m.groups} with {m.in_channels} in and {m.out_channels} out channels (a grouped "
                "convolution couples channels within a group; only grouped convs with as many out as in channels "
                "grow, by whole groups, with their input)")
    return None


register_layer(nn.Linear, LayerSpec({"weight": 0, "bias": 0}, {"weight": 1}, "out_features",
                                    "in_features", -1, -1, identity=_linear_identity))
for _nd, _conv in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
    register_layer(_conv, LayerSpec({"weight": 0, "bias": 0}, {"weight": 1}, "out_channels",
                                    "in_channels", -(_nd + 1), -(_nd + 1), check=_conv_check,
                                    identity=_conv_identity, applies=lambda m: not _grouped_channelwise(m)))
for _nd, (_convt, _conv) in enumerate(((nn.ConvTranspose1d, nn.Conv1d), (nn.ConvTranspose2d, nn.Conv2d),
                                       (nn.ConvTranspose3d, nn.Conv3d)), 1):
    # weight (in, out, *k): units on axis 1, features on axis 0; deepening after one adds a plain identity conv
    register_layer(_convt, LayerSpec({"weight": 1, "bias": 0}, {"weight": 0}, "out_channels", "in_channels",
                                     -(_nd + 1), -(_nd + 1), check=_conv_check,
                                     identity=lambda m, k, conv=_conv: _conv_identity(m, k, conv)))
register_layer(nn.Embedding, LayerSpec({"weight": 1}, {}, "embedding_dim", None, -1, -1))


def _bn_update(m: nn.Module, n: int) -> None:
    m.num_features = n


def _ln_update(m: nn.Module, n: int) -> None:
    if hasattr(m, "normalized_shape"):  # a norm written by hand and registered with this spec may not have it
        m.normalized_shape = (n,)


def _ln_check(m: nn.Module) -> str | None:
    if len(getattr(m, "normalized_shape", ())) > 1:
        return f"normalized_shape={tuple(m.normalized_shape)} (only a 1-D normalized_shape can be widened)"
    return None


_BN = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_channelwise(_bn, ChannelSpec(_BN, _bn_update, dims=(1,)))  # (N, C, ...): axis 1
register_channelwise(nn.LayerNorm, ChannelSpec({"weight": 1.0, "bias": 0.0}, _ln_update, dims=(-1,),
                                               uniform_only=True, check=_ln_check, rows=True))
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    # depthwise: a new channel copies (or draws) its own filter; wider groups: new channels form new groups, each
    # with drawn filters over its own (new) inputs, exact when their outgoing weights are zero (as for GroupNorm)
    register_channelwise(_conv, ChannelSpec({"weight": None, "bias": 0.0}, _grouped_update, dims=(1,),
                                            applies=_grouped_channelwise,
                                            group_size=lambda m: m.in_channels // m.groups))
_IN = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}  # each tensor only if it exists
for _inorm in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    # statistics per sample and channel: a copied channel normalises exactly as its original
    register_channelwise(_inorm, ChannelSpec(_IN, _bn_update, dims=(1,)))


def _gn_update(m: nn.Module, n: int) -> None:
    m.num_groups, m.num_channels = n // (m.num_channels // m.num_groups), n  # the group size stays


# groups of contiguous channels: old groups keep their channels (and statistics), new channels form new groups
register_channelwise(nn.GroupNorm, ChannelSpec({"weight": 1.0, "bias": 0.0}, _gn_update, dims=(1,),
                                               group_size=lambda m: m.num_channels // m.num_groups))


def _prelu_update(m: nn.Module, n: int) -> None:
    m.num_parameters = n


# one slope per channel (axis 1, as PReLU applies it), or one shared slope: then an ordinary activation
register_channelwise(nn.PReLU, ChannelSpec({"weight": 0.25}, _prelu_update, dims=(1,),
                                           applies=lambda m: m.num_parameters > 1, rows=True))
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_channelwise(nn.RMSNorm, ChannelSpec({"weight": 1.0}, _ln_update, dims=(-1,),
                                                 uniform_only=True, check=_ln_check, rows=True))

for _cls in (nn.ReLU, nn.ReLU6, nn.Hardtanh):
    register_elementwise(_cls, idempotent=True)
for _cls in (nn.PReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU,
             nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink):
    register_elementwise(_cls)
for _cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
             nn.AdaptiveMaxPool3d):
    register_elementwise(_cls, activation=False)
# linear: dropout scales each entry by a mask (the identity in eval mode, where exactness is checked)
for _cls in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d):
    register_elementwise(_cls, activation=False, linear=True)

