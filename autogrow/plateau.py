"""When to grow: triggers fed one validation value at a time (framework-free).

* :class:`Plateau`: no improvement by ``min_delta`` for ``patience`` evaluations (EarlyStopping's rule,
  used to grow instead of stop), with ``warmup`` before the first growth and ``cooldown`` after each.
* :class:`DynamicNodeCreation`: Ash (1989): grow when the improvement over the last ``window``
  evaluations, relative to the value at the last growth, falls below ``threshold``.
* :class:`EveryN`: a fixed schedule (every ``every`` evaluations), the ablation baseline.

All three share ``update(value) -> bool``, ``notify_growth()`` and ``state_dict()/load_state_dict()``.

    >>> t = Plateau(mode="min", patience=2)
    >>> [t.update(v) for v in [1.0, 0.8, 0.8, 0.8]]
    [False, False, False, True]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("min", "max")


def _check(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {value!r} is not allowed; expected {allowed}")


@dataclass
class Trigger:
    """Base class: subclasses implement :meth:`_decide`; non-finite values never trigger."""

    mode: str = "min"
    warmup: int = 0  # evaluations before the first growth may happen
    cooldown: int = 0  # evaluations after a growth during which none may happen
    evaluations: int = field(default=0, init=False)
    cooldown_left: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check("mode", self.mode, self.mode in MODES, f"one of {MODES}")
        _check("warmup", self.warmup, isinstance(self.warmup, int) and self.warmup >= 0, "an int >= 0")
        _check("cooldown", self.cooldown, isinstance(self.cooldown, int) and self.cooldown >= 0, "an int >= 0")

    def better(self, a: float, b: float, delta: float = 0.0) -> bool:
        """``a`` improves on ``b`` by more than ``delta``."""
        return a < b - delta if self.mode == "min" else a > b + delta

    def update(self, value: float) -> bool:
        """Feed one evaluation; ``True`` means: grow now. NaN/inf are ignored (returns False)."""
        if not math.isfinite(value):
            return False
        self.evaluations += 1
        decide = self._decide(float(value))
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self._forget()  # like ReduceLROnPlateau: bad evaluations in cooldown do not count
            return False
        return decide and self.evaluations > self.warmup

    def _forget(self) -> None:
        """Drop what counts towards the next growth (called during cooldown)."""

    def notify_growth(self) -> None:
        self.cooldown_left = self.cooldown

    def _decide(self, value: float) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class Plateau(Trigger):
    """Grow after ``patience`` evaluations without an improvement larger than ``min_delta``.

    ``relative=True`` reads ``min_delta`` as a fraction of the best value so far.

        >>> t = Plateau(mode="max", patience=1, min_delta=0.01, warmup=1)
        >>> [t.update(v) for v in [0.5, 0.5, 0.9, 0.905]]
        [False, True, False, True]
    """

    patience: int = 3
    min_delta: float = 0.0
    relative: bool = False
    best: float | None = field(default=None, init=False)
    wait: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("patience", self.patience, isinstance(self.patience, int) and self.patience >= 1, "an int >= 1")
        _check("min_delta", self.min_delta, self.min_delta >= 0, "a float >= 0")

    def _decide(self, value: float) -> bool:
        delta = self.min_delta * abs(self.best) if self.relative and self.best is not None else self.min_delta
        if self.best is None or self.better(value, self.best, delta):
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        return self.wait >= self.patience

    def notify_growth(self) -> None:
        super().notify_growth()
        self.wait = 0  # the best value stays: surgery preserves the function

    def _forget(self) -> None:
        self.wait = 0


@dataclass
class DynamicNodeCreation(Trigger):
    """Ash (1989): grow when ``|v(t) - v(t - window)| / |v(t0)| < threshold``, t0 = the last growth.

    At least ``window`` evaluations must separate two growths.

        >>> t = DynamicNodeCreation(window=2, threshold=0.05)
        >>> [t.update(v) for v in [1.0, 0.7, 0.5, 0.49, 0.48]]
        [False, False, False, False, True]
    """

    window: int = 3
    threshold: float = 0.05
    history: list[float] = field(default_factory=list, init=False)
    reference: float | None = field(default=None, init=False)  # the value at the last growth (or start)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("window", self.window, isinstance(self.window, int) and self.window >= 1, "an int >= 1")
        _check("threshold", self.threshold, self.threshold > 0, "a float > 0")

    def _decide(self, value: float) -> bool:
        if self.reference is None:
            self.reference = value
        self.history.append(value)
        if len(self.history) <= self.window:
            return False
        self.history = self.history[-(self.window + 1):]
        gain = self.history[-1] - self.history[0]
        gain = -gain if self.mode == "min" else gain
        return gain / max(abs(self.reference), 1e-12) < self.threshold

    def notify_growth(self) -> None:
        super().notify_growth()
        self.reference = self.history[-1] if self.history else None
        self.history = self.history[-1:]


@dataclass
class EveryN(Trigger):
    """Grow every ``every`` evaluations, whatever the metric does (the fixed-schedule baseline).

        >>> t = EveryN(every=2)
        >>> [t.update(0.0) for _ in range(5)]
        [False, True, False, True, False]
    """

    every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("every", self.every, isinstance(self.every, int) and self.every >= 1, "an int >= 1")

    def _decide(self, value: float) -> bool:
        return self.evaluations % self.every == 0
