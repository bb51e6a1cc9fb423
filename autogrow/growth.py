"""The serialisable record of one growth operation, and the index maps it carries.

A :class:`Growth` is plain data (JSON-able via :meth:`Growth.to_dict`). It says, for every parameter
that changed, along which dimension and with which unit mapping, so that the optimizer state can be
remapped the same way (``autogrow.optim``), and it holds the options and seed that let the same
change be replayed on a fresh copy of the original model (checkpoint loading).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from autogrow.errors import check, check_choice

__all__ = ["MERGES", "SHRINK_ROLES", "Growth", "GrowthKind", "Transform", "UnitMap", "make_seed", "merge_members",
           "merge_units", "num_params", "register_kind", "shrunk_width"]


@dataclass
class UnitMap:
    """New unit j takes old unit ``idx[j]``; its outgoing weights carry the share ``scale[j]``.

    ``fresh[j]`` marks a brand-new unit with random weights (``init="random"``): nothing of the old
    model or optimizer state carries over to it. ``mix`` (``init="mix"``), when set, gives each fresh unit's
    values as a combination of the old units' values: row ``i`` for the ``i``-th fresh unit.
    """

    idx: torch.Tensor
    scale: torch.Tensor  # float64
    fresh: torch.Tensor  # bool
    mix: torch.Tensor | None = None  # float64, (fresh units, old units)

    @property
    def scaled(self) -> bool:
        """Whether some unit carries a share other than 1 (a replicated unit)."""
        return not bool((self.scale == 1).all())

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t`` re-indexed along ``dim``: a new tensor, safe to modify in place."""
        return t.index_select(dim, self.idx.to(t.device))

    @staticmethod
    def along(v: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
        """The per-unit vector ``v`` shaped to broadcast along ``dim`` of ``like`` (on its device)."""
        shape = [1] * like.dim()
        shape[dim] = -1
        return v.to(like.device).view(shape)

    def expand(self, block: int) -> UnitMap:
        """The same mapping over features laid out as ``block`` consecutive entries per unit (without ``mix``:
        mixtures are planned only for units of one feature; blocks reach only readers, whose columns are zero)."""
        if block == 1:
            return self
        ar = torch.arange(block)
        return UnitMap((self.idx[:, None] * block + ar).reshape(-1), self.scale.repeat_interleave(block),
                       self.fresh.repeat_interleave(block))

    @staticmethod
    def cat(parts: list[tuple[UnitMap, int]]) -> UnitMap:
        """Concatenation of mappings over tensors of the given old widths (offsets add up)."""
        offsets = torch.tensor([0] + [w for _, w in parts[:-1]]).cumsum(0).tolist()
        return UnitMap(torch.cat([m.idx + o for (m, _), o in zip(parts, offsets)]),
                       torch.cat([m.scale for m, _ in parts]), torch.cat([m.fresh for m, _ in parts]))

    @staticmethod
    def identity(n: int) -> UnitMap:
        return UnitMap(torch.arange(n), torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool))

    def to_dict(self) -> dict[str, list]:
        d = {"idx": self.idx.tolist(), "scale": self.scale.tolist(), "fresh": self.fresh.tolist()}
        return d if self.mix is None else {**d, "mix": self.mix.tolist()}

    @staticmethod
    def from_dict(d: dict[str, list]) -> UnitMap:
        mix = torch.tensor(d["mix"], dtype=torch.float64) if "mix" in d else None
        return UnitMap(torch.tensor(d["idx"], dtype=torch.long), torch.tensor(d["scale"], dtype=torch.float64),
                       torch.tensor(d["fresh"], dtype=torch.bool), mix)


