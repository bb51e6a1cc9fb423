"""Resize events (growth, shrink, rollback) where users look: a log line, TensorBoard text and scalars (rank 0 only)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from autogrow.events import GrowthEvent

from ._compat import TENSORBOARD_LOGGERS, info

__all__ = ["report"]


def report(trainer: Any, module: nn.Module, event: GrowthEvent) -> None:
    """Log ``event`` as one info line and, for each TensorBoard logger, a text table and scalars."""
    what = "; ".join(f"{c.target}: {c.old} -> {c.new}" if c.old != c.new else c.summary  # a stacked block: no width
                     for c in event.changes) or event.reason.value
    err = event.preservation_error
    value = "n/a" if event.value is None else f"{event.value:.4g}"
    info(trainer, f"AutoGrow: event {event.index} at epoch {event.epoch}, step {event.step} ({event.monitor}="
                  f"{value}, {event.reason.value}): {what}; parameters {event.params_before:,} -> "
                  f"{event.params_after:,}" + (f"; max|f-g| on a validation batch {err:.2e}" if err is not None
                                                 else "") + _extras(event))
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TENSORBOARD_LOGGERS):
            _tensorboard(logger.experiment, module, event, trainer.global_step)


def _tensorboard(exp: Any, module: nn.Module, event: GrowthEvent, step: int) -> None:
    rows = "\n".join(f"| {c.target} | {c.old} | {c.new} | {c.summary} |" for c in event.changes)
    err = event.preservation_error
    value = "n/a" if event.value is None else f"{event.value:.5g}"
    kind = "Shrink" if event.shrank else "Growth"
    text = (f"**{kind} event {event.index}** at epoch {event.epoch}, step {step}: {event.monitor} = {value} "
            f"({event.reason.value})\n\n| layer | from | to | what |\n|---|---|---|---|\n{rows}\n\n"
            f"parameters {event.params_before:,} -> {event.params_after:,}; preservation error "
            f"{'n/a' if err is None else f'{err:.3e}'}" + _extras(event))
    exp.add_text("autogrow/events", text, step)
    exp.add_scalar("autogrow/params", event.params_after, step)
    exp.add_scalar("autogrow/event", event.index, step)
    if err is not None:
        exp.add_scalar("autogrow/preservation_error", err, step)
    for c in event.changes:
        exp.add_scalar(f"autogrow/width/{c.target}", c.new, step)
    exp.add_scalar("autogrow/depth", sum(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in module.modules()),
                   step)


def _extras(event: GrowthEvent) -> str:
    """A shrink's measured change, a choice's trial cost and notes (empty for a plain growth)."""
    out = ""
    if event.measured_change is not None:
        out += f"; output change on held-out inputs {event.measured_change:.2e}"
    if event.extra_flops:
        out += f"; {event.extra_flops:.3g} FLOPs spent choosing"
    return out + (f"; {event.notes}" if event.notes else "")
