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
    ['net2wider', 'random', 'vt', 'zero_out']
"""

from __future__ import annotations

from typing import ClassVar

import torch

from autogrow.errors import check_choice
from autogrow.growth import UnitMap

__all__ = ["INITS", "Net2Wider", "RandomPad", "VTPairs", "WidenInit", "ZeroOut", "get_init", "register_init"]


class WidenInit:
    """Base class: subclasses set ``name`` and ``exact`` and implement :meth:`draw` (and :meth:`fresh`)."""

    name: ClassVar[str]
    exact: ClassVar[bool]  # the widened network computes the same function
    needs_std: ClassVar[bool] = False  # fresh values are scaled to the old tensor's standard deviation

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        """The mapping from ``width`` new units to ``n`` old ones (``uniform``: each copied equally often)."""
        raise NotImplementedError

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              mask: torch.Tensor, block: int = 1) -> torch.Tensor:
        """Values for the fresh units of tensor ``t`` (same shape) along ``dim`` (``mask``: which indices are
        fresh; each unit is ``block`` consecutive indices, e.g. an attention head): ``role`` is ``"out"`` for
        tensors indexed by the units themselves (rows, normalisation entries; ``fill`` is a normalisation's
        neutral value), ``"in"`` for consumer columns; ``std`` is the old tensor's standard deviation."""
        raise NotImplementedError


def _fresh_map(n: int, width: int) -> UnitMap:
    """Old units keep their place; the new ones are fresh (their index is a placeholder)."""
    idx = torch.cat([torch.arange(n), torch.zeros(width - n, dtype=torch.long)])
    return UnitMap(idx, torch.ones(width, dtype=torch.float64), torch.arange(width) >= n)


def _rows(t: torch.Tensor, role: str, fill: float | None, std: float, gen: torch.Generator) -> torch.Tensor:
    """Fresh incoming values: a normalisation's neutral value, zero biases, or N(0, std) weights."""
    if fill is not None:
        return torch.full(t.shape, fill, dtype=t.dtype, device=t.device)
    if t.dim() == 1:
        return torch.zeros_like(t)
    return (torch.randn(t.shape, generator=gen) * std).to(t.device, t.dtype)


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

    name, exact, needs_std = "random", False, True

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        return _fresh_map(n, width)

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              mask: torch.Tensor, block: int = 1) -> torch.Tensor:
        return _rows(t, role, fill, std, gen)


class ZeroOut(WidenInit):
    """New units with random incoming weights (matched to the old ones' standard deviation) and ZERO
    outgoing weights: they add nothing at first (exact) but bring new features to learn from."""

    name, exact, needs_std = "zero_out", True, True

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        return _fresh_map(n, width)

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              mask: torch.Tensor, block: int = 1) -> torch.Tensor:
        return torch.zeros_like(t) if role == "in" else _rows(t, role, fill, std, gen)


class VTPairs(WidenInit):
    """Variance-transfer pairs: new units come in pairs with the same random incoming weights and opposite
    random outgoing weights (Z, -Z), which cancel exactly; an odd one out gets zero outgoing weights."""

    name, exact, needs_std = "vt", True, True

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        return _fresh_map(n, width)

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              mask: torch.Tensor, block: int = 1) -> torch.Tensor:
        positions = torch.nonzero(mask).flatten().tolist()
        units = [positions[i] for i in range(0, len(positions), block)]  # first index of each fresh unit
        out = t.clone()
        for a, b in zip(units[::2], units[1::2]):  # the pair (a, b) shares one draw
            one = _rows(t.narrow(dim, a, block), role, fill, std, gen)
            out.narrow(dim, a, block).copy_(one)
            out.narrow(dim, b, block).copy_(-one if role == "in" else one)
        if len(units) % 2:
            last = t.narrow(dim, units[-1], block)
            out.narrow(dim, units[-1], block).copy_(
                torch.zeros_like(last) if role == "in" else _rows(last, role, fill, std, gen))
        return out


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


for _init in (Net2Wider(), RandomPad(), ZeroOut(), VTPairs()):
    register_init(_init)
INITS = _INITS  # name -> initialiser (read-only view by convention)
