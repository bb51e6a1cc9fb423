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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from autogrow.errors import check, check_bool, check_choice, check_int
from autogrow.registry import layer_spec

__all__ = ["POLICIES", "AllLayers", "Candidate", "GradientScore", "GradientTracker", "GrowthPolicy", "RoundRobin",
           "SmallestFirst", "Trial", "TryCandidates", "make_policy"]


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


@dataclass(frozen=True)
class Trial:
    """One candidate growth tried for a few steps: ``loss`` after them, ``flops`` added per example (forward)."""

    target: str
    action: str
    loss: float
    flops: float


@dataclass
class TryCandidates(GrowthPolicy):
    """Pick the growth that helps most, by trying (Cascade-Correlation's candidate pool; GradMax picks by gradient).

    At each growth, up to ``k`` candidate growths (a layer, grown by one of ``actions``) are each applied, trained
    for ``steps`` steps on the same cached training batches, scored and rolled back exactly (model, optimizer,
    schedulers, random state); the best is then grown for real. A candidate's gain is how much lower the loss
    on those batches ends than after the same steps without growth (``baseline``) or than before them; the
    score is the gain per added forward FLOP (``per_flop``) or the gain itself. When no candidate gains, the one
    that loses least is grown (the trigger asked for growth). The cost is reported as the event's
    ``extra_flops``. Which ``k`` of more candidates are tried is drawn from ``seed`` and the event number.

    Args:
        k: candidates tried per event.
        steps: training steps per candidate.
        actions: the growths to try on each layer (``"widen"``, ``"deepen"``, ``"stack"`` or
            :class:`~autogrow.actions.GrowthAction` instances); ``None``: the callback's own ``grow``.
        per_flop: divide the gain by the forward FLOPs the growth adds.
        baseline: also train without growth, and measure gains against it (one more trial).
        seed: draws the candidates tried when there are more than ``k``.

        >>> p = TryCandidates(k=2)
        >>> p.best([Trial("a", "widen", 0.50, 100.0), Trial("b", "widen", 0.45, 400.0)], reference=0.6)
        0
        >>> TryCandidates(per_flop=False).best([Trial("a", "widen", 0.50, 100.0), Trial("b", "widen", 0.45, 400.0)],
        ...                                     reference=0.6)
        1
    """

    k: int = 3
    steps: int = 5
    actions: tuple[Any, ...] | None = None
    per_flop: bool = True
    baseline: bool = True
    seed: int = 0
    events: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        from autogrow.actions import make_action

        check_int("k", self.k, 1)
        check_int("steps", self.steps, 1)
        check_bool("per_flop", self.per_flop)
        check_bool("baseline", self.baseline)
        check_int("seed", self.seed, 0, 2**62)
        check("actions", self.actions, self.actions is None or (isinstance(self.actions, (list, tuple))
                                                                 and len(self.actions) > 0),
              "None or a non-empty list of growth actions")
        if self.actions is not None:
            self.actions = tuple(make_action(a) for a in self.actions)

    def choose(self, candidates: Sequence[Candidate]) -> list[str]:
        """Without trials (a budget estimate): the narrowest layer."""
        return SmallestFirst().choose(candidates)

    def shortlist(self, options: Sequence[Any]) -> list[int]:
        """Indices of the options tried at this event (all of them, in order, when there are at most ``k``);
        advances the event counter."""
        self.events += 1
        if len(options) <= self.k:
            return list(range(len(options)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.events)
        return sorted(torch.randperm(len(options), generator=g)[: self.k].tolist())

    def score(self, trial: Trial, reference: float) -> float:
        gain = reference - trial.loss
        return gain / max(trial.flops, 1.0) if self.per_flop and gain > 0 else gain

    def best(self, trials: Sequence[Trial], reference: float) -> int:
        """Index of the best trial: the largest score among those that gain, else the smallest loss."""
        if not trials:
            return -1
        gaining = [i for i, t in enumerate(trials) if reference - t.loss > 0 and math.isfinite(t.loss)]
        pool = gaining or [i for i, t in enumerate(trials) if math.isfinite(t.loss)] or [0]
        return max(pool, key=lambda i: (self.score(trials[i], reference), -i))

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = int(state.get("events", 0))


POLICIES: dict[str, type[GrowthPolicy]] = {
    "all": AllLayers, "round_robin": RoundRobin, "smallest": SmallestFirst, "gradient": GradientScore,
    "try": TryCandidates,
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
