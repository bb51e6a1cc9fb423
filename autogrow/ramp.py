"""Norms that fade new units in: the masked ramp of MSG (Yao et al. 2024) for a widened residual stream.

Widening a transformer's d_model adds units to every LayerNorm/RMSNorm over the stream. Fresh units (random
writers, zero readers: ``init="zero_out"``) would change those norms' statistics; mixtures of the old units
(``init="mix"``) keep them exactly, but the new units start as functions of the old ones and learn slowly. A
*ramped* norm weights each unit, in its statistics and in its output, by ``w`` in [0, 1]: the old units by 1, the
units of a growth by ``min(1, (step - start) / length)``, ``step`` being the optimizer step the caller last passed
to :func:`advance_ramps`. At ``w = 0`` the norm computes exactly what it computed before the growth, whatever the
new units hold, so fresh units are exact (``init="ramp"``); once every weight reaches 1 the norm is a plain
``nn.LayerNorm``/``nn.RMSNorm`` again (its class is restored). Norms that ramp: ``nn.LayerNorm`` and ``nn.RMSNorm``
over their last axis, their subclasses registered as such (timm's ``LayerNorm``), and classes of their own
registered as ``nn.RMSNorm`` (Llama's ``LlamaRMSNorm``: ramped by scaling what its own forward sees and returns).

Units that no norm normalises (an MLP's hidden width) are faded in by their readers instead (``init="fade"``):
a *faded* layer (``Linear``, ``ConvNd``, any registered weighted layer) weights its input features, through its
weight's columns, the same way, so the new units' outgoing weights can start random and the growth stays exact.

The ramp lives on the module (its class is swapped for :class:`RampedLayerNorm`/:class:`RampedRMSNorm`, a
subclass, as ``torch.nn.utils.parametrize`` does; parameters and ``state_dict`` keys stay the same). Deep copies
(a stacked block) carry it. :func:`ramp_state` / :func:`set_ramps` save and restore it by module name.

    >>> import torch, torch.nn as nn, torch.nn.functional as F
    >>> ln = nn.LayerNorm(6); x = torch.randn(2, 6)        # already widened from 4 units
    >>> start_ramp(ln, old=4, length=2)
    >>> y = ln(x)
    >>> bool(torch.allclose(y[:, :4], F.layer_norm(x[:, :4], (4,), ln.weight[:4], ln.bias[:4]), atol=1e-6))
    True
    >>> bool((y[:, 4:] == 0).all()), advance_ramps(ln, 0), advance_ramps(ln, 1), advance_ramps(ln, 2), type(ln).__name__
    (True, 1, 1, 0, 'LayerNorm')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from autogrow.errors import check_int, fail
from autogrow.registry import channel_spec, channel_width, layer_spec, register_channelwise, register_layer

__all__ = ["RampState", "RampedLayerNorm", "RampedRMSNorm", "advance_ramps", "fadeable", "is_ramped", "ramp_state",
           "ramp_width", "rampable", "set_ramps", "start_ramp", "unramp"]

_ATTR = "_autogrow_ramp"  # the RampState
_WEIGHTS = "_autogrow_ramp_weights"  # its per-unit weights: a plain tensor attribute, not a buffer (DDP would sync
# buffers, and removing a DDP-wrapped model's last buffer breaks its broadcast), updated in place
_LIVE = "_autogrow_ramp_live"  # how many units weigh more than 0 (for a norm ramped by scaling)
_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)  # torch >= 2.4
_NORMS = tuple(b for b in (nn.LayerNorm, _RMSNorm) if b is not None)


@dataclass(frozen=True)
class RampState:
    """One norm's ramp: per growth ``(first unit, end unit, start step)`` (start ``None``: not started, weight 0,
    until the next :func:`advance_ramps`), the ramp's length in steps and the last step passed. Units past the last
    segment's end weigh 0. Frozen: a change is a new state, so that an :class:`~autogrow.plan.Undo` restores it."""

    segments: tuple[tuple[int, int, int | None], ...]
    length: int
    now: int | None = None

    def weights(self, width: int) -> torch.Tensor:
        """The per-unit weights (float64) of a norm over ``width`` units."""
        w = torch.zeros(width, dtype=torch.float64)
        w[: self.segments[0][0]] = 1.0
        for first, end, start in self.segments:
            done = 0 if start is None or self.now is None else max(0, self.now - start)
            w[first:min(end, width)] = min(1.0, done / self.length)
        return w

    def finished(self) -> bool:
        return all(s is not None and self.now is not None and self.now - s >= self.length
                   for _, _, s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self.segments], "length": self.length, "now": self.now}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> RampState:
        return RampState(tuple((int(a), int(b), None if s is None else int(s)) for a, b, s in d["segments"]),
                         int(d["length"]), None if d.get("now") is None else int(d["now"]))


