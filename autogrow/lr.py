"""The learning rate around growth: a multiplier on top of any optimizer and scheduler (framework-free).

Growing well needs the LR to cooperate: hold it while the network grows and decay it only after the
last growth (warmup-stable-decay), optionally re-warm it briefly after each growth, and optionally
scale the updates of layers whose fan-in grew (muP-style). :class:`GrowthLR` does all three without
touching the user's optimizer or scheduler: it multiplies each group's ``lr`` just for the duration of
``optimizer.step()`` (a step pre-hook) and puts it back right after (a post-hook), so a scheduler
that reads or writes ``lr`` never sees the multiplier. Several multipliers on one optimizer (two
callbacks, one widening and one stacking) share one pair of hooks and apply the largest: the LR decays
after the last growth of any of them, never twice.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(1)); opt = torch.optim.SGD([p], lr=1.0)
    >>> lr = GrowthLR(decay=0.5, total_steps=4); lr.attach(opt)
    >>> for _ in range(4):
    ...     p.grad = torch.ones(1); opt.step(); lr.step()
    >>> float(p), opt.param_groups[0]["lr"]   # multipliers 1, 1, 1, 0.5: the group's lr itself untouched
    (-3.5, 1.0)
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.errors import check_bool, check_float, check_int, check_steps, steps_of_run
from autogrow.fresh import FreshSteps
from autogrow.growth import Growth

__all__ = ["GrowthLR", "applied_multiplier", "shrink_perturb"]


@dataclass
class GrowthLR:
    """The LR multiplier around growth.

    Args:
        decay: fraction of the run, at its end, over which the multiplier falls linearly from 1 to
            ``final`` (warmup-stable-decay's decay phase; 0: no decay). It starts no earlier than the
            last growth.
        final: the multiplier at the end of the run.
        rewarm: how long after each growth the multiplier ramps from ``rewarm_start`` to 1: an ``int``, in optimizer
            steps, or a ``float`` in (0, 1), a fraction of the run's ``total_steps`` (as Lightning's
            ``val_check_interval``); 0: none. The default, 5% of the run, removes the loss spike that follows a
            widening at a high LR (the char GPT of ``suite_transformers``: 3/3 seeds, final validation loss
            1.756 -> 1.698) and costs little elsewhere (``suite_pays --variant rewarm-0.05``: Fashion MLP +0.20 pp,
            digits -0.08, paired over 5 seeds).
        rewarm_start: the multiplier right after a growth.
        width_scaling: scale each weight matrix's updates by (fan-in at the first growth / fan-in now),
            muP-style, so that a layer whose inputs doubled takes half-size steps.
        fresh_steps: Adam's bias correction per unit for fresh units (:mod:`autogrow.fresh`): their first updates
            are not several times the others'. Opt-in: +0.36 pp on the Fashion-MNIST MLP, -0.64 on digits, -0.40
            on the CNN (``suite_pays --variant fresh-steps``).
        total_steps: the run's length in optimizer steps (the callback fills it from the Trainer).
    """

    decay: float = 0.4
    final: float = 0.0
    rewarm: int | float = 0.05
    rewarm_start: float = 0.1
    width_scaling: bool = False
    fresh_steps: bool = False
    total_steps: int | None = None
    step_count: int = field(default=0, init=False)
    last_growth: int | None = field(default=None, init=False)  # step of the last growth
    base_fan_in: dict[str, int] = field(default_factory=dict, init=False)  # weight name -> fan-in at start
    fresh: FreshSteps = field(default_factory=FreshSteps, init=False, repr=False)  # births (fresh_steps)

    def __post_init__(self) -> None:
        check_float("decay", self.decay, 0.0, 1.0)
        check_float("final", self.final, 0.0, 1.0)
        check_steps("rewarm", self.rewarm)
        check_float("rewarm_start", self.rewarm_start, 0.0, 1.0)
        check_bool("width_scaling", self.width_scaling)
        check_bool("fresh_steps", self.fresh_steps)
        check_int("total_steps", self.total_steps, 1, optional=True)
        self._optimizer: weakref.ref[Optimizer] | None = None
        self._scales: dict[int, float] = {}  # id(param) -> update scale
        self._names: dict[int, str] = {}  # id(param) -> name (fresh_steps)

    def multiplier(self, step: int | None = None) -> float:
        """The multiplier at optimizer step ``step`` (default: the next one)."""
        t = self.step_count if step is None else step
        m = 1.0
        if self.decay > 0 and self.total_steps:
            start = (1 - self.decay) * self.total_steps
            if self.last_growth is not None:
                start = max(start, float(self.last_growth))
            if t >= start:
                m = 1 - (1 - self.final) * min(1.0, (t - start) / max(1.0, self.total_steps - start))
        span = self.rewarm_steps
        if span and self.last_growth is not None and t - self.last_growth < span:
            m *= self.rewarm_start + (1 - self.rewarm_start) * (t - self.last_growth) / span
        return m

    @property
    def rewarm_steps(self) -> int:
        """The re-warm's length in steps (a fraction's needs ``total_steps``; 0 until it is known)."""
        return steps_of_run(self.rewarm, self.total_steps) or 0

    def attach(self, optimizer: Optimizer, model: nn.Module | None = None) -> None:
        """Apply the multiplier (and, with ``model``, the width scaling) to every step of ``optimizer``."""
        self.detach()
        _Hooks.on(optimizer).members.append(self)
        self._optimizer = weakref.ref(optimizer)
        self._scales = self._width_scales(model) if self.width_scaling and model is not None else {}
        self._names = {id(p): n for n, p in model.named_parameters()} if self.fresh_steps and model is not None \
            else {}
        if self._names:  # after a shrink or a rollback: births of a parameter whose shape changed are void
            shapes = {n: p.shape for n, p in model.named_parameters()}  # type: ignore[union-attr]
            self.fresh.births = {n: b for n, b in self.fresh.births.items() if shapes.get(n) == b.shape}

    def attached_to(self, optimizer: Optimizer) -> bool:
        """Whether the multiplier applies to ``optimizer``'s steps."""
        return self._optimizer is not None and self._optimizer() is optimizer

    def detach(self) -> None:
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is not None:
            _Hooks.on(optimizer).remove(self, optimizer)
        self._optimizer = None

    def step(self) -> None:
        """Count one optimizer step (call after each step)."""
        self.step_count += 1

    def grew(self, model: nn.Module | None = None, growths: list[Growth] | tuple[Growth, ...] = ()) -> None:
        """A growth just happened: re-warm from here; the decay starts no earlier than now; with
        ``fresh_steps``, the fresh entries of ``growths`` (applied to ``model``) are born now."""
        self.last_growth = self.step_count
        self.follow(growths)
        if self.fresh_steps and model is not None:
            self.fresh.grew(model, growths, self.step_count)

    def follow(self, growths: list[Growth] | tuple[Growth, ...]) -> None:
        """Stacking and deepening rename parameters: the fan-ins at start follow them (a stacked copy starts from
        its original's; a deepened layer from its fan-in when first seen). :meth:`grew` calls this; call it for
        growths that did not pass through :meth:`grew` (another callback's)."""
        for g in growths:
            self.base_fan_in = {g.renames.get(k, k): v for k, v in self.base_fan_in.items()}
            if g.kind == "stack":
                self.base_fan_in.update({new: self.base_fan_in[old] for new, old in g.new_params.items()
                                         if old in self.base_fan_in})

    def _width_scales(self, model: nn.Module) -> dict[int, float]:
        out = {}
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            fan_in = p[0].numel()
            base = self.base_fan_in.setdefault(name, fan_in)
            if fan_in != base:
                out[id(p)] = base / fan_in
        return out

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and births (keys this version does not know are ignored)."""
        for k in ("step_count", "last_growth", "total_steps", "base_fan_in"):
            if k in state:
                setattr(self, k, state[k])
        self.fresh = FreshSteps(dict(state.get("fresh", {}).get("births", {})))


class _Hooks:
    """One pair of step hooks per optimizer, applying its multipliers: the largest one, and each parameter's
    width scale (from the first multiplier that scales it)."""

    _by_optimizer: weakref.WeakKeyDictionary[Optimizer, _Hooks] = weakref.WeakKeyDictionary()

    def __init__(self, optimizer: Optimizer) -> None:
        self.members: list[GrowthLR] = []
        self.handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        self.saved: list[float] = []
        self.before: dict[int, torch.Tensor] = {}

    @classmethod
    def on(cls, optimizer: Optimizer) -> _Hooks:
        if optimizer not in cls._by_optimizer:
            cls._by_optimizer[optimizer] = cls(optimizer)
        return cls._by_optimizer[optimizer]

    def remove(self, member: GrowthLR, optimizer: Optimizer) -> None:
        self.members = [m for m in self.members if m is not member]
        if not self.members:
            for h in self.handles:
                h.remove()
            del self._by_optimizer[optimizer]

    def _scales(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for m in self.members:
            for k, v in m._scales.items():
                out.setdefault(k, v)
        return out

    def _pre(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        m = applied_multiplier(optimizer)
        self.saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * m
        keep = set(self._scales()).union(*(m.fresh.tracked(m._names) for m in self.members))
        self.before = {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]
                       if id(p) in keep}

    def _post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for g, lr in zip(optimizer.param_groups, self.saved):
            g["lr"] = lr
        scales = self._scales()
        with torch.no_grad():  # muP-style: this parameter's update, scaled
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if id(p) in scales:
                        old = self.before[id(p)]
                        p.copy_(old + scales[id(p)] * (p - old))
        for m in self.members:  # fresh units: Adam's bias correction of their own
            m.fresh.correct(optimizer, m._names, self.before, m.step_count)
        self.before = {}


def applied_multiplier(optimizer: Optimizer) -> float:
    """The LR multiplier the attached :class:`GrowthLR` hooks apply to ``optimizer``'s next step (1: none).

        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> a = GrowthLR(decay=1.0, total_steps=4); a.attach(opt); a.step_count = 2
        >>> applied_multiplier(opt)
        0.5
    """
    hooks = _Hooks._by_optimizer.get(optimizer)
    return max((g.multiplier() for g in hooks.members), default=1.0) if hooks is not None else 1.0


def shrink_perturb(model: nn.Module, shrink: float, noise: float, generator: torch.Generator) -> None:
    """Ash & Adams (2020): every weight ``w <- shrink * w + noise * u``, ``u`` a fresh default init
    (uniform, bound 1/sqrt(fan-in)). Not function-preserving: opt-in, against the warm-start gap.

        >>> net = torch.nn.Linear(4, 2); w = net.weight.detach().clone()
        >>> shrink_perturb(net, 0.5, 0.0, torch.Generator().manual_seed(0))
        >>> bool(torch.equal(net.weight, 0.5 * w))
        True
    """
    check_float("shrink", shrink, 0.0, 1.0)
    check_float("noise", noise, 0.0)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            u = (torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) / fan_in ** 0.5
            p.mul_(shrink).add_(noise * u.to(p.device, p.dtype))
