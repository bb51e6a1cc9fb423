"""How big the network may get, and how many growth events that still takes (framework-free)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from autogrow.actions import GrowthAction, Widen
from autogrow.errors import AutogrowError, check_int
from autogrow.growth import num_params

__all__ = ["Budget"]


@dataclass
class Budget:
    """The growth budget: parameters, units per layer, events (``None``: unlimited).

        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> Budget(max_width=64).events_needed(net, Widen(factor=2.0), ["0"], [8])
        3
    """

    max_params: int | None = None
    max_width: int | None = None
    max_events: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_params", "max_width", "max_events"):
            check_int(name, getattr(self, name), 1, optional=True)

    @property
    def sized(self) -> bool:
        """Whether there is a size (or a number of events) to grow to: a deadline needs one."""
        return self.max_params is not None or self.max_width is not None or self.max_events is not None

    def fits(self, params: int, delta: int) -> bool:
        return self.max_params is None or params + delta <= self.max_params

    def events_needed(self, model: nn.Module, action: GrowthAction, chosen: Sequence[str],
                      widths: Sequence[int], done: int = 0) -> int:
        """Events still needed to reach the budget, if each grows like the next one (``chosen`` layers)
        would; ``widths``: the current widths of the layers that can still grow; ``done``: events so far."""
        left = max(0, self.max_events - done) if self.max_events is not None else None
        if self.max_params is None and self.max_width is None:
            return left or 0
        needed = 0
        n = num_params(model)
        if self.max_params is not None and self.max_params > n:
            try:
                delta = sum(action.plan(model, c, 0, max_width=self.max_width).param_delta for c in chosen)
            except AutogrowError:
                delta = 0
            if delta > 0:
                needed = _events_to(n, delta, self.max_params, action.factor if isinstance(action, Widen) else None)
        if self.max_width is not None and isinstance(action, Widen):
            for w in widths:
                if w < self.max_width:
                    steps = math.ceil((self.max_width - w) / action.units) if action.units else \
                        math.ceil(math.log(self.max_width / w) / math.log(action.factor) - 1e-9)
                    needed = max(needed, steps)
        return needed if left is None else min(needed, left)


def _events_to(n: int, delta: int, budget: int, factor: float | None) -> int:
    """Events until ``budget`` parameters, the next adding ``delta`` to ``n``.

    Widening every layer by ``factor``: parameters are ``A m + B m^2`` in the width multiplier ``m``
    (layers between a fixed and a grown side scale linearly, between grown sides quadratically), fitted
    to ``n`` (m = 1) and ``n + delta`` (m = factor). Otherwise each event is taken to add ``delta``.

        >>> _events_to(26_506, 28_544, 269_322, 2.0)   # an MLP 784-32-32-10 doubling to 256
        3
    """
    if factor is None or factor <= 1:
        return math.ceil((budget - n) / delta - 1e-9)
    quadratic = max(0.0, (n + delta - factor * n) / (factor * factor - factor))  # B
    linear = n - quadratic  # A
    m, k = 1.0, 0
    while linear * m + quadratic * m * m < 0.99 * budget and k < 64:  # 1%: constant terms (output bias)
        m, k = m * factor, k + 1
    return k