class _Ramp:
    """What every ramped norm and fading layer is (``is_ramped``)."""


class _Ramped(_Ramp):
    """The forward of a ramped norm: statistics and output weighted per unit (see the module docstring). The weights
    are a tensor updated in place, so that a compiled model does not recompile at every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, _WEIGHTS).to(x.device, x.dtype)
        total = w.sum()
        if isinstance(self, nn.LayerNorm):
            x = x - (x * w).sum(-1, keepdim=True) / total
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # type: ignore[attr-defined]
        y = x * torch.rsqrt((x * x * w).sum(-1, keepdim=True) / total + eps)
        if self.weight is not None:  # type: ignore[attr-defined]
            y = y * self.weight  # type: ignore[attr-defined]
        if getattr(self, "bias", None) is not None:
            y = y + self.bias  # type: ignore[attr-defined]
        return y * w


class _Scaled(_Ramp):
    """The ramped forward of a class of its own registered as ``nn.RMSNorm`` (Llama's ``LlamaRMSNorm``), whose
    attributes autogrow does not know. Its own forward runs on the units that weigh more than 0 (a prefix: a later
    growth never weighs more than an earlier one), with its per-unit tensors cut to them, on inputs scaled per unit
    by ``sqrt(w k / sum(w))`` (their mean square over the ``k`` units is the weighted one) and outputs scaled by
    ``sqrt(w sum(w) / k)``; the units that weigh 0 output 0. For ``g x / sqrt(mean(x^2) + eps)`` that is what the
    ramped ``nn.RMSNorm`` computes, whatever the eps is called; when only the old units weigh more than 0 the
    scales are 1, so the norm computes bit for bit what it computed before the growth, in whatever precision its
    forward works (``LlamaRMSNorm`` works in float32 whatever the model's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live, width = getattr(self, _LIVE), x.shape[-1]
        weights = getattr(self, _WEIGHTS).to(x.device, x.dtype)
        w = weights[:live]
        share = w.sum() / live
        x = x[..., :live] * torch.sqrt(w / share)
        base = _plain(type(self))
        if live == width:
            y = base.forward(self, x)
        else:
            spec = channel_spec(self)
            cut = {n: t[:live] for n in (spec.tensors if spec else ()) if isinstance(t := getattr(self, n, None),
                                                                                   torch.Tensor)}
            if hasattr(self, "normalized_shape"):
                cut["normalized_shape"] = (live,)
            y = base.forward(_Cut(self, cut), x)
            y = torch.cat([y, y.new_zeros((*y.shape[:-1], width - live))], -1)
        return y * torch.sqrt(weights * share)


class _Faded(_Ramp):
    """The forward of a layer that fades new input features in: its own forward, with the weight's input columns
    weighted per feature (old ones by 1: bit for bit the plain layer's weight)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        weight = self.weight  # type: ignore[attr-defined]
        shape = [1] * weight.dim()
        shape[self._autogrow_in_dim] = -1  # type: ignore[attr-defined]  # the weight's input axis, read once
        scaled = weight * getattr(self, _WEIGHTS).to(weight.device, weight.dtype).view(shape)
        return _plain(type(self)).forward(_Cut(self, {"weight": scaled}), x, *args, **kwargs)


class _Cut:
    """``module`` with some tensors replaced (its per-unit tensors cut to the live units), for its own forward."""

    def __init__(self, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        self.__dict__.update(tensors, _module=module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


class RampedLayerNorm(_Ramped, nn.LayerNorm):
    """An ``nn.LayerNorm`` during a ramp (made by :func:`start_ramp`, undone by :func:`unramp`)."""

    _autogrow_plain = nn.LayerNorm


_BASES: dict[type[nn.Module], type[nn.Module]] = {nn.LayerNorm: RampedLayerNorm}
if _RMSNorm is not None:
    class RampedRMSNorm(_Ramped, _RMSNorm):  # type: ignore[misc,valid-type]
        """An ``nn.RMSNorm`` during a ramp."""

        _autogrow_plain = _RMSNorm

    _BASES[_RMSNorm] = RampedRMSNorm
else:  # pragma: no cover - torch < 2.4
    RampedRMSNorm = None  # type: ignore[assignment,misc]
for _base, _ramped in _BASES.items():  # to the tracer and the coupling, a ramped norm is still its norm
    register_channelwise(_ramped, channel_spec(_base(1)))  # type: ignore[arg-type]


def _plain(ramped: type[nn.Module]) -> type[nn.Module]:
    """The class a ramped class was made from (``_autogrow_plain``, which deepening reads too: a new layer after a
    fading one is plain)."""
    return ramped._autogrow_plain  # type: ignore[attr-defined]


def is_ramped(m: nn.Module) -> bool:
    """Whether ``m`` is a norm in a ramp."""
    return isinstance(m, _Ramp)


def _registered_as_rms(m: nn.Module) -> bool:
    """Whether ``m``'s class is registered as ``nn.RMSNorm`` (``register_channelwise(cls,
    channel_spec(nn.RMSNorm(1)))``): a promise that it computes ``g x / sqrt(mean(x^2) + eps)`` over the last axis."""
    return _RMSNorm is not None and channel_spec(m) is channel_spec(_RMSNorm(1))


def _ramped_class(m: nn.Module) -> type[nn.Module]:
    """The ramped twin of ``m``'s class: made once for a weighted layer (faded), a registered subclass of
    ``nn.LayerNorm``/``nn.RMSNorm`` (timm's ``LayerNorm``) or a class of its own registered as ``nn.RMSNorm``, and
    registered as that class is."""
    cls = type(m)
    if cls not in _BASES:
        layer = layer_spec(m) is not None
        mixin = _Faded if layer else _Ramped if isinstance(m, _NORMS) else _Scaled
        name = f"{'Faded' if layer else 'Ramped'}{cls.__name__}Of{cls.__module__.split('.')[0].title()}"
        extra = {"_autogrow_in_dim": layer_spec(m).in_params["weight"]} if layer else {}  # type: ignore[union-attr]
        _BASES[cls] = type(name, (mixin, cls), {"__module__": __name__, "__doc__": f"A {cls.__name__} during a ramp.",
                                                "_autogrow_plain": cls, **extra})
        if layer:  # a forward of its own: registered itself, as what it computes
            register_layer(_BASES[cls], layer_spec(m))  # type: ignore[arg-type]
        else:
            register_channelwise(_BASES[cls], channel_spec(m))  # type: ignore[arg-type]
    return _BASES[cls]


def ramp_width(m: nn.Module) -> int:
    """The units of a norm that rampable() accepted (a class of its own has no ``normalized_shape``: its weight's),
    or the input features of a layer that fadeable() accepted."""
    spec = layer_spec(m)
    if spec is not None:
        return int(getattr(m, spec.in_attr))  # type: ignore[arg-type]
    shape = getattr(m, "normalized_shape", None)
    return int(shape[0]) if shape else int(channel_width(m))  # type: ignore[arg-type]


def fadeable(m: nn.Module) -> str | None:
    """Why weighted layer ``m`` cannot fade new input features in (``None``: it can): it needs input features
    and a ``weight`` indexed by them, which its forward reads as ``self.weight``."""
    spec = layer_spec(m)
    if spec is None or spec.in_attr is None or "weight" not in spec.in_params:
        return f"a {type(m).__name__}, which has no weight over input features to fade new ones in through"
    return None


def _why_not(m: nn.Module) -> str | None:
    """Why ``m`` cannot ramp: as a weighted layer (fading its inputs in) or as a norm."""
    return fadeable(m) if layer_spec(m) is not None else rampable(m)


def rampable(m: nn.Module) -> str | None:
    """Why ``m`` cannot ramp (``None``: it can): ``nn.LayerNorm``/``nn.RMSNorm`` and their subclasses registered as
    normalising the last axis (``register_channelwise(timm.layers.LayerNorm, channel_spec(nn.LayerNorm(1)))``: a
    subclass with a forward of its own may compute something else), over their last dimension only; and classes
    of their own registered as ``nn.RMSNorm`` (``register_channelwise(LlamaRMSNorm, channel_spec(nn.RMSNorm(1)))``)."""
    if is_ramped(m):
        return None
    spec = channel_spec(m)
    if _registered_as_rms(m) and not isinstance(m, _NORMS):
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            return f"a {type(m).__name__} without a 1-D weight; a ramp needs one (its units)"
        return None
    if type(m) not in _BASES and not (isinstance(m, _NORMS) and spec is not None and spec.dims == (-1,)):
        return (f"a {type(m).__name__}; only nn.LayerNorm and nn.RMSNorm ramp, their subclasses registered as "
                "such, and classes of their own registered as nn.RMSNorm (an RMSNorm of its own: "
                "register_channelwise(cls, channel_spec(nn.RMSNorm(1))))")
    if len(m.normalized_shape) != 1:  # type: ignore[arg-type]
        return f"normalises over {len(m.normalized_shape)} dimensions; a ramp needs the last one only"  # type: ignore
    return None


def start_ramp(m: nn.Module, old: int, length: int) -> None:
    """Ramp ``m``'s units (a norm's, or a layer's input features) from index ``old`` on (a growth just appended
    them) in over ``length`` steps, from the next :func:`advance_ramps`. A module already in a ramp adds them as a
    new segment (its ``length`` stays)."""
    check_int("length", length, 1)
    why = _why_not(m)
    if why is not None:
        fail(f"ramp: {'the layer' if layer_spec(m) is not None else 'the norm'} is {why}")
    width = ramp_width(m)
    if is_ramped(m):
        state = getattr(m, _ATTR)
        _set(m, replace(state, segments=(*state.segments, (old, width, None))))
    else:
        m.__class__ = _ramped_class(m)
        _set(m, RampState(((old, width, None),), int(length)))


def _set(m: nn.Module, state: RampState) -> None:
    """Give ramped norm (or fading layer) ``m`` its state and the weights that follow from it."""
    setattr(m, _ATTR, state)
    w = state.weights(ramp_width(m))
    setattr(m, _LIVE, int((w > 0).sum()))
    held = getattr(m, _WEIGHTS, None)
    if held is not None and held.shape == w.shape:
        held.copy_(w)
    else:
        device = m.weight.device if m.weight is not None else None  # type: ignore[union-attr]
        setattr(m, _WEIGHTS, w.to(device, torch.get_default_dtype()))


def unramp(m: nn.Module) -> None:
    """Make a ramped norm (or fading layer) plain again (every weight 1: what it computes does not change)."""
    if is_ramped(m):
        m.__class__ = _plain(type(m))
        for attr in (_ATTR, _WEIGHTS, _LIVE):
            delattr(m, attr)


def advance_ramps(model: nn.Module, step: int) -> int:
    """Tell every ramped norm and fading layer of ``model`` that the next forward is at optimizer step ``step`` (a
    ramp started by a growth begins at the first step passed after it); those whose ramp is complete become plain.
    Calling it again with the same step changes nothing. Returns how many still ramp."""
    left = 0
    for m in model.modules():
        if not is_ramped(m):
            continue
        state = getattr(m, _ATTR)
        state = RampState(tuple((a, b, step if s is None else s) for a, b, s in state.segments), state.length, step)
        if state.finished():
            unramp(m)
        else:
            _set(m, state)
            left += 1
    return left


def ramp_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every ramped norm's and fading layer's state by module name (plain data, for a checkpoint).

        >>> net = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6)); start_ramp(net[1], old=4, length=10)
        >>> advance_ramps(net, 3); ramp_state(net)
        1
        {'1': {'segments': [[4, 6, 3]], 'length': 10, 'now': 3}}
    """
    return {name: getattr(m, _ATTR).to_dict() for name, m in model.named_modules() if is_ramped(m)}


def set_ramps(model: nn.Module, states: Mapping[str, Mapping[str, Any]]) -> None:
    """Put :func:`ramp_state`'s ramps back: the named norms ramp as saved, every other norm is plain.

        >>> net = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6))
        >>> set_ramps(net, {"1": {"segments": [[4, 6, 3]], "length": 10, "now": 5}})
        >>> net[1]._autogrow_ramp.weights(6).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.2, 0.2]
        >>> set_ramps(net, {}); is_ramped(net[1])
        False
    """
    modules = dict(model.named_modules())
    for name, st in states.items():
        if name not in modules or _why_not(modules[name]) is not None:
            fail(f"ramps: {name!r} is not a norm or layer of this model that can ramp")
        first, end = st["segments"][0][0], st["segments"][-1][1]
        if end > ramp_width(modules[name]):
            fail(f"ramps: {name!r}'s ramp over units {first}..{end} does not fit its {ramp_width(modules[name])}")
    for name, m in modules.items():
        if name in states:
            if not is_ramped(m):
                m.__class__ = _ramped_class(m)
            _set(m, RampState.from_dict(states[name]))
        else:
            unramp(m)
