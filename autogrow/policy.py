"""What to grow at a growth event: policies choosing among candidate layers (framework-free).

A policy sees one :class:`Candidate` per growable layer and returns the names to grow now.
Subclass :class:`GrowthPolicy` for your own rule::

    >>> class Widest(GrowthPolicy):
    ...     def choose(self, candidates):
    ...         return [max(candidates, key=lambda c: c.width).name]
    >>> Widest().choose([Candidate("fc1", 8), Candidate("fc2", 16)])
    ['fc2']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn

from autogrow.errors import check, check_choice
from autogrow.registry import layer_spec

__all__ = ["POLICIES", "AllLayers", "Candidate", "GradientScore", "GradientTracker", "GrowthPolicy", "RoundRobin",
           "SmallestFirst", "make_policy"]


@dataclass(frozen=True)
class Candidate:
    """A layer that can grow now: its name, current width and a per-unit gradient score (or None)."""

    name: str
    width: int
    score: float | None = None


class GrowthPolicy:
    """Chooses which candidates grow at one event. Stateful policies save their state for resume.

    ``needs_gradients``: the callback then fills each candidate's ``score`` with its mean per-unit
    gradient norm since the last event.
    """

    needs_gradients: ClassVar[bool] = False

    def choose(self, candidates: Sequence[Candidate]) -> list[str]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AllLayers(GrowthPolicy):
    """Grow every candidate at each event.

        >>> AllLayers().choose([Candidate("a", 4), Candidate("b", 8)])
        ['a', 'b']
    """

    def choose(self, candidates: Sequence[Candidate]) -> list[str]:
        return [c.name for c in candidates]


class RoundRobin(GrowthPolicy):
    """One layer per event, in turn (layers that can no longer grow are skipped).

        >>> p = RoundRobin(); cs = [Candidate("a", 4), Candidate("b", 8)]
        >>> [p.choose(cs) for _ in range(3)]
        [['a'], ['b'], ['a']]
    """

    def __init__(self) -> None:
        self.turn = 0

    def choose(self, candidates: Sequence[Candidate]) -> list[str]:
        if not candidates:
            return []
        pick = candidates[self.turn % len(candidates)].name
        self.turn += 1
        return [pick]

    def state_dict(self) -> dict[str, Any]:
        return {"turn": self.turn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.turn = int(state.get("turn", 0))


class SmallestFirst(GrowthPolicy):
    """The narrowest layer (ties: first in the model).

        >>> SmallestFirst().choose([Candidate("a", 8), Candidate("b", 4)])
        ['b']
    """

    def choose(self, candidates: Sequence[Candidate]) -> list[str]:
        return [min(candidates, key=lambda c: c.width).name] if candidates else []


class GradientScore(GrowthPolicy):
    """The layer whose units had the largest mean gradient norm since the last event.

    A large per-unit gradient says the layer's units are still pulled hard: more of them is likely
    to help (the idea behind GradMax-style growth). Candidates without a score come last.

        >>> GradientScore().choose([Candidate("a", 8, 0.1), Candidate("b", 8, 0.3)])
        ['b']
    """

    needs_gradients = True

    def choose(self, candidates: Sequence[Candidate]) -> list[str]:
        scored = [c for c in candidates if c.score is not None]
        if not scored:
            return [candidates[0].name] if candidates else []
        return [max(scored, key=lambda c: c.score).name]


POLICIES: dict[str, type[GrowthPolicy]] = {
    "all": AllLayers, "round_robin": RoundRobin, "smallest": SmallestFirst, "gradient": GradientScore,
}


def make_policy(policy: str | GrowthPolicy) -> GrowthPolicy:
    """A policy from a shortcut name or an instance.

    Raises:
        AutogrowError: an unknown name, or something that is not a :class:`GrowthPolicy`.
    """
    if isinstance(policy, str):
        check_choice("policy", policy, tuple(POLICIES))
        return POLICIES[policy]()
    check("policy", policy, isinstance(policy, GrowthPolicy), f"one of {tuple(POLICIES)} or a GrowthPolicy")
    return policy


class GradientTracker:
    """Mean per-unit gradient norm of each target layer's weight since the last growth event.

        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(3, 4)); net(torch.ones(2, 3)).sum().backward()
        >>> t = GradientTracker(); t.add(net, ["0"]); round(t.score("0"), 3)
        3.464
    """

    def __init__(self) -> None:
        self._sums: dict[str, tuple[float, int]] = {}

    def add(self, model: nn.Module, targets: Sequence[str]) -> None:
        """Accumulate the current gradients (call before each optimizer step)."""
        for name in targets:
            module = model.get_submodule(name)
            grad = module.weight.grad
            if grad is not None:
                dim = layer_spec(module).out_params["weight"]
                per_unit = grad.detach().float().movedim(dim, 0).flatten(1).norm(dim=1)
                total, n = self._sums.get(name, (0.0, 0))
                self._sums[name] = (total + float(per_unit.mean()), n + 1)

    def score(self, name: str) -> float | None:
        total, n = self._sums.get(name, (0.0, 0))
        return total / n if n else None

    def clear(self) -> None:
        self._sums.clear()