@dataclass
class Transform:
    """One dimension of one tensor re-indexed by a mapping.

    ``role`` is ``"out"`` for dimensions indexed by the widened units themselves (producer rows,
    normalisation entries: their gradients scale with the unit's share) and ``"in"`` for consumer
    input features (their gradients are copied unchanged).

    Shrinking (``autogrow.shrink``) uses two more roles, whose mapping is read the other way round
    (see :func:`merge_units`): ``"merge"`` for the dimension indexed by the merged units themselves
    (each group keeps its first member) and ``"sum"`` for consumer input features (each group's
    columns are added up).
    """

    dim: int
    map: str
    role: str
    block: int = 1


SHRINK_ROLES = ("merge", "sum")  # Transform roles whose map is a merge map (old unit -> new unit)
MERGES = ("first", "sum", "mean", "sqrtsum")  # how merge_units combines a group


def shrunk_width(um: UnitMap) -> int:
    """Number of new units of a *merge map* (as used by the ``"merge"``/``"sum"`` roles).

    A merge map is a :class:`UnitMap` over the **old** units: old unit ``u`` becomes part of new unit
    ``idx[u]``, or is removed when ``fresh[u]``; every new unit ``0..m-1`` has at least one member.

        >>> shrunk_width(UnitMap(torch.tensor([0, 1, 0, 0]), torch.ones(4, dtype=torch.float64),
        ...                      torch.tensor([False, False, False, True])))
        2
    """
    kept = um.idx[~um.fresh]
    return int(kept.max()) + 1 if len(kept) else 0


def merge_members(um: UnitMap) -> torch.Tensor:
    """The members of each new unit of a merge map, ascending: ``(m, largest group)``, padded with -1.

        >>> merge_members(UnitMap(torch.tensor([1, 0, 1]), torch.ones(3, dtype=torch.float64),
        ...                       torch.zeros(3, dtype=torch.bool)))
        tensor([[ 1, -1],
                [ 0,  2]])
    """
    n = len(um.idx)
    old = torch.arange(n)[~um.fresh]
    grp = um.idx[~um.fresh]
    order = torch.argsort(grp * n + old)  # by new unit, then by old index
    grp, old = grp[order], old[order]
    counts = torch.bincount(grp, minlength=shrunk_width(um))
    rank = torch.arange(len(grp)) - (counts.cumsum(0) - counts)[grp]
    members = torch.full((len(counts), int(counts.max()) if len(counts) else 0), -1, dtype=torch.long)
    members[grp, rank] = old
    return members


def merge_units(t: torch.Tensor, dim: int, um: UnitMap, how: str) -> torch.Tensor:
    """``t`` with the units along ``dim`` merged by the merge map ``um`` (a new tensor).

    ``how`` combines each group: ``"first"`` its first member (a merged unit's own rows), ``"sum"``
    the sum (consumer columns; first moments), ``"mean"`` the mean, ``"sqrtsum"`` ``(sum sqrt(v))**2``
    (second moments). A group of one is returned bit-for-bit; groups are summed member by member in
    ascending order, so the result is deterministic on every device.

        >>> um = UnitMap(torch.tensor([0, 1, 0]), torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool))
        >>> merge_units(torch.tensor([[1., 2., 3.]]), 1, um, "sum")
        tensor([[4., 2.]])
        >>> merge_units(torch.tensor([1., 4., 4.]), 0, um, "sqrtsum")
        tensor([9., 4.])
    """
    check_choice("how", how, MERGES)
    members = merge_members(um).to(t.device)
    first = t.index_select(dim, members[:, 0])
    if how == "first" or members.shape[1] == 1:
        return first
    total = first.sqrt() if how == "sqrtsum" else first
    for r in range(1, members.shape[1]):
        col = members[:, r]
        x = t.index_select(dim, col.clamp_min(0))
        x = x.sqrt() if how == "sqrtsum" else x
        total = total + torch.where(UnitMap.along(col >= 0, x, dim), x, torch.zeros((), dtype=x.dtype,
                                                                                     device=x.device))
    counts = UnitMap.along((members >= 0).sum(1), t, dim)
    if how == "mean":
        return torch.where(counts > 1, total / counts.to(t.dtype), first)
    if how == "sqrtsum":
        return torch.where(counts > 1, total * total, first)
    return total


