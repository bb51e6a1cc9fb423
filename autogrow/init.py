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
    ['fade', 'mix', 'net2wider', 'ramp', 'random', 'vt', 'zero_out']
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from autogrow.errors import check_choice, fail
from autogrow.growth import UnitMap

__all__ = ["INITS", "Fade", "Mix", "Net2Wider", "Ramp", "RandomPad", "VTPairs", "WidenInit", "ZeroOut", "get_init",
           "mix_matrix", "register_init"]


class WidenInit:
    """Base class: subclasses set ``name`` and ``exact`` and implement :meth:`draw` (and :meth:`fresh`)."""

    name: ClassVar[str]
    exact: ClassVar[bool]  # the widened network computes the same function
    needs_std: ClassVar[bool] = False  # fresh values are scaled to the old tensor's standard deviation

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        """The mapping from ``width`` new units to ``n`` old ones (``uniform``: each copied equally often)."""
        raise NotImplementedError

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              units: UnitMap, block: int = 1) -> torch.Tensor:
        """Values for the fresh units of tensor ``t`` (same shape) along ``dim`` (``units``: the mapping along
        ``dim``, ``units.fresh`` says which indices are fresh; each unit is ``block`` consecutive indices, e.g. an
        attention head): ``role`` is ``"out"`` for tensors indexed by the units themselves (rows, normalisation
        entries; ``fill`` is a normalisation's neutral value), ``"in"`` for consumer columns; ``std`` is the old
        tensor's standard deviation."""
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
              units: UnitMap, block: int = 1) -> torch.Tensor:
        return _rows(t, role, fill, std, gen)


class ZeroOut(WidenInit):
    """New units with random incoming weights (matched to the old ones' standard deviation) and ZERO
    outgoing weights: they add nothing at first (exact) but bring new features to learn from."""

    name, exact, needs_std = "zero_out", True, True

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        return _fresh_map(n, width)

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              units: UnitMap, block: int = 1) -> torch.Tensor:
        return torch.zeros_like(t) if role == "in" else _rows(t, role, fill, std, gen)


class Ramp(ZeroOut):
    """Fresh units as ``zero_out`` (random incoming, zero outgoing weights), ramped in by every LayerNorm/RMSNorm
    that normalises over them (:mod:`autogrow.ramp`): the norms weigh the new units by 0 at first, in their
    statistics and outputs, and by 1 after ``ramp_steps`` optimizer steps. Exact, and unlike mixtures the new units
    are new features from the start. Where no norm normalises over the units it is ``zero_out``."""

    name = "ramp"


class Fade(RandomPad):
    """Fresh units with random incoming *and* outgoing weights, whose readers fade them in: every consumer weighs
    the new units' columns by 0 at first and by 1 after ``ramp_steps`` optimizer steps (MSG's masked ramp,
    Yao et al. 2024, on hidden units; :mod:`autogrow.ramp`). Exact at the growth, and the new units start as
    features of their own with outgoing weights to learn from, not zeros. For units that no norm normalises
    (an MLP's hidden width); where norms do, ``"ramp"``."""

    name, exact = "fade", True


class VTPairs(WidenInit):
    """Variance-transfer pairs: new units come in pairs with the same random incoming weights and opposite
    random outgoing weights (Z, -Z), which cancel exactly; an odd one out gets zero outgoing weights."""

    name, exact, needs_std = "vt", True, True

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        return _fresh_map(n, width)

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              units: UnitMap, block: int = 1) -> torch.Tensor:
        positions = torch.nonzero(units.fresh).flatten().tolist()
        starts = [positions[i] for i in range(0, len(positions), block)]  # first index of each fresh unit
        out = t.clone()
        for a, b in zip(starts[::2], starts[1::2]):  # the pair (a, b) shares one draw
            one = _rows(t.narrow(dim, a, block), role, fill, std, gen)
            out.narrow(dim, a, block).copy_(one)
            out.narrow(dim, b, block).copy_(-one if role == "in" else one)
        if len(starts) % 2:
            last = t.narrow(dim, starts[-1], block)
            out.narrow(dim, starts[-1], block).copy_(
                torch.zeros_like(last) if role == "in" else _rows(last, role, fill, std, gen))
        return out


def _centred_basis(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthonormal basis of the vectors of R^n whose entries sum to zero: ``(n, n - 1)``."""
    a = torch.randn(n, n - 1, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(a - a.mean(0, keepdim=True)).Q


def mix_matrix(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``(k, n)`` mixing ``M`` with ``M 1 = 1`` and ``M^T M = (k / n) I`` for ``k >= n``.

    New units ``y = M x`` then leave the mean and the mean square over all ``n + k`` units what they were over
    the ``n`` old ones, for every ``x``: a LayerNorm or RMSNorm normalises the old units exactly as before.
    (For ``k < n`` only the first holds: fine where no norm reads the units.)

        >>> m = mix_matrix(3, 5, torch.Generator().manual_seed(0)); x = torch.randn(3, dtype=torch.float64)
        >>> y = torch.cat([x, m @ x])
        >>> bool(torch.allclose(y.mean(), x.mean()) and torch.allclose(y.pow(2).mean(), x.pow(2).mean()))
        True
    """
    un, uk = _centred_basis(n, gen), _centred_basis(k, gen)
    a = torch.randn(max(n, k) - 1, min(n, k) - 1, generator=gen, dtype=torch.float64)
    o = torch.linalg.qr(a).Q  # orthonormal columns: an isometry between the centred subspaces
    o = o if k >= n else o.T
    return torch.ones(k, n, dtype=torch.float64) / n + math.sqrt(k / n) * uk @ o @ un.T


class Mix(WidenInit):
    """New units that are random orthogonal mixtures of the old ones (:func:`mix_matrix`): each producer row
    of a new unit is the same mixture of the old rows, normalisation entries start neutral, readers' columns at
    zero. Exact where the tensor is linear from its producers to a LayerNorm/RMSNorm (a transformer's residual
    stream: the mixing keeps each token's mean and mean square); unlike copies, the new units are not
    symmetric with any old one, so they learn something else. Their optimizer state starts empty."""

    name, exact = "mix", True

    def draw(self, n: int, width: int, *, uniform: bool, split: float, gen: torch.Generator) -> UnitMap:
        um = _fresh_map(n, width)
        um.mix = mix_matrix(n, width - n, gen)
        return um

    def fresh(self, t: torch.Tensor, dim: int, role: str, fill: float | None, std: float, gen: torch.Generator,
              units: UnitMap, block: int = 1) -> torch.Tensor:
        if role == "in":
            return torch.zeros_like(t)
        if fill is not None:
            return torch.full_like(t, fill)
        if units.mix is None:  # refused when planned (attention heads, concatenations): never reached
            fail("init: 'mix' mixes whole units of one feature, not blocks")
        n = units.mix.shape[1]
        old = t.narrow(dim, 0, n)
        new = torch.tensordot(units.mix.to(t.device, t.dtype), old.movedim(dim, 0), dims=1).movedim(0, dim)
        return torch.cat([old, new], dim)


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


for _init in (Net2Wider(), RandomPad(), ZeroOut(), VTPairs(), Mix(), Ramp(), Fade()):
    register_init(_init)
INITS = _INITS  # name -> initialiser (read-only view by convention)
