"""Replay recorded growth on a fresh copy of the original model (checkpoint loading)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.nn as nn

from autogrow.growth import Growth, kind_of

__all__ = ["replay"]


def replay(model: nn.Module, growths: Iterable[Growth | Mapping[str, Any]]) -> list[Growth]:
    """Apply recorded growth (records or their ``to_dict()``) to ``model``, in order.

    With the recorded seeds the result has the grown shapes and, on a copy of the original weights,
    identical weights. Each record is replayed by the plan class of its kind.

    Raises:
        AutogrowError: a record does not fit the model (another architecture) or has an unknown kind.

    Example:
        >>> import copy, torch, torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)); fresh = copy.deepcopy(net)
        >>> records = [autogrow.widen(net, "0", 12).to_dict(), autogrow.deepen(net, "0").to_dict()]
        >>> _ = autogrow.replay(fresh, records)
        >>> all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
        True
    """
    out = []
    for g in growths:
        rec = g if isinstance(g, Growth) else Growth.from_dict(dict(g))
        out.append(kind_of(rec.kind).replay(model, rec))
    return out