@dataclass
class Growth:
    """What one widen/deepen did; JSON-able, replayable with :func:`autogrow.replay`.

    Example:
        >>> import torch.nn as nn, autogrow, json
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> g = autogrow.widen(net, "0", 12, generator=0)
        >>> g2 = autogrow.Growth.from_dict(json.loads(json.dumps(g.to_dict())))
        >>> g2.params["2.weight"][0].role
        'in'
    """

    kind: str  # "widen" | "deepen" | "shrink" (and any registered kind)
    target: str
    options: dict[str, Any]
    seed: int
    maps: dict[str, UnitMap] = field(default_factory=dict)
    params: dict[str, list[Transform]] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)  # old parameter name -> new name
    new_params: dict[str, str] = field(default_factory=dict)  # new parameter -> parameter it joins
    buffers: list[str] = field(default_factory=list)  # buffers reshaped (BatchNorm statistics)
    # Every tensor changed, in order, with shapes and transforms, and every size attribute written: enough to
    # replay the growth on another copy of the model without tracing it (see WidenPlan.replay).
    tensors: list[dict[str, Any]] = field(default_factory=list)
    resizes: list[list[Any]] = field(default_factory=list)
    # The Parameter objects that were replaced, by old name: live objects for remapping an optimizer
    # that still holds them. Not serialised.
    replaced: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "target": self.target, "options": dict(self.options), "seed": self.seed,
            "maps": {k: m.to_dict() for k, m in self.maps.items()},
            "params": {k: [asdict(t) for t in ts] for k, ts in self.params.items()},
            "renames": dict(self.renames), "new_params": dict(self.new_params), "buffers": list(self.buffers),
            "tensors": [dict(t) for t in self.tensors], "resizes": [list(r) for r in self.resizes],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Growth:
        return Growth(
            kind=d["kind"], target=d["target"], options=dict(d["options"]), seed=int(d["seed"]),
            maps={k: UnitMap.from_dict(m) for k, m in d["maps"].items()},
            params={k: [Transform(**t) for t in ts] for k, ts in d["params"].items()},
            renames=dict(d["renames"]), new_params=dict(d["new_params"]), buffers=list(d["buffers"]),
            tensors=[dict(t) for t in d.get("tensors", [])], resizes=[list(r) for r in d.get("resizes", [])],
        )

    def summary(self) -> str:
        """One line for logs: what grew and how."""
        return kind_of(self.kind).summarize(self)


class GrowthKind(Protocol):
    """What autogrow needs to know about a kind of growth record (a plan class registers itself)."""

    @classmethod
    def summarize(cls, record: Growth) -> str: ...

    @classmethod
    def replay(cls, model: nn.Module, record: Growth) -> Growth: ...


_KINDS: dict[str, GrowthKind] = {}


def register_kind(name: str, kind: GrowthKind) -> None:
    """Register the plan class that makes (and replays) growth records of kind ``name``."""
    _KINDS[name] = kind


def kind_of(name: str) -> GrowthKind:
    """The registered kind ``name``.

    Raises:
        AutogrowError: no such kind.
    """
    check_choice("kind", name, tuple(_KINDS))
    return _KINDS[name]


def num_params(module: torch.nn.Module) -> int:
    """Number of parameter entries in ``module``.

        >>> num_params(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters())


def make_seed(generator: torch.Generator | int | None) -> int:
    """A 63-bit seed from a generator, an int, or (``None``) the OS: never the global RNG.

    Raises:
        AutogrowError: ``generator`` is none of these (or an int outside ``[0, 2**63)``).
    """
    if generator is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    ok = not isinstance(generator, bool) and hasattr(generator, "__index__") and 0 <= generator < 2**63
    check("generator", generator, ok, "a torch.Generator, an int seed in [0, 2**63) or None")
    return int(generator)  # type: ignore[call-overload]
