"""What AutoGrow keeps in checkpoints: a versioned dict, read back tolerantly (older versions too)."""

from __future__ import annotations

from typing import Any

from autogrow.events import GrowthEvent, Reason, StopReason

__all__ = ["STATE_VERSION", "dump_state", "load_state"]

STATE_VERSION = 2  # 1: autogrow 0.1 (events as plain dicts, stop reason as free text)


def dump_state(cb: Any) -> dict[str, Any]:
    """The callback's resumable state (plain data: no classes pickled into checkpoints)."""
    return {"version": STATE_VERSION, "trigger": cb.trigger.state_dict(), "policy": cb.policy.state_dict(),
            "targets": cb.targets, "events": [e.to_dict() for e in cb.events], "pending": cb.pending,
            "stopped": cb.stopped.value if cb.stopped else None, "stop_message": cb.stop_message, "best": cb.best,
            "since_growth": cb.payoff.since_growth, "best_at_growth": cb.payoff.best_at_growth,
            "reason": cb._reason.value, "schedule": cb.schedule.state_dict(),
            "resize": cb.resizer.state_dict()}


def load_state(cb: Any, s: dict[str, Any]) -> None:
    """Restore ``cb`` from :func:`dump_state`'s dict; missing keys keep their defaults."""
    cb.trigger.load_state_dict(s.get("trigger", {}))
    cb.policy.load_state_dict(s.get("policy", {}))
    cb.targets = list(s.get("targets", cb.targets))
    cb.events = [GrowthEvent.from_dict(e) for e in s.get("events", [])]
    cb.pending, cb.best = bool(s.get("pending", False)), s.get("best")
    cb.payoff.since_growth, cb.payoff.best_at_growth = s.get("since_growth"), s.get("best_at_growth")
    cb._reason = Reason(s.get("reason", cb._reason.value))
    cb.schedule.load_state_dict(s.get("schedule", {}))
    cb.resizer.load_state_dict(s.get("resize", {}))
    stopped = s.get("stopped")
    if stopped is not None and s.get("version", 1) < 2:  # 0.1 saved free text
        cb.stop_message = stopped
        stopped = StopReason.NO_PAYOFF.value if "did not improve" in stopped else next(
            (r.value for r in StopReason if r.value in stopped), StopReason.BUDGET.value)
    else:
        cb.stop_message = s.get("stop_message", "")
    cb.stopped = StopReason(stopped) if stopped is not None else None
