"""AutoGrow's other direction and its choice of growth: shrinking (duplicates merged, redundant units pruned,
over capacity) and :class:`~autogrow.policy.TryCandidates` trials, kept out of the callback class.

:class:`Resizer` holds what the decisions need across evaluations (cached training batches, the mean training
loss, the over-capacity check, the anti-oscillation blocks) and saves it in checkpoints, so a resumed run
shrinks exactly as an uninterrupted one. :func:`choose_growth` turns the policy's answer (or the trials') into
the layers and the action of one growth event.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

import autogrow
from autogrow.actions import GrowthAction, width_of
from autogrow.checkpoint import history_of, set_history
from autogrow.events import Change, Reason
from autogrow.plan import outputs
from autogrow.policy import Candidate, TryCandidates
from autogrow.resize import Blocks, OverfitCheck, Shrink, prune_widths, shrink_layer

from .batches import BatchCache, TrainLoss
from .growing import renamed
from .probe import Probe
from .rebuild import TrainingState, rebuild
from .trials import Option, run_trials

__all__ = ["Choice", "Resizer", "choose_growth"]


@dataclass
class Choice:
    """What one growth event grows: ``names`` by ``action``; the trials' cost and description, if any."""

    names: list[str]
    action: GrowthAction
    extra_flops: float = 0.0
    notes: str = ""


@dataclass
class Shrunk:
    """What one shrink event did: the records, the changes and the largest measured output change."""

    growths: list[autogrow.Growth] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    change: float = 0.0
    pruned: bool = False


