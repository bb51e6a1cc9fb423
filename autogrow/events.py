"""What happened at a resize decision (growth, shrink, rollback): typed, JSON-able records (framework-free).

    >>> e = GrowthEvent(index=1, epoch=3, step=120, monitor="val_loss", value=0.41, reason=Reason.PLATEAU,
    ...                 changes=[Change("fc1", 32, 64, "widen fc1: 32 -> 64 units (net2wider)")],
    ...                 params_before=1000, params_after=1900)
    >>> GrowthEvent.from_dict(e.to_dict()) == e
    True
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GROWTH_REASONS", "SHRINK_REASONS", "Change", "GrowthEvent", "Reason", "StopReason"]


class Reason(str, enum.Enum):
    """Why an event happened."""

    PLATEAU = "plateau"  # the monitored metric stopped improving
    DNC = "dnc"  # Ash's dynamic-node-creation rule
    SCHEDULE = "schedule"  # a fixed schedule (every N evaluations)
    DEADLINE = "deadline"  # the growth budget had to be reached by a fraction of the run
    ROLLBACK = "rollback"  # the last growth did not pay and was undone
    DUPLICATES = "duplicates"  # shrink: units that compute the same thing were merged (exact)
    REDUNDANT = "redundant"  # shrink: the least important units were pruned, the output changed by less than a tol
    OVERFIT = "overfit"  # shrink: validation got worse while training improved (over capacity)


GROWTH_REASONS = frozenset({Reason.PLATEAU, Reason.DNC, Reason.SCHEDULE, Reason.DEADLINE})
SHRINK_REASONS = frozenset({Reason.DUPLICATES, Reason.REDUNDANT, Reason.OVERFIT})


class StopReason(str, enum.Enum):
    """Why growth stopped for the rest of the run."""

    MAX_EVENTS = "max_events"
    BUDGET = "budget"  # no layer fits within max_params / max_width
    NO_PAYOFF = "no_payoff"  # Ash's validation stop: the last growth did not improve the metric
    REFUSED = "refused"  # every layer's growth failed its check (with on_error="skip")


@dataclass(frozen=True)
class Change:
    """One layer grown at an event: ``target`` went from ``old`` to ``new`` units (or depth)."""

    target: str
    old: int
    new: int
    summary: str


@dataclass
class GrowthEvent:
    """One growth, shrink or rollback: when, why, what changed, and what it cost.

    ``extra_flops``: FLOPs spent deciding (candidate growths tried for a few steps, then rolled back), on
    top of training; ``notes``: how the decision was made (the candidates' scores), for the logs;
    ``measured_change``: a shrink's relative output change on the inputs it was judged on (a held-out training
    batch and the validation probe: what is held to :class:`~autogrow.resize.Shrink`'s ``tol``).
    """

    index: int
    epoch: int
    step: int
    monitor: str
    value: float | None
    reason: Reason
    changes: list[Change] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    preservation_error: float | None = None  # max relative |f - g| on a validation batch, eval mode
    extra_flops: float = 0.0
    notes: str = ""
    measured_change: float | None = None

    @property
    def grew(self) -> bool:
        """Whether the event is a growth (not a shrink or a rollback)."""
        return self.reason in GROWTH_REASONS

    @property
    def shrank(self) -> bool:
        """Whether the event is a shrink (duplicates merged, redundant units pruned, over capacity)."""
        return self.reason in SHRINK_REASONS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reason"] = self.reason.value
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> GrowthEvent:
        """Read an event back, including the plain dicts of autogrow 0.1 checkpoints."""
        if "event" in d:  # autogrow 0.1: {"event", "trigger", "changes": [{"target", "from", "to", ...}], ...}
            reason = {"Plateau": Reason.PLATEAU, "DynamicNodeCreation": Reason.DNC, "EveryN": Reason.SCHEDULE,
                      "rollback": Reason.ROLLBACK}.get(d.get("trigger", ""), Reason.PLATEAU)
            changes = [Change(c["target"], c["from"], c["to"], c.get("summary", "")) for c in d.get("changes", [])]
            return GrowthEvent(d["event"], d["epoch"], d["step"], d.get("monitor", ""), d.get("value"), reason,
                               changes, d.get("params_before", 0), d.get("params_after", 0),
                               d.get("preservation_error"))
        return GrowthEvent(d["index"], d["epoch"], d["step"], d["monitor"], d["value"], Reason(d["reason"]),
                           [Change(**c) for c in d["changes"]], d["params_before"], d["params_after"],
                           d.get("preservation_error"), float(d.get("extra_flops", 0.0)), d.get("notes", ""),
                           d.get("measured_change"))
