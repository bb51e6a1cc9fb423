"""Replay recorded growth on a fresh copy of the original model (checkpoint loading)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from autogrow.deepen import plan_deepen
from autogrow.errors import AutogrowError
from autogrow.growth import Growth
from autogrow.widen import plan_widen


def replay(model: nn.Module, growths: Iterable[Growth | Mapping[str, Any]]) -> list[Growth]:
    """Apply recorded growth (records or their ``to_dict()``) to ``model``, in order.

    With the recorded seeds the result has the grown shapes and, on a copy of the original weights,
    identical weights. A record that does not fit the model (other architecture) raises.

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
        o = rec.options
        if rec.kind == "widen":
            plan = plan_widen(model, rec.target, o["width"], init=o["init"], noise=o["noise"], split=o["split"],
                              mapping=o["mapping"], generator=rec.seed)
            if any(not torch.equal(plan.maps[k].idx, m.idx) for k, m in rec.maps.items()):
                raise AutogrowError(f"growths: the widening of {rec.target!r} does not fit this model "
                                    "(its unit mappings differ from the recorded ones)")
            out.append(plan.apply())
        elif rec.kind == "deepen":
            plan = plan_deepen(model, rec.target, init=o["init"], residual=o["residual"],
                               batch_norm=o["batch_norm"], kernel_size=o["kernel_size"], generator=rec.seed)
            if plan.wrap != o["wrap"]:
                raise AutogrowError(f"growths: deepening after {rec.target!r} would wrap {plan.wrap!r}, "
                                    f"recorded {o['wrap']!r}; the model differs from the recorded one")
            out.append(plan.apply())
        else:
            raise AutogrowError(f"growths: unknown kind {rec.kind!r} (expected 'widen' or 'deepen')")
    return out
