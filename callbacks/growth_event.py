"""One growth event of the callback, start to end: may it grow, which layers, the surgery (``growing``), the
optimizer and schedulers rebuilt, the event recorded; or growth stopped, with the reason."""

from __future__ import annotations

from typing import Any

import torch

import autogrow
from autogrow.actions import discover_targets
from autogrow.checkpoint import history_of, set_history
from autogrow.events import StopReason
from autogrow.lr import shrink_perturb

from ._compat import warn
from .growing import grow_layers
from .probe import Probe
from .rebuild import TrainingState, rebuild
from .resizing import choose_growth
from .snapshot import Snapshot

__all__ = ["grow_event"]


def grow_event(cb: Any, trainer: Any, pl_module: Any) -> None:
    """One growth event of ``cb`` (an AutoGrow): check it may grow, choose, grow each layer (checked on the probe),
    rebuild optimizer and schedulers, record it; or stop growing, saying why."""
    if cb.budget.max_events is not None and cb._grown() >= cb.budget.max_events:
        return cb._stop(trainer, StopReason.MAX_EVENTS, f"max_events={cb.budget.max_events} reached")
    if not cb._candidates(pl_module) and any(not cb.resizer.may_grow(t) for t in cb.targets):
        cb.resizer.grew([], [])  # the decision stands: it is done once the metric lifts a shrink's block
        cb.pending = True
        return None
    bad = next((n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        return warn(trainer, f"AutoGrow: not growing: parameter {bad!r} holds NaN/inf values (training diverged)")
    if cb._configured_targets is None:  # new layers (a stacked block) become candidates too
        try:
            cb.targets = discover_targets(pl_module, cb.action, None, cb.probe.inputs)
        except autogrow.AutogrowError:
            pass  # keep the targets found before
    seed = int(trainer.strategy.broadcast(cb.seed + 7919 * (len(history_of(pl_module)) + 1), src=0))
    candidates = cb._candidates(pl_module)
    choice = choose_growth(cb, trainer, pl_module, candidates, seed)
    n_before = autogrow.num_params(pl_module)
    saved = TrainingState.capture(trainer, pl_module)
    snapshot = Snapshot.take(trainer, pl_module, cb.targets) if cb.rollback else None
    before = cb.probe.outputs(pl_module)
    growths, changes, cb.targets = grow_layers(cb, trainer, pl_module, choice.names, seed, n_before,
                                               choice.action)
    if not growths and not cb.targets:
        return cb._stop(trainer, StopReason.REFUSED, "every layer's growth failed its check")
    if not growths:
        return cb._stop(trainer, StopReason.BUDGET, "no layer can grow within max_params / max_width")
    rebuild(trainer, pl_module, saved, growths, cb.optimizer_state)
    if getattr(choice.action, "gradmax", False):
        cb._gradmax.start(trainer, pl_module, growths, seed)
    set_history(pl_module, history_of(pl_module) + [g.to_dict() for g in growths])
    cb.schedule.rebuilt(trainer, pl_module, grew=True, growths=growths)
    after = cb.probe.outputs(pl_module)
    if cb.shrink_perturb is not None:
        shrink_perturb(pl_module, *cb.shrink_perturb, torch.Generator().manual_seed(seed))
    for stopper in trainer.early_stopping_callbacks:  # growth is progress: do not stop right after it
        stopper.wait_count = 0
    cb.trigger.notify_growth()
    cb._gradients.clear()
    cb.resizer.grew(growths, changes)
    cb._snapshot = snapshot
    cb.payoff.grew(cb.best)
    cb._record(trainer, pl_module, cb._reason, changes, n_before, Probe.error(before, after),
               extra_flops=choice.extra_flops, notes=choice.notes)