class Resizer:
    """Shrinking state of one AutoGrow callback (``shrink=None``: only the batch cache TryCandidates needs).

        >>> r = Resizer(Shrink(warmup=0, every=1, overfit_patience=None), "min", cache=2)
        >>> r.decide(0.5, lambda a, b: a < b), r.pending
        (<Reason.DUPLICATES: 'duplicates'>, <Reason.DUPLICATES: 'duplicates'>)
    """

    def __init__(self, options: Shrink | None, mode: str, cache: int) -> None:
        self.options = options
        self.cache, self.loss = BatchCache(cache), TrainLoss()
        self.overfit = OverfitCheck(mode, options.overfit_patience) if options and options.overfit_patience else None
        self.blocks = Blocks(options.cooldown if options else 0)
        self.evaluations = 0
        self.pending: Reason | None = None  # the shrink decided at the last evaluation, done at the next act

    def observe(self, outputs: Any, batch: Any) -> None:
        """One training batch: its loss (over-capacity check) and the batch itself (the decisions' data)."""
        if self.overfit is not None:  # reading the loss syncs with the GPU: only when it is needed
            self.loss.add(outputs)
        self.cache.add(batch)

    def decide(self, value: float, better: Callable[[float, float], bool],
               agree: Callable[[bool], bool] = bool, progress: float | None = None) -> Reason | None:
        """One evaluation of the monitored metric: the shrink now due (``OVERFIT`` or a redundancy check).
        ``agree``: makes the over-capacity verdict every rank's (rank 0's: the training loss is per rank);
        ``progress``: the fraction of the run done (none is decided from ``Shrink.until`` on)."""
        self.evaluations += 1
        self.blocks.update(value, better)
        train = self.loss.take()
        if self.options is None:
            return None
        over = self.overfit is not None and agree(self.overfit.update(value, train))  # counted even when closed
        if not self.options.open(progress):
            return self.pending
        if over:
            self.pending = Reason.OVERFIT
        elif self.options.due(self.evaluations):
            self.pending = self.pending or Reason.DUPLICATES  # merges first; prunes make it REDUNDANT
        return self.pending

    def may_grow(self, name: str) -> bool:
        return self.blocks.may_grow(name)

    def grew(self, growths: Sequence[autogrow.Growth], changes: Sequence[Change]) -> None:
        """After a growth event (``growths`` empty: skipped): follow renamed layers; the grown ones may not shrink
        during the cooldown; the layers that sat this event out may grow at the next (once the metric allows)."""
        self.blocks.growth_event()
        for g in growths:
            self.blocks.rename(lambda n, g=g: renamed(n, g))
        for c in changes:
            self.blocks.grew(c.target)

    def shrink(self, cb: Any, trainer: Any, module: nn.Module) -> tuple[Reason, Shrunk, int, float | None] | None:
        """Do the pending shrink on ``cb``'s targets: the surgery, then the optimizer and schedulers rebuilt and
        the records added to the module's history. Returns the event's reason, what shrank, the parameters
        before and the change on the validation probe; ``None`` when nothing shrank (the model is unchanged)."""
        reason, self.pending = self.pending, None
        data = BatchCache.of(shared_batches(trainer, module, self.cache)).inputs()
        if reason is None or data is None:
            return None
        n_before, saved, probe = autogrow.num_params(module), TrainingState.capture(trainer, module), \
            cb.probe.outputs(module)
        fit, check = data
        x = cb.probe.inputs
        if isinstance(x, torch.Tensor) and x.shape[1:] == check.shape[1:]:
            # also held to tol on the validation probe: a least-squares correction fitted on a few training
            # batches can be ill-conditioned (near-dead units) and hold on training inputs only
            check = torch.cat([check, x.to(check.device, check.dtype)])
        done = self._surgery(module, [t for t in cb.targets if self.blocks.may_shrink(t)], reason, fit, check,
                             n_before)
        if not done.growths:
            return None
        rebuild(trainer, module, saved, done.growths, cb.optimizer_state)
        set_history(module, history_of(module) + [g.to_dict() for g in done.growths])
        cb.schedule.rebuilt(trainer, module, grew=False, growths=done.growths)
        for c in done.changes:
            self.blocks.shrank(c.target, cb.best)
        if self.overfit is not None:
            self.overfit.reset()
        cb.trigger.notify_growth()  # a resize: the plateau patience counts afresh
        reason = Reason.REDUNDANT if reason is Reason.DUPLICATES and done.pruned else reason
        return reason, done, n_before, Probe.error(probe, cb.probe.outputs(module))

    def _surgery(self, module: nn.Module, names: list[str], reason: Reason, fit: Any, check: Any,
                 n: int) -> Shrunk:
        """Merge then prune ``names`` in turn, every change measured against the outputs before the first."""
        opts, done = self.options, Shrunk()
        assert opts is not None  # pending is only set with options
        before = outputs(module, check)
        if reason is Reason.OVERFIT and names:  # over capacity: the widest layer loses a fraction of its units
            names = [max(names, key=lambda t: width_of(module.get_submodule(t)))]
        for name in names:
            steps: list[tuple[str, Sequence[int | None], float | None]] = [("merge", (None,), opts.tol)] \
                if opts.merge else []
            width = width_of(module.get_submodule(name))
            if reason is Reason.OVERFIT:
                cut = width - max(1, math.floor(width * opts.overfit_fraction))
                steps.append(("prune", [cut] if cut >= opts.min_width else [], opts.overfit_tol))
            elif opts.prune:
                steps.append(("prune", prune_widths(width, opts.fraction, opts.attempts, opts.min_width), opts.tol))
            for mode, widths, tol in steps:
                old = width_of(module.get_submodule(name))
                out = shrink_layer(module, name, mode, fit=fit, check=check, tol=tol, widths=widths,
                                   correct=opts.correct, ridge=opts.ridge, select=opts.select, before=before,
                                   fits=lambda d, n=n: opts.min_params is None or n + d >= opts.min_params)
                if out is None:
                    continue
                growth, err, _ = out
                n = autogrow.num_params(module)
                done.growths.append(growth)
                done.changes.append(Change(name, old, width_of(module.get_submodule(name)),
                                           f"{growth.summary()}; output change {err:.2e}"))
                done.change, done.pruned = max(done.change, err), done.pruned or mode == "prune"
        return done

    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.cache.state_dict(), "loss": self.loss.state_dict(), "blocks": self.blocks.state_dict(),
                "overfit": self.overfit.state_dict() if self.overfit is not None else {},
                "evaluations": self.evaluations, "pending": self.pending.value if self.pending else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache.load_state_dict(state.get("cache", []))
        self.loss.load_state_dict(state.get("loss", {}))
        self.blocks.load_state_dict(state.get("blocks", {}))
        if self.overfit is not None:
            self.overfit.load_state_dict(state.get("overfit", {}))
        self.evaluations = int(state.get("evaluations", 0))
        self.pending = Reason(state["pending"]) if state.get("pending") else None


def choose_growth(cb: Any, trainer: Any, module: nn.Module, candidates: list[Candidate], seed: int) -> Choice:
    """The layers (and action) one growth event grows: the policy's choice, or with
    :class:`~autogrow.policy.TryCandidates` the best of its trials (every trial rolled back exactly)."""
    policy = cb.policy
    if not isinstance(policy, TryCandidates):
        return Choice(policy.choose(candidates), cb.action)
    options = [Option(c.name, a) for c in candidates for a in (policy.actions or (cb.action,))]
    if not options:
        return Choice([], cb.action)
    batches = shared_batches(trainer, module, cb.resizer.cache)
    best, flops, notes = run_trials(cb, trainer, module, options, seed, batches)
    return Choice([best.target] if best else [], best.action if best else cb.action, flops, notes)


def shared_batches(trainer: Any, module: nn.Module, cache: BatchCache) -> list[Any]:
    """Rank 0's cached batches on every rank (under DDP every rank must shrink and choose alike), on the
    module's device."""
    device = next((p.device for p in module.parameters()), None)
    return BatchCache.of(trainer.strategy.broadcast(cache.get("cpu"), src=0)).get(device)
