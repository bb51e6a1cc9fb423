"""What one growth does to one layer: typed, validated pieces the callback composes (framework-free).

``Widen`` and ``Deepen`` turn "grow layer ``name`` now" into a :class:`~autogrow.plan.Plan`. They hold
the options (factor, initialiser, symmetry breaking, residual form), are validated when built, and
have string shortcuts (``"widen"``, ``"deepen"``) for configs::

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> Widen(factor=1.5).plan(net, "0", seed=0).width
    12
    >>> make_action("deepen").plan(net, "0", seed=0).residual
    False
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch.nn as nn

from autogrow.capture import traced
from autogrow.deepen import INITS as DEEPEN_INITS
from autogrow.deepen import plan_deepen
from autogrow.errors import (
    AutogrowError,
    NeedsShapes,
    check,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_steps,
    fail,
    steps_of_run,
)
from autogrow.init import get_init
from autogrow.optim import NEW_STATES
from autogrow.plan import Plan
from autogrow.registry import layer_spec
from autogrow.stack import INITS as STACK_INITS
from autogrow.stack import plan_stack
from autogrow.trace import unwrap
from autogrow.widen import plan_widen, unit_features

__all__ = ["ACTIONS", "Deepen", "GrowthAction", "Stack", "Widen", "discover_targets", "make_action", "width_of"]


def width_of(module: nn.Module) -> int:
    """The number of output units of a registered weighted layer (0 for anything else)."""
    spec = layer_spec(module)
    return getattr(module, spec.out_attr) if spec is not None else 0


class GrowthAction:
    """Base class: how to grow one named layer of a model."""

    name: ClassVar[str]
    changes_width: ClassVar[bool] = False

    def plan(self, model: nn.Module, target: str, seed: int, *, max_width: int | None = None,
             example_inputs: Any = None) -> Plan:
        """The plan growing ``target`` (nothing changes until it is applied)."""
        raise NotImplementedError

    def can_grow(self, model: nn.Module, target: str, max_width: int | None) -> bool:
        """Whether ``target`` has room to grow under ``max_width``."""
        return True

    def for_run(self, total_steps: int | None) -> GrowthAction:
        """This action with options given as a fraction of the run resolved (``total_steps``: ``None`` if unknown)."""
        return self

    def candidates(self, model: nn.Module) -> list[str]:
        """Names this action may grow, before checking: every registered weighted layer."""
        return [n for n, m in model.named_modules() if layer_spec(m) is not None]


@dataclass
class Widen(GrowthAction):
    """Net2WiderNet on a layer: ``ceil(width * factor)`` units, or ``units`` more, rounded up to whole attention
    heads (and equal parts of a fused layer), or down where ``max_width`` would be exceeded.

    Args:
        factor: growth factor per event (> 1).
        units: add this many units instead (takes precedence over ``factor``).
        init: a widening initialiser (``autogrow.init``): ``"auto"`` (the default: ``"zero_out"``, new units
            with random incoming and zero outgoing weights; where a LayerNorm normalises over the units,
            ``"mix"``, random orthogonal mixtures of the old units, or ``"net2wider"`` copies where mixing would
            not be exact), ``"zero_out"``, ``"vt"``, ``"mix"``, ``"net2wider"`` (exact) or ``"random"``.
        split: for copies, uneven shares of their outgoing weights (exact, breaks the symmetry between copies;
            with ``split=0`` exact copies get identical gradients and stay copies).
        noise: keras-style noise on the copies' outgoing weights (inexact).
        new_state: optimizer state of fresh units (``init="zero_out"``, ``"vt"``, ``"random"``): ``"zero"`` or
            ``"mean"`` (see :func:`autogrow.plan_widen`).
        gradmax: in the callback, set the fresh units' incoming weights from the next training step's gradients
            (:mod:`autogrow.gradmax`; ``init="zero_out"`` or ``"auto"``; Linear layers reaching Linear layers,
            others keep their drawn rows with a warning). Held in memory until that step: a checkpoint written in
            between resumes with the drawn rows.
        ramp: with ``init="auto"``, units that LayerNorms/RMSNorms normalise over (a transformer's d_model) start
            as fresh units that the norms ramp in (:mod:`autogrow.ramp`, exact) over this many optimizer steps
            (an int) or this fraction of the run (a float in (0, 1); no ramp while the run's length is unknown);
            ``None``: mixtures of the old units instead (``init="mix"``).
    """

    name = "widen"
    changes_width = True
    factor: float = 2.0
    units: int | None = None
    init: str = "auto"
    split: float = 0.5
    noise: float = 0.0
    new_state: str = "zero"
    gradmax: bool = False
    ramp: int | float | None = 0.05

    def __post_init__(self) -> None:
        check_float("factor", self.factor, 1.0, low_open=True)
        check_steps("ramp", self.ramp, 1, optional=True)
        check_bool("gradmax", self.gradmax)
        check("init", self.init, not self.gradmax or self.init in ("auto", "zero_out"),
              "'auto' or 'zero_out' with gradmax=True (GradMax re-points fresh units)")
        check_choice("new_state", self.new_state, NEW_STATES)
        check_int("units", self.units, 1, optional=True)
        if self.init != "auto":
            get_init(self.init)
        check_float("split", self.split, 0.0, 1.0, high_open=True)
        check_float("noise", self.noise, 0.0)

    def new_width(self, old: int, max_width: int | None) -> int:
        """The width after one event: at least one more unit, at most ``max_width``."""
        new = old + self.units if self.units is not None else max(old + 1, math.ceil(old * self.factor))
        return min(new, max_width) if max_width is not None else new

    def can_grow(self, model: nn.Module, target: str, max_width: int | None) -> bool:
        old = width_of(model.get_submodule(target))
        return self.new_width(old, max_width) > old

    def for_run(self, total_steps: int | None) -> Widen:
        return replace(self, ramp=steps_of_run(self.ramp, total_steps)) if isinstance(self.ramp, float) else self

    def plan(self, model: nn.Module, target: str, seed: int, *, max_width: int | None = None,
             example_inputs: Any = None) -> Plan:
        old = width_of(model.get_submodule(target))
        graph = traced(unwrap(model, target)[0], example_inputs)  # once: the rounding and the plan read it
        unit, fixed = unit_features(model, target, example_inputs, traced_graph=graph)
        # the factor applies to what grows: a multi-query c_attn's query part, its key/value head (fixed) kept
        width = fixed + max(self.new_width(old - fixed, None if max_width is None else max_width - fixed),
                            old - fixed + 1)
        if (width - fixed) % unit:  # whole heads (and parts of a fused layer): up, or down to stay within max_width
            up = fixed + -(-(width - fixed) // unit) * unit
            width = up if max_width is None or up <= max_width else up - unit if up - unit > old else width
        ramp = self.ramp if isinstance(self.ramp, int) else None  # a fraction: unresolved (see for_run)
        return plan_widen(model, target, width, init=self.init, split=self.split, noise=self.noise, generator=seed,
                          example_inputs=example_inputs, new_state=self.new_state, traced_graph=graph,
                          ramp_steps=ramp)


@dataclass
class Deepen(GrowthAction):
    """Net2DeeperNet after a layer.

    Args:
        init: ``"identity"`` (exact) or ``"random"`` (the baseline).
        residual: ``None`` inserts an ``x + f(x)`` block exactly where the activation needs one
            (GELU, tanh, ...), a plain identity layer elsewhere; ``True``/``False`` force it.
        batch_norm: add an (eval-mode identity) BatchNorm after a plain new layer.
    """

    name = "deepen"
    init: str = "identity"
    residual: bool | None = None
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check_choice("init", self.init, DEEPEN_INITS)
        if self.residual is not None:
            check_bool("residual", self.residual)
        check_bool("batch_norm", self.batch_norm)

    def plan(self, model: nn.Module, target: str, seed: int, *, max_width: int | None = None,
             example_inputs: Any = None) -> Plan:
        return plan_deepen(model, target, init=self.init, residual=self.residual, batch_norm=self.batch_norm,
                           generator=seed, example_inputs=example_inputs)


@dataclass
class Stack(GrowthAction):
    """Deeper by whole residual blocks: a copy of a block after it, starting as the identity
    (:func:`autogrow.plan_stack`). Candidates are the items of ``nn.ModuleList``/``nn.Sequential``
    containers that hold weighted layers; with policy ``"all"`` every block gets its copy (depth x2).

    Args:
        init: ``"copy"`` (the block's weights, its stream outputs at zero), ``"random"``, or ``"duplicate"`` (an
            unmodified copy: not function-preserving, opt-in; see :func:`autogrow.plan_stack`).
    """

    name = "stack"
    init: str = "copy"

    def __post_init__(self) -> None:
        check_choice("init", self.init, STACK_INITS)

    def candidates(self, model: nn.Module) -> list[str]:
        out = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.ModuleList, nn.Sequential)):
                out += [f"{name}.{i}" if name else str(i) for i, child in enumerate(m)
                        if any(layer_spec(c) is not None for c in child.modules())]
        return out

    def plan(self, model: nn.Module, target: str, seed: int, *, max_width: int | None = None,
             example_inputs: Any = None) -> Plan:
        return plan_stack(model, target, init=self.init, generator=seed, example_inputs=example_inputs)


ACTIONS: dict[str, type[GrowthAction]] = {"widen": Widen, "deepen": Deepen, "stack": Stack}


def make_action(action: str | GrowthAction) -> GrowthAction:
    """A growth action from a shortcut name (with its defaults) or an instance.

    Raises:
        AutogrowError: an unknown name.
    """
    if isinstance(action, GrowthAction):
        return action
    check_choice("grow", action, tuple(ACTIONS))
    return ACTIONS[action]()


def discover_targets(model: nn.Module, action: GrowthAction, names: list[str] | None = None,
                     example_inputs: Any = None) -> list[str]:
    """The layers ``action`` can grow exactly: ``names`` (each checked) or, with ``None``, every weighted
    layer that can; layers that grow together (one residual stream) are represented by the first. Without
    ``example_inputs``, layers whose growth depends on tensor shapes are kept (checked when they grow).

        >>> import torch.nn as nn
        >>> discover_targets(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), Widen())
        ['0']

    Raises:
        AutogrowError: an explicit name cannot grow (with the reason), or no layer can (with the reasons).
    """
    candidates = names or action.candidates(model)
    known = dict(model.named_modules())
    for name in names or []:
        check("targets", name, name in known, f"names of submodules of {type(model).__name__}, such as "
              f"{[n for n, m in known.items() if layer_spec(m) is not None][:8]}")
    found: list[str] = []
    covered: set[str] = set()  # layers already growing with an earlier candidate
    reasons: dict[str, list[str]] = {}
    for name in candidates:
        if name in covered:
            continue
        try:
            plan = action.plan(model, name, seed=0, example_inputs=example_inputs)
        except NeedsShapes:
            found.append(name)
            continue
        except AutogrowError as e:
            if names:
                fail(f"targets: {name!r} cannot {action.name}: {e}")
            reasons.setdefault(str(e), []).append(name)
        else:
            found.append(name)
            covered.update(getattr(plan, "producers", [name]))
    if not found:
        why = "; ".join(f"{', '.join(ns[:3])}{' ...' if len(ns) > 3 else ''}: {r}" for r, ns in reasons.items())
        fail(f"model: no layer of {type(model).__name__} can {action.name} exactly ({why or 'no weighted layers'})")
    return found
