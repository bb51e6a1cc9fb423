"""How the new units of a widened layer start: one class per initialiser, registered by name.

An initialiser decides two things:

* :meth:`WidenInit.draw`: the unit mapping (:class:`~autogrow.growth.UnitMap`): which old unit each
  new unit copies (``idx``), the share of the old unit's outgoing weights it carries (``scale``), and
  which units are *fresh* (their values come from :meth:`WidenInit.fresh`, not from a copy; their
  optimizer state starts empty);
* :meth:`WidenInit.fresh`: the values of fresh units in one tensor (producer rows, normalisation
  entries, consumer columns).

Adding an initialiser is one class here plus its test::

    >>> sorted(INITS)
    ['net2wider', 'random']
"""

from __future__ import annotations

from typing import ClassVar

import torch

from autogrow.errors import check_choice
from autogrow.growth import UnitMap

__all__ = ["INITS", "Net2Wider", "RandomPad", "WidenInit", "get_init", "register_init"]


class WidenInit:
    """Base class: subclasses set ``name`` and ``exact`` and implement :meth:`draw` (and :meth:`fresh`)."""

    name: ClassVar[str]
    exact: ClassVar[bool]  # the widened network computes the same function

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        """The mapping from ``width`` new units to ``n`` old ones (``uniform``: each copied equally often)."""
        raise NotImplementedError

    def fresh(self, t: torch.Tensor, role: str, fill: float | None, std: float, gen: torch.Generator) -> torch.Tensor:
        """Values for the fresh units of tensor ``t`` (same shape): ``role`` is ``"out"`` for tensors indexed
        by the units themselves (rows, normalisation entries; ``fill`` is a normalisation's neutral value),
        ``"in"`` for consumer columns; ``std`` is the old tensor's standard deviation."""
        raise NotImplementedError


class Net2Wider(WidenInit):
    """Net2WiderNet: new units copy random old ones; outgoing weights split (evenly, or unevenly with
    ``split > 0``) so that they sum to the old weight. Exact."""

    name, exact = "net2wider", True

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        if uniform:
            idx = torch.arange(n).repeat(width // n)
        else:  # the paper's g: j <= n -> j, j > n -> uniform over the old units
            idx = torch.cat([torch.arange(n), torch.randint(0, n, (width - n,), generator=gen)])
        if split > 0:
            r = 1 + split * (2 * torch.rand(width, generator=gen, dtype=torch.float64) - 1)
            denom = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, r)
            scale = r / denom[idx]  # shares of each old unit sum to exactly 1
        else:
            counts = torch.bincount(idx, minlength=n).to(torch.float64)
            scale = 1.0 / counts[idx]
        return UnitMap(idx, scale, torch.zeros(width, dtype=torch.bool))


class RandomPad(WidenInit):
    """The random-padding baseline: new units get random incoming and outgoing weights. Not exact."""

    name, exact = "random", False

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        idx = torch.cat([torch.arange(n), torch.zeros(width - n, dtype=torch.long)])
        return UnitMap(idx, torch.ones(width, dtype=torch.float64), torch.arange(width) >= n)

    def fresh(self, t: torch.Tensor, role: str, fill: float | None, std: float, gen: torch.Generator) -> torch.Tensor:
        if fill is not None:
            return torch.full(t.shape, fill, dtype=t.dtype, device=t.device)
        if t.dim() == 1:
            return torch.zeros_like(t)  # new biases start at zero
        return (torch.randn(t.shape, generator=gen) * std).to(t.device, t.dtype)


_INITS: dict[str, WidenInit] = {}


def register_init(init: WidenInit) -> None:
    """Make ``init`` available as ``plan_widen(..., init=init.name)``."""
    _INITS[init.name] = init


def get_init(name: str) -> WidenInit:
    """The registered initialiser ``name``.

    Raises:
        AutogrowError: no initialiser of that name.
    """
    check_choice("init", name, tuple(_INITS))
    return _INITS[name]


for _init in (Net2Wider(), RandomPad()):
    register_init(_init)
INITS = _INITS  # name -> initialiser (read-only view by convention)
