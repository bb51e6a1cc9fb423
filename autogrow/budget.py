"""How big the network may get, and how many growth events that still takes (framework-free)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from autogrow.actions import GrowthAction, Widen
from autogrow.errors import AutogrowError, check_int
from autogrow.growth import num_params
from autogrow.plan import Plan

__all__ = ["Budget", "events_to"]


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
                plans = [action.plan(model, c, 0, max_width=self.max_width) for c in chosen]
            except AutogrowError:
                plans = []
            needed = events_to(n, plans, self.max_params)
        if self.max_width is not None and isinstance(action, Widen):
            for w in widths:
                if w < self.max_width:
                    steps = math.ceil((self.max_width - w) / action.units) if action.units else \
                        math.ceil(math.log(self.max_width / w) / math.log(action.factor) - 1e-9)
                    needed = max(needed, steps)
        return needed if left is None else min(needed, left)


def events_to(n: int, plans: Sequence[Plan], budget: int) -> int:
    """Events until ``budget`` parameters, from ``n``, each growing like ``plans`` (applied together) would.

    Widenings: every dimension they resize keeps growing by the same ratio at every event, so the size after
    ``k`` events is a sum of products, exact for the weight between two grown layers too (it grows in both
    dimensions). Other plans add the same number of parameters every time. The last event may fit only in part
    (the callback grows the layers that still fit).

        >>> import torch.nn as nn
        >>> from autogrow import num_params, plan_widen
        >>> mlp = lambda h: nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
        >>> net = mlp(32)
        >>> events_to(num_params(net), [plan_widen(net, "0", 64), plan_widen(net, "2", 64)], num_params(mlp(256)))
        3
    """
    if not plans:
        return 0
    if not all(hasattr(p, "changes") for p in plans):
        delta = sum(p.param_delta for p in plans)
        return math.ceil((budget - n) / delta - 1e-9) if delta > 0 else 0
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for plan in plans:  # a tensor two plans resize grows in both of their dimensions
        for c in plan.changes:  # type: ignore[attr-defined]
            if c.is_param:
                new = shapes.get(c.name, (c.old_shape, c.new_shape))[1]
                shapes[c.name] = (c.old_shape, tuple(map(max, new, c.new_shape)))
    fixed = n - sum(math.prod(old) for old, _ in shapes.values())

    def size(k: int) -> float:
        return fixed + sum(math.prod(o * (w / o) ** k for o, w in zip(old, new)) for old, new in shapes.values())

    k = 0
    while size(k + 1) <= budget * (1 + 1e-9) and size(k + 1) > size(k) and k < 64:
        k += 1
    return k + 1 if size(k) < 0.99 * budget and size(k + 1) > size(k) else k  # + a last, partial event
